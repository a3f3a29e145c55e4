"""Attention kernel benchmark: fastvit's attention (per backend) vs torch SDPA backends (and flash_attn).

    python benchmarks/bench_attention.py [--dtype bf16] [--modes fwd fwd_bwd] [--batch auto 1] [--quick]

For each ViT attention shape (SHAPES), at a batch that fills the GPU ("auto") and at batch 1, forward and
forward+backward; providers:

* ``fastvit_<backend>``        ops.attention on contiguous (B, H, N, D) q, k, v (SDPA's own layout)
* ``fastvit_packed_<backend>`` ops.attention_qkvpacked on (B, N, 3*H*D) -> (B, N, H*D) (the no-copy model path)
* ``torch``                    fastvit.ops.attention_ref (softmax(q k^T / sqrt(D)) v, unfused, the op's spec)
* ``sdpa_<backend>``           F.scaled_dot_product_attention under each SDPA backend (flash, efficient, cudnn,
  math; a backend that cannot take the input is a row with its reason)
* ``flash_attn``               flash_attn_qkvpacked_func on (B, N, 3, H, D), when the package is installed

SDPA is the real competitor (the baseline is the fastest non-math SDPA backend that ran). FLOPs: forward
4*B*H*N^2*D; forward+backward 3.5x that (the backward's five matmuls vs the forward's two), against the
``torch.matmul`` ceiling (8192^3, in the benchmark's dtype) measured in the same run. Writes JSON and CSV.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _harness.opbench import Case, OpSpec, Option, Unavailable, run

from fastvit import ops

# (name, heads, tokens, head_dim, batch that fills an 80 GB GPU with work)
SHAPES = [
    ("vit_b16_224", 12, 197, 64, 256),
    ("vit_l16_224", 16, 197, 64, 256),
    ("vit_h14_224", 16, 257, 80, 128),
    ("vit_b16_384", 12, 577, 64, 64),
    ("n1025_d64", 12, 1025, 64, 32),
    ("t2t_stage1", 1, 3136, 64, 64),
    ("t2t_stage2", 1, 784, 64, 256),
]
SDPA = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def _batch(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give 'auto' (fills the GPU) or a positive integer")
    return text


def _inputs(B, H, N, D, device, dtype):
    """q, k, v (B, H, N, D) and the same values packed as the model holds them: (B, N, 3*H*D) and (B, N, 3, H, D)."""
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    qkv5 = torch.stack((q, k, v), dim=2).transpose(1, 3).contiguous()  # (B, N, 3, H, D)
    return {"q": q, "k": k, "v": v, "qkv": qkv5.reshape(B, N, 3 * H * D).clone(), "qkv5": qkv5}


def cases(args, dtype):
    for name, H, N, D, full_batch in SHAPES[:2] if args.quick else SHAPES:
        for batch in args.batch:
            B = full_batch if batch == "auto" else int(batch)
            flops = 4 * B * H * N * N * D
            yield Case(
                {"shape": name, "B": B, "H": H, "N": N, "D": D},
                lambda dev, dt, s=(B, H, N, D): _inputs(*s, dev, dt),
                flops={"fwd": flops, "fwd_bwd": 3.5 * flops},
                leaves=("q", "k", "v"),
            )


def _scores_fit(scores: int) -> None:
    if scores > 2**31:
        raise Unavailable(f"the unfused path materialises the {scores:.2e} attention scores")


def _ref(q, k, v, scores: int):
    def call():
        _scores_fit(scores)
        return ops.attention_ref(q, k, v)

    return call


def _sdpa(backend: str, q, k, v, scores: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call():
        if not hasattr(SDPBackend, SDPA[backend]):
            raise Unavailable(f"this torch has no SDPBackend.{SDPA[backend]}")
        if backend == "math":
            _scores_fit(scores)
        with sdpa_kernel(getattr(SDPBackend, SDPA[backend])):
            return F.scaled_dot_product_attention(q, k, v)

    return call


def _flash_attn(qkv5):
    def call():
        try:
            from flash_attn import flash_attn_qkvpacked_func
        except ImportError as exc:
            raise Unavailable(f"flash_attn is not installed ({exc})") from None
        return flash_attn_qkvpacked_func(qkv5)

    return call


def providers(case, t, backends):
    q, k, v, qkv, qkv5 = (t[n] for n in ("q", "k", "v", "qkv", "qkv5"))
    B, H, N = (case.label[n] for n in ("B", "H", "N"))
    return {
        **{f"fastvit_{bk}": lambda bk=bk: ops.attention(q, k, v, backend=bk) for bk in backends},
        **{
            f"fastvit_packed_{bk}": (lambda bk=bk: ops.attention_qkvpacked(qkv, H, backend=bk), [qkv])
            for bk in backends
        },
        "torch": _ref(q, k, v, B * H * N * N),
        **{f"sdpa_{name}": _sdpa(name, q, k, v, B * H * N * N) for name in SDPA},
        "flash_attn": (_flash_attn(qkv5), [qkv5]),
    }


SPEC = OpSpec(
    name="attention",
    op="attention",
    doc=__doc__,
    cases=cases,
    providers=providers,
    ceiling="matmul",
    csv=True,
    baseline=lambda name: name.startswith("sdpa_") and name != "sdpa_math",
    dtypes=("bf16",),
    modes=("fwd", "fwd_bwd"),
    options=(
        Option(
            ("--batch",),
            {"nargs": "+", "type": _batch, "default": ["auto", "1"], "help": "'auto' (fills the GPU) and/or integers"},
        ),
        Option(("--quick",), {"action": "store_true", "help": "only the ViT-B/L 224 shapes"}),
    ),
)

if __name__ == "__main__":
    raise SystemExit(run(SPEC))

"""Fused Linear epilogues and the MLP sub-block: fastvit (per backend) vs torch (``fastvit.ops.linear_ref`` /
``layer_norm_ref``, timm's eager composition).

Per ViT MLP shape (rows M = batch x 197 tokens, width D = K, hidden 4D) and dtype, three cases:

* ``fc1+gelu``      ``gelu(x @ W1.T + b1)``:  ``ops.linear(..., activation="gelu")`` vs ``linear_ref``
* ``fc2+residual``  ``h @ W2.T + b2 + x``:    ``ops.linear(..., residual=x)`` vs ``linear_ref``
* ``mlp``           ``x + fc2(gelu(fc1(LN(x))))``: ops.layer_norm + the two fused linears vs the refs

With ``--wgrad``, two more cases per shape time the backward of a linear without activation, dW = dy^T x
and dbias = sum_rows(dy) (``fwd`` mode only: the case is itself a gradient): ``qkv wgrad+dbias`` (N = 3D,
K = D) and ``fc2 wgrad+dbias`` (N = D, K = 4D); providers ``torch`` (``torch.matmul(dy.T, x)`` + ``dy.sum(0)``
in fp32, what the measured dispatch compares against), ``fastvit_triton`` (the fused Triton kernel,
``fastvit.kernels.linear.linear_wgrad``, called directly: not the measured choice) and ``fastvit_cuda``
(cuBLASLt BGRADB, ``fastvit.ops._cuda_backends.linear_wgrad``; "not run" where cuBLASLt has no algorithm).
Expected: the fused dbias saves one read of dy (M N 2 bytes in bf16: 232 MB for ViT-B/16 qkv at batch
256, ~50-80 us at H200 bandwidth) against a ~0.25 ms GEMM; the Triton kernel wins only if its GEMM is
within that margin of cuBLAS's.

TFLOP/s count 2 M N K per GEMM (fwd_bwd: 3x, the input and weight gradients). The fwd ceiling of fc1 / fc2
is ``torch.matmul`` of the same operands without an epilogue, timed in the same run (the issue's goal: the
fused GEMM at >= 80% of it, the sub-block >= 1.3x the eager composition in bf16 at ViT-B/16 batch 256).

    python benchmarks/bench_linear.py [--models S B L H] [--batches 1 64 128 256] [--dtypes bfloat16] [--backward]
                                      [--wgrad]
"""

from __future__ import annotations

import torch
from _harness.opbench import Case, OpSpec, Option, run

from fastvit import ops

TOKENS = 197
MODELS = {"S": ("DeiT-S", 384), "B": ("ViT-B", 768), "L": ("ViT-L", 1024), "H": ("ViT-H", 1280)}  # MLP ratio 4
LEAVES = {
    "fc1+gelu": ("x", "w1", "b1"),
    "fc2+residual": ("h", "w2", "b2", "x"),
    "mlp": ("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2"),
}


def _inputs(m: int, d: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    return {
        "x": rand(m, d),
        "h": rand(m, 4 * d),
        "w1": rand(4 * d, d, scale=d**-0.5),
        "b1": rand(4 * d, scale=0.1),
        "w2": rand(d, 4 * d, scale=(4 * d) ** -0.5),
        "b2": rand(d, scale=0.1),
        "ln_w": rand(d, scale=0.1) + 1,
        "ln_b": rand(d, scale=0.1),
        "dqkv": rand(m, 3 * d),
    }


def _matmul(case: str):
    a, w = ("x", "w1") if case == "fc1+gelu" else ("h", "w2")
    return lambda t: lambda: torch.matmul(t[a], t[w].t())


def cases(args, dtype):
    for model in args.models:
        name, d = MODELS[model]
        for batch in args.batches:
            m = batch * TOKENS
            for case, gemms in (("fc1+gelu", 1), ("fc2+residual", 1), ("mlp", 2)):
                flops = gemms * 2 * m * d * 4 * d
                yield Case(
                    {"model": name, "M": m, "K": d, "case": case},
                    lambda dev, dt, m=m, d=d: _inputs(m, d, dev, dt),
                    flops={"fwd": flops, "fwd_bwd": 3 * flops},
                    leaves=LEAVES[case],
                    reference=None if case == "mlp" else _matmul(case),
                    reference_name="torch.matmul same operands",
                )
            if getattr(args, "wgrad", False):
                for case, n, k in (("qkv wgrad+dbias", 3 * d, d), ("fc2 wgrad+dbias", d, 4 * d)):
                    yield Case(
                        {"model": name, "M": m, "K": d, "case": case},
                        lambda dev, dt, m=m, d=d: _inputs(m, d, dev, dt),
                        flops={"fwd": 2 * m * n * k},
                        bytes={"fwd": 2 * (m * n + m * k + n * k)},  # one read of dy and x, dW written (16-bit)
                    )


def providers(case, t, backends):
    x, h, w1, b1, w2, b2, ln_w, ln_b = (t[k] for k in ("x", "h", "w1", "b1", "w2", "b2", "ln_w", "ln_b"))
    if case.label["case"].endswith("wgrad+dbias"):
        from fastvit.kernels import linear as kernels_linear
        from fastvit.ops import _cuda_backends

        dy, xin = (t["dqkv"], x) if case.label["case"].startswith("qkv") else (x, h)

        def cuda_bgradb():
            out = _cuda_backends.linear_wgrad(dy, xin, True)
            if out is None:
                raise RuntimeError("cuBLASLt has no BGRADB algorithm for this problem")
            return out

        wgrad = {"triton": lambda: kernels_linear.linear_wgrad(dy, xin, True), "cuda": cuda_bgradb}
        return {
            "torch": lambda: (torch.matmul(dy.t(), xin), dy.sum(0, dtype=torch.float32)),
            **{f"fastvit_{bk}": wgrad[bk] for bk in backends if bk in wgrad},
        }
    if case.label["case"] == "fc1+gelu":
        run_ = lambda f, **bk: f(x, w1, b1, activation="gelu", **bk)  # noqa: E731
    elif case.label["case"] == "fc2+residual":
        run_ = lambda f, **bk: f(h, w2, b2, residual=x, **bk)  # noqa: E731
    else:

        def run_(f, **bk):
            ln = ops.layer_norm if bk else ops.layer_norm_ref
            return f(f(ln(x, ln_w, ln_b, 1e-6, **bk), w1, b1, activation="gelu", **bk), w2, b2, residual=x, **bk)

    return {
        "torch": lambda: run_(ops.linear_ref),
        **{f"fastvit_{bk}": lambda bk=bk: run_(ops.linear, backend=bk) for bk in backends},
    }


SPEC = OpSpec(
    name="linear",
    op="linear",
    doc=__doc__,
    cases=cases,
    providers=providers,
    extras=lambda args: {"tokens": TOKENS},
    options=(
        Option(("--models",), {"nargs": "+", "default": ["B", "L", "H"], "choices": sorted(MODELS)}),
        Option(("--batches",), {"type": int, "nargs": "+", "default": [1, 64, 128]}),
        Option(("--wgrad",), {"action": "store_true", "help": "also time dW + fused dbias (no-activation linears)"}),
    ),
)

if __name__ == "__main__":
    raise SystemExit(run(SPEC))

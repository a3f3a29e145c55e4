"""LayerNorm with the fused residual add: fastvit (per backend) vs torch (``fastvit.ops.layer_norm_ref``: add, then
F.layer_norm).

Shapes are ViT's: rows = batch x 197 tokens, widths 384 (S), 768 (B), 1024 (L), 1280 (H), fp16 and bf16.
GB/s count the bytes that must move (read x and the residual, write y and x + residual: 4 x rows x width x
element size; the weights are negligible), against the device copy bandwidth measured in the same run.
``fwd_bwd`` takes gradients for x, the residual, the weight and the bias.

    python benchmarks/bench_layer_norm.py [--batches 64 256] [--widths 384 768 1024 1280] [--backward]
"""

from __future__ import annotations

import torch
from _harness.opbench import Case, OpSpec, Option, run

from fastvit import ops

TOKENS = 197


def _inputs(m: int, width: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    x, residual = (torch.randn(m, width, device=device, dtype=dtype) for _ in range(2))
    weight, bias = (torch.randn(width, device=device, dtype=dtype) for _ in range(2))
    return {"x": x, "residual": residual, "weight": weight, "bias": bias}


def cases(args, dtype):
    for batch in args.batches:
        for width in args.widths:
            m = batch * TOKENS
            yield Case(
                {"rows": m, "width": width},
                lambda dev, dt, m=m, w=width: _inputs(m, w, dev, dt),
                bytes={"fwd": 4 * m * width * dtype.itemsize},
                leaves=("x", "residual", "weight", "bias"),
            )


def providers(case, t, backends):
    call = {"x": t["x"], "weight": t["weight"], "bias": t["bias"], "eps": 1e-6, "residual": t["residual"]}
    return {
        "torch": lambda: ops.layer_norm_ref(**call),
        **{f"fastvit_{bk}": lambda bk=bk: ops.layer_norm(**call, backend=bk) for bk in backends},
    }


SPEC = OpSpec(
    name="layer_norm",
    op="layer_norm",
    doc=__doc__,
    cases=cases,
    providers=providers,
    ceiling="copy",
    options=(
        Option(("--batches",), {"type": int, "nargs": "+", "default": [64, 256]}),
        Option(("--widths",), {"type": int, "nargs": "+", "default": [384, 768, 1024, 1280]}),
    ),
)

if __name__ == "__main__":
    raise SystemExit(run(SPEC))

"""T2T-ViT soft split (+ the LayerNorm that follows it): fastvit (per backend) vs torch
(``fastvit.ops.soft_split_ref``: tokens -> image, F.unfold, transpose, F.layer_norm with eps 1e-5, the T2T
Token_transformer's norm1).

The three soft splits of T2T-ViT at 224 and their inputs:

* stage 0: image (B, 3, 224, 224), Unfold(7, 4, 2) -> (B, 3136, 147)
* stage 1: tokens (B, 3136, 64) on a 56 x 56 grid, Unfold(3, 2, 1) -> (B, 784, 576)
* stage 2: tokens (B, 784, 64) on a 28 x 28 grid, Unfold(3, 2, 1) -> (B, 196, 576)

``--no-norm`` times the unfold alone (the torch ref then returns a transposed view; ``.contiguous()`` makes both
produce the same tensor). GB/s count the bytes that must move (read the input once, write the output) against
the device copy bandwidth measured in the same run (the issue's goal with LayerNorm: >= 2x torch).
``fwd_bwd`` takes gradients for the token input and the LayerNorm parameters (stage 0's image needs none).

    python benchmarks/bench_soft_split.py [--stages 0 1 2] [--batches 1 64 256] [--no-norm] [--backward]
"""

from __future__ import annotations

import torch
from _harness.opbench import Case, OpSpec, Option, run

from fastvit import ops

# stage -> (input shape without batch, hw for token input or None, kernel, stride, padding)
STAGES = {
    0: ((3, 224, 224), None, 7, 4, 2),
    1: ((3136, 64), (56, 56), 3, 2, 1),
    2: ((784, 64), (28, 28), 3, 2, 1),
}


def _geometry(stage: int) -> tuple[int, int, int]:
    shape, hw, k, s, p = STAGES[stage]
    channels, (height, width) = (shape[0], shape[1:]) if hw is None else (shape[1], hw)
    tokens = ((height + 2 * p - k) // s + 1) * ((width + 2 * p - k) // s + 1)
    return channels, tokens, channels * k * k


def _inputs(batch, stage, device, dtype):
    features = _geometry(stage)[2]
    return {
        "x": torch.randn(batch, *STAGES[stage][0], device=device, dtype=dtype),
        "norm_weight": 1 + 0.1 * torch.randn(features, device=device, dtype=dtype),
        "norm_bias": 0.1 * torch.randn(features, device=device, dtype=dtype),
    }


def cases(args, dtype):
    for stage in args.stages:
        _, tokens, features = _geometry(stage)
        leaves = (("x",) if STAGES[stage][1] else ()) + (() if args.no_norm else ("norm_weight", "norm_bias"))
        for batch in args.batches:
            nbytes = (batch * torch.Size(STAGES[stage][0]).numel() + batch * tokens * features) * dtype.itemsize
            yield Case(
                {"stage": f"{stage}: {tokens}x{features}", "batch": batch, "norm": not args.no_norm},
                lambda dev, dt, b=batch, s=stage: _inputs(b, s, dev, dt),
                bytes={"fwd": nbytes},
                leaves=leaves,
            )


def providers(case, t, backends):
    _, hw, k, s, p = STAGES[int(case.label["stage"].split(":")[0])]
    norm = {"norm_weight": t["norm_weight"], "norm_bias": t["norm_bias"]} if case.label["norm"] else {}
    call = {"kernel_size": k, "stride": s, "padding": p, "hw": hw, "norm_eps": 1e-5, **norm}
    return {
        "torch": lambda: ops.soft_split_ref(t["x"], **call).contiguous(),
        **{f"fastvit_{bk}": lambda bk=bk: ops.soft_split(t["x"], **call, backend=bk) for bk in backends},
    }


SPEC = OpSpec(
    name="soft_split",
    op="soft_split",
    doc=__doc__,
    cases=cases,
    providers=providers,
    ceiling="copy",
    options=(
        Option(("--stages",), {"type": int, "nargs": "+", "default": [0, 1, 2], "choices": sorted(STAGES)}),
        Option(("--batches",), {"type": int, "nargs": "+", "default": [1, 64, 256]}),
        Option(("--no-norm",), {"action": "store_true", "help": "the unfold without the fused LayerNorm"}),
    ),
)

if __name__ == "__main__":
    raise SystemExit(run(SPEC))

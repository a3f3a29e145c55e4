"""T2T-ViT soft split (+ the LayerNorm that follows it): fastvit vs the torch composition.

The three soft splits of T2T-ViT at 224 and their inputs:

* stage 0: image (B, 3, 224, 224), Unfold(7, 4, 2) -> (B, 3136, 147)
* stage 1: tokens (B, 3136, 64) on a 56 x 56 grid, Unfold(3, 2, 1) -> (B, 784, 576)
* stage 2: tokens (B, 784, 64) on a 28 x 28 grid, Unfold(3, 2, 1) -> (B, 196, 576)

torch: ``x.transpose(1, 2).reshape(B, C, H, W)`` (token stages) -> ``nn.Unfold`` -> ``.transpose(1, 2)``
-> ``F.layer_norm`` (eps 1e-5; the T2T Token_transformer's norm1); fastvit:
``ops.soft_split(x, ..., hw=..., norm_weight=..., norm_bias=...)``. ``--no-norm`` times the unfold alone
(torch then returns a transposed view; ``.contiguous()`` is added so both produce the same tensor).

Reports median ms, GB/s against the bytes that must move (read the input once, write the output) and
that as a fraction of the device copy bandwidth measured in the same run, and the speedup over torch
(the issue's goal with LayerNorm: >= 2x). ``--backward`` adds forward + backward (gradients for the
token input and the LayerNorm parameters; stage 0's image needs none).

    python benchmarks/bench_soft_split.py [--stages 0 1 2] [--batches 1 64 256] [--dtypes bfloat16 float16]
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable

import torch
import torch.nn.functional as F
from bench_utils import (
    copy_bandwidth_gbps,
    kernel_backends,
    markdown_table,
    median_ms,
    require_gpu,
    write_results,
)

# stage -> (input shape without batch, hw for token input or None, kernel, stride, padding)
STAGES = {
    0: ((3, 224, 224), None, 7, 4, 2),
    1: ((3136, 64), (56, 56), 3, 2, 1),
    2: ((784, 64), (28, 28), 3, 2, 1),
}


def _time(fn: Callable[[], object]) -> float:
    fn()  # compile / autotune outside the timed region
    return median_ms(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=sorted(STAGES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--no-norm", action="store_true", help="time the unfold without the fused LayerNorm")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = parser.parse_args()
    require_gpu("bench_soft_split.py")

    from fastvit import ops

    ceiling = copy_bandwidth_gbps()
    print(f"device copy bandwidth (ceiling): {ceiling:.0f} GB/s")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for stage in args.stages:
            shape, hw, k, s, p = STAGES[stage]
            channels = shape[0] if hw is None else shape[1]
            height, width = (shape[1], shape[2]) if hw is None else hw
            features = channels * k * k
            tokens = ((height + 2 * p - k) // s + 1) * ((width + 2 * p - k) // s + 1)
            for batch in args.batches:
                x = torch.randn(batch, *shape, device="cuda", dtype=dtype).requires_grad_(hw is not None)
                nw = (1 + 0.1 * torch.randn(features, device="cuda", dtype=dtype)).requires_grad_()
                nb = (0.1 * torch.randn(features, device="cuda", dtype=dtype)).requires_grad_()
                norm = not args.no_norm
                leaves = ([x] if hw is not None else []) + ([nw, nb] if norm else [])

                def torch_fwd():
                    img = x.transpose(1, 2).reshape(batch, channels, height, width) if hw is not None else x
                    u = F.unfold(img, k, padding=p, stride=s).transpose(1, 2)
                    return F.layer_norm(u, (features,), nw, nb, 1e-5) if norm else u.contiguous()

                def fastvit_fwd(backend: str):
                    return ops.soft_split(
                        x, kernel_size=k, stride=s, padding=p, hw=hw, norm_weight=nw if norm else None,
                        norm_bias=nb if norm else None, norm_eps=1e-5, backend=backend,
                    )  # fmt: skip

                nbytes = (x.numel() + batch * tokens * features) * x.element_size()
                base = None
                chain = "unfold+transpose" + ("+layer_norm" if norm else "+contiguous")
                providers = [(f"torch {chain}", torch_fwd)]
                providers += [
                    (f"fastvit {bk}", functools.partial(fastvit_fwd, bk)) for bk in kernel_backends("soft_split")
                ]
                for name, fn in providers:
                    try:
                        with torch.no_grad():
                            ms = _time(fn)
                    except Exception as exc:  # a backend that cannot run is reported, not hidden
                        note = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                        rows.append(
                            {
                                "dtype": dtype_name,
                                "stage": f"{stage}: {tokens}x{features}",
                                "batch": batch,
                                "provider": name,
                                "note": note,
                            }
                        )
                        continue
                    base = ms if base is None else base
                    row = {
                        "dtype": dtype_name,
                        "stage": f"{stage}: {tokens}x{features}",
                        "batch": batch,
                        "provider": name,
                        "fwd_ms": ms,
                        "GB/s": nbytes / ms / 1e6,
                        "of_copy_bw": nbytes / ms / 1e6 / ceiling,
                        "speedup_vs_torch": base / ms,
                    }
                    if args.backward and leaves:

                        def step(fn=fn):
                            y = fn()
                            torch.autograd.grad(y, leaves, torch.ones_like(y))

                        row["fwd_bwd_ms"] = _time(step)
                    rows.append(row)
    columns = ["dtype", "stage", "batch", "provider", "fwd_ms", "GB/s", "of_copy_bw", "speedup_vs_torch", "note"]
    if args.backward:
        columns.append("fwd_bwd_ms")
    print(markdown_table(rows, columns))
    if not args.no_save:
        print("wrote", write_results("soft_split", rows, {"copy_bandwidth_gbps": ceiling}))


if __name__ == "__main__":
    main()

"""Patch embedding with the class token and position embedding: fastvit vs timm's eager composition.

Per ViT shape (image C x S x S, patch p, width D, N = (S/p)^2 patches, one class token) and dtype, including
the R50 hybrid's 1x1 projection of its 1024-channel feature map (patch 1):

* torch: ``conv2d(x, W, b, stride=p).flatten(2).transpose(1, 2)`` -> ``cat([cls, x], 1)`` -> ``+ pos_embed``
  (timm's PatchEmbed + _pos_embed, cuDNN conv)
* fastvit ``ops.patch_embed(x, W, b, patch_size=p, pos_embed=pos, prefix_tokens=cls)``: one GEMM launch

Reports the median ms, TFLOP/s (2 B N K D, K = C p^2), GB/s against the bytes that must move (read the
image and the weight, write the (B, N + 1, D) tokens) and that as a fraction of the device copy
bandwidth measured in the same run, and the speedup over torch (the issue's goal: >= 2x).
``--backward`` adds forward + backward with gradients for the weight, bias, pos_embed and class token
(the image needs none, as in training).

    python benchmarks/bench_patch_embed.py [--models S B B384 B32 L H R50] [--batches 1 256] [--dtypes bfloat16 float16]
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

# name -> (label, input channels, input size, patch, width)
MODELS = {
    "S": ("DeiT-S/16", 3, 224, 16, 384),
    "B": ("ViT-B/16", 3, 224, 16, 768),
    "B384": ("ViT-B/16@384", 3, 384, 16, 768),
    "B32": ("ViT-B/32", 3, 224, 32, 768),
    "L": ("ViT-L/16", 3, 224, 16, 1024),
    "H": ("ViT-H/14", 3, 224, 14, 1280),
    "R50": ("R50+ViT-B/16@384 1x1 proj", 1024, 24, 1, 768),
}


def _time(fn: Callable[[], object]) -> float:
    fn()  # compile / autotune outside the timed region
    return median_ms(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--channels-last", action="store_true", help="feed a channels_last image")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward (parameters)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = parser.parse_args()
    require_gpu("bench_patch_embed.py")

    from fastvit import ops

    ceiling = copy_bandwidth_gbps()
    print(f"device copy bandwidth (ceiling): {ceiling:.0f} GB/s")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for key in args.models:
            label, chans, size, patch, width = MODELS[key]
            for batch in args.batches:
                grid = size // patch
                n, k = grid * grid, chans * patch * patch
                x = torch.randn(batch, chans, size, size, device="cuda", dtype=dtype)
                if args.channels_last:
                    x = x.to(memory_format=torch.channels_last)
                w = (torch.randn(width, chans, patch, patch, device="cuda") * k**-0.5).to(dtype).requires_grad_()
                b = torch.randn(width, device="cuda", dtype=dtype).requires_grad_()
                cls = torch.randn(1, 1, width, device="cuda", dtype=dtype).requires_grad_()
                pos = torch.randn(1, n + 1, width, device="cuda", dtype=dtype).requires_grad_()
                leaves = [w, b, cls, pos]

                def torch_fwd():
                    t = F.conv2d(x, w, b, stride=patch).flatten(2).transpose(1, 2)
                    return torch.cat([cls.expand(batch, -1, -1), t], dim=1) + pos

                def fastvit_fwd(backend: str):
                    return ops.patch_embed(x, w, b, patch_size=patch, pos_embed=pos, prefix_tokens=cls, backend=backend)

                flops = 2 * batch * n * k * width
                nbytes = (x.numel() + w.numel() + batch * (n + 1) * width) * x.element_size()
                base = None
                providers = [("torch conv+flatten+cat+add", torch_fwd)]
                providers += [
                    (f"fastvit {bk}", functools.partial(fastvit_fwd, bk)) for bk in kernel_backends("patch_embed")
                ]
                for name, fn in providers:
                    try:
                        with torch.no_grad():
                            ms = _time(fn)
                    except Exception as exc:  # a backend that cannot run is reported, not hidden
                        note = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                        rows.append(
                            {"dtype": dtype_name, "model": label, "batch": batch, "provider": name, "note": note}
                        )
                        continue
                    base = ms if base is None else base
                    row = {
                        "dtype": dtype_name,
                        "model": label,
                        "batch": batch,
                        "provider": name,
                        "fwd_ms": ms,
                        "TFLOP/s": flops / ms / 1e9,
                        "GB/s": nbytes / ms / 1e6,
                        "of_copy_bw": nbytes / ms / 1e6 / ceiling,
                        "speedup_vs_torch": base / ms,
                    }
                    if args.backward:

                        def step(fn=fn):
                            y = fn()
                            torch.autograd.grad(y, leaves, torch.ones_like(y))

                        row["fwd_bwd_ms"] = _time(step)
                    rows.append(row)
    columns = [
        "dtype",
        "model",
        "batch",
        "provider",
        "fwd_ms",
        "TFLOP/s",
        "GB/s",
        "of_copy_bw",
        "speedup_vs_torch",
        "note",
    ]
    if args.backward:
        columns.append("fwd_bwd_ms")
    print(markdown_table(rows, columns))
    if not args.no_save:
        print("wrote", write_results("patch_embed", rows, {"copy_bandwidth_gbps": ceiling}))


if __name__ == "__main__":
    main()

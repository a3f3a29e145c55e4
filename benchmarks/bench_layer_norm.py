"""LayerNorm with the fused residual add: fastvit (triton, cuda) vs torch's separate add + layer_norm.

Shapes are ViT's: rows = batch x 197 tokens, widths 384 (S), 768 (B), 1024 (L), 1280 (H), fp16 and bf16.
Reports the median time and the achieved GB/s against the bytes that must move (read x and the
residual, write y and x + residual: 4 x rows x width x element size; weights are negligible), and
that bandwidth as a fraction of the device copy bandwidth measured in the same run.

    python benchmarks/bench_layer_norm.py [--batches 64 256] [--widths 384 768 1024 1280] [--backward]
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1024, 1280])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = parser.parse_args()
    require_gpu("bench_layer_norm.py")

    from fastvit import ops

    ceiling = copy_bandwidth_gbps()
    print(f"device copy bandwidth (ceiling): {ceiling:.0f} GB/s")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in args.batches:
            for width in args.widths:
                m = batch * 197
                x = torch.randn(m, width, device="cuda", dtype=dtype)
                r = torch.randn_like(x)
                w = torch.randn(width, device="cuda", dtype=dtype)
                b = torch.randn(width, device="cuda", dtype=dtype)
                nbytes = 4 * m * width * x.element_size()

                def torch_fwd():
                    z = x + r
                    return F.layer_norm(z, (width,), w, b, 1e-6), z

                providers = {"torch add+layer_norm": torch_fwd}
                for backend in kernel_backends("layer_norm"):
                    providers[f"fastvit {backend}"] = lambda backend=backend: ops.layer_norm(
                        x, w, b, 1e-6, residual=r, backend=backend
                    )
                base = None
                for name, fn in providers.items():
                    try:
                        fn()
                        ms = median_ms(fn)
                    except Exception as exc:  # an unavailable backend is reported, not hidden
                        rows.append(
                            {
                                "dtype": dtype_name,
                                "rows": m,
                                "width": width,
                                "provider": name,
                                "note": f"not run: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                            }
                        )
                        continue
                    gbps = nbytes / ms / 1e6
                    base = ms if base is None else base
                    row = {
                        "dtype": dtype_name,
                        "rows": m,
                        "width": width,
                        "provider": name,
                        "fwd_ms": ms,
                        "GB/s": gbps,
                        "of_copy_bw": gbps / ceiling,
                        "speedup_vs_torch": base / ms,
                    }
                    if args.backward:
                        xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
                        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
                        if name.startswith("torch"):

                            def step():
                                z = xg + rg
                                y = F.layer_norm(z, (width,), wg, bg, 1e-6)
                                torch.autograd.backward((y, z), (torch.ones_like(y), torch.ones_like(z)))
                        else:
                            bk = name.split()[-1]

                            def step(bk=bk):
                                y, z = ops.layer_norm(xg, wg, bg, 1e-6, residual=rg, backend=bk)
                                torch.autograd.backward((y, z), (torch.ones_like(y), torch.ones_like(z)))

                        row["fwd_bwd_ms"] = median_ms(step)
                    rows.append(row)
    columns = ["dtype", "rows", "width", "provider", "fwd_ms", "GB/s", "of_copy_bw", "speedup_vs_torch"]
    if args.backward:
        columns.append("fwd_bwd_ms")
    columns.append("note")
    print(markdown_table(rows, columns))
    if not args.no_save:
        print("wrote", write_results("layer_norm", rows, {"copy_bandwidth_gbps": ceiling}))


if __name__ == "__main__":
    main()

"""Fused Linear epilogues and the MLP sub-block: fastvit vs torch's eager composition.

Per ViT MLP shape (rows M = batch x 197 tokens, width D, hidden 4D) and dtype:

* fc1  ``gelu(x @ W1.T + b1)``:     fastvit ``ops.linear(..., activation="gelu")`` vs ``F.gelu(F.linear(...))``
* fc2  ``h @ W2.T + b2 + x``:        fastvit ``ops.linear(..., residual=x)`` vs ``F.linear(...) + x``
* mlp  ``x + fc2(gelu(fc1(LN(x))))``: ops.layer_norm + the two fused linears vs timm's eager
  LayerNorm -> Linear -> GELU -> Linear -> add

and, as the ceiling for each GEMM, ``torch.matmul`` of the same operands without any epilogue (the
issue's goal: the fused GEMM at >= 80% of its TFLOP/s, the sub-block >= 1.3x the eager composition in
bf16 at ViT-B/16 batch 256). Reports median ms, TFLOP/s (2 M N K per GEMM), the fraction of
torch.matmul's TFLOP/s and the speedup over the torch composition; ``--backward`` adds forward +
backward times.

    python benchmarks/bench_linear.py [--models S B L H] [--batches 1 64 128 256] [--dtypes bfloat16] [--backward]
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from bench_utils import kernel_backends, markdown_table, median_ms, require_gpu, write_results

TOKENS = 197
BACKENDS = kernel_backends("linear")  # fastvit backends timed beside the torch composition
MODELS = {"S": ("DeiT-S", 384), "B": ("ViT-B", 768), "L": ("ViT-L", 1024), "H": ("ViT-H", 1280)}  # MLP ratio 4


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list) -> Callable[[], None]:
    def step() -> None:
        y = fn()
        torch.autograd.grad(y, leaves, torch.ones_like(y))

    return step


def _time(fn: Callable[[], object]) -> float:
    fn()  # compile / autotune outside the timed region
    return median_ms(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["B", "L", "H"], choices=sorted(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--backward", action="store_true", help="also time forward + backward (input and weights)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = parser.parse_args()
    require_gpu("bench_linear.py")

    from fastvit import ops

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for model in args.models:
            model_name, d = MODELS[model]
            for batch in args.batches:
                m = batch * TOKENS

                def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
                    return (torch.randn(*shape, device="cuda") * scale).to(dtype)

                x = rand(m, d)
                h = rand(m, 4 * d)
                w1, b1 = rand(4 * d, d, scale=d**-0.5), rand(4 * d, scale=0.1)
                w2, b2 = rand(d, 4 * d, scale=(4 * d) ** -0.5), rand(d, scale=0.1)
                ln_w, ln_b = rand(d, scale=0.1) + 1, rand(d, scale=0.1)
                gemm_flops = 2 * m * d * 4 * d  # fc1 and fc2 each

                cases = {
                    "fc1+gelu": (gemm_flops, lambda: torch.matmul(x, w1.t()), [x, w1, b1], {
                        "torch F.linear+F.gelu": lambda: F.gelu(F.linear(x, w1, b1)),
                        **{f"fastvit {bk}": lambda bk=bk: ops.linear(x, w1, b1, activation="gelu", backend=bk)
                           for bk in BACKENDS},
                    }),
                    "fc2+residual": (gemm_flops, lambda: torch.matmul(h, w2.t()), [h, w2, b2, x], {
                        "torch F.linear+add": lambda: F.linear(h, w2, b2) + x,
                        **{f"fastvit {bk}": lambda bk=bk: ops.linear(h, w2, b2, residual=x, backend=bk)
                           for bk in BACKENDS},
                    }),
                    "mlp sub-block": (2 * gemm_flops, None, [x, ln_w, ln_b, w1, b1, w2, b2], {
                        "timm eager LN+fc1+GELU+fc2+add": lambda: x + F.linear(
                            F.gelu(F.linear(F.layer_norm(x, (d,), ln_w, ln_b, 1e-6), w1, b1)), w2, b2
                        ),
                        **{f"fastvit {bk} LN+linear(gelu)+linear(residual)": lambda bk=bk: ops.linear(
                            ops.linear(ops.layer_norm(x, ln_w, ln_b, 1e-6, backend=bk), w1, b1,
                                       activation="gelu", backend=bk),
                            w2, b2, residual=x, backend=bk,
                        ) for bk in BACKENDS},
                    }),
                }  # fmt: skip
                for case, (flops, matmul, leaves, providers) in cases.items():
                    matmul_tflops = flops / _time(matmul) / 1e9 if matmul is not None else None
                    base_ms = None
                    for name, fn in providers.items():
                        row = {"dtype": dtype_name, "model": model_name, "M": m, "K": d, "case": case,
                               "provider": name}  # fmt: skip
                        try:
                            ms = _time(fn)
                        except Exception as exc:  # a provider that cannot run is reported, not hidden
                            rows.append({**row, "note": f"not run: {type(exc).__name__}: {str(exc).splitlines()[0]}"})
                            continue
                        base_ms = ms if base_ms is None else base_ms
                        tflops = flops / ms / 1e9
                        row.update({"fwd_ms": ms, "TFLOP/s": tflops, "speedup_vs_torch": base_ms / ms})
                        if matmul_tflops is not None:
                            row["of_matmul_TFLOP/s"] = tflops / matmul_tflops
                        if args.backward:
                            for t in leaves:
                                t.requires_grad_(True)
                            row["fwd_bwd_ms"] = _time(_fwd_bwd(fn, leaves))
                            for t in leaves:
                                t.requires_grad_(False)
                        rows.append(row)
    columns = ["dtype", "model", "M", "K", "case", "provider", "fwd_ms", "TFLOP/s", "of_matmul_TFLOP/s",
               "speedup_vs_torch"]  # fmt: skip
    if args.backward:
        columns.append("fwd_bwd_ms")
    columns.append("note")
    print(markdown_table(rows, columns))
    if not args.no_save:
        print("wrote", write_results("linear", rows, {"tokens": TOKENS}))


if __name__ == "__main__":
    main()

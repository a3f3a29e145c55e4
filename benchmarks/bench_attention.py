"""Attention kernel benchmark: fastvit's Triton flash attention vs torch SDPA backends (and flash_attn).

    python benchmarks/bench_attention.py [--dtype bf16] [--modes fwd fwd_bwd] [--batch auto 1] [--quick]

For each ViT attention shape (SHAPES), at a batch that fills the GPU and at batch 1, forward and
forward+backward, it reports the median time (``triton.testing.do_bench`` through bench_utils) and, apart,
the first call (``cold_ms``: for fastvit that includes autotuning and compilation):

* ``fastvit``        ops.attention on contiguous (B, H, N, D) q, k, v (SDPA's own layout)
* ``fastvit_packed`` ops.attention_qkvpacked on (B, N, 3*H*D) -> (B, N, H*D) (the no-copy model path)
* ``sdpa_<backend>`` F.scaled_dot_product_attention under each SDPA backend that accepts the input
  (flash, efficient, cudnn, math)
* ``flash_attn``     flash_attn_qkvpacked_func on (B, N, 3, H, D), when the package is installed

FLOPs: forward 4*B*H*N^2*D; forward+backward 3.5x that (the backward's five matmuls vs the forward's two).
TFLOP/s are reported with their fraction of the matmul ceiling measured in the same run (8192^3
torch.matmul in the benchmark's dtype), and fastvit's speedup over the fastest non-math SDPA backend.
Results: benchmarks/results/attention_<gpu>_<date>.json (with the environment record of
_harness.report.environment, as benchmarks/run.py writes it) and
a .csv beside it. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from bench_utils import markdown_table, median_ms, require_gpu, write_results

from fastvit._timing import matmul_ceiling_tflops

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
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _providers(B: int, H: int, N: int, D: int, dtype: torch.dtype, backward: bool) -> dict[str, Callable]:
    """name -> zero-argument callable running one step (forward, or forward + backward)."""
    from fastvit import ops

    def step(run: Callable[[], torch.Tensor], inputs: list[torch.Tensor], dout: torch.Tensor) -> Callable[[], Any]:
        if not backward:
            return run
        return lambda: torch.autograd.grad(run(), inputs, dout)  # no .grad accumulation in the timing

    providers: dict[str, Callable] = {}
    q, k, v = [torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=backward) for _ in range(3)]
    dout_bhnd = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    providers["fastvit"] = step(lambda: ops.attention(q, k, v, backend="triton"), [q, k, v], dout_bhnd)
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype, requires_grad=backward)
    dout_packed = torch.randn(B, N, H * D, device="cuda", dtype=dtype)
    providers["fastvit_packed"] = step(lambda: ops.attention_qkvpacked(qkv, H, backend="triton"), [qkv], dout_packed)
    from torch.nn.attention import sdpa_kernel

    for name, sdp_backend in _sdpa_backends().items():
        if name == "math" and B * H * N * N > 2**31:  # the math path materialises the N x N scores
            continue

        def run(sdp_backend=sdp_backend):
            with sdpa_kernel(sdp_backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            run()  # raises when this backend cannot take the input (dtype, head dim, GPU)
        except RuntimeError:
            continue
        providers[f"sdpa_{name}"] = step(run, [q, k, v], dout_bhnd)
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except ImportError:
        pass
    else:
        packed5 = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=backward)
        if dtype != torch.float32:
            dout_fa = torch.randn(B, N, H, D, device="cuda", dtype=dtype)
            providers["flash_attn"] = step(lambda: flash_attn_qkvpacked_func(packed5), [packed5], dout_fa)
    return providers


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    dtype = DTYPES[args.dtype]
    ceiling = matmul_ceiling_tflops(dtype)
    print(f"{torch.cuda.get_device_name()}: {args.dtype} matmul ceiling (8192^3 torch.matmul) {ceiling:.0f} TFLOP/s")
    rows: list[dict[str, Any]] = []
    for name, H, N, D, full_batch in SHAPES[:2] if args.quick else SHAPES:
        for batch in args.batch:
            B = full_batch if batch == "auto" else int(batch)
            for mode in args.modes:
                flops = 4 * B * H * N * N * D * (3.5 if mode == "fwd_bwd" else 1.0)
                case = {"shape": name, "B": B, "H": H, "N": N, "D": D, "dtype": args.dtype, "mode": mode}
                try:
                    providers = _providers(B, H, N, D, dtype, mode == "fwd_bwd")
                except torch.cuda.OutOfMemoryError:
                    rows.append({**case, "provider": "all", "note": "out of memory"})
                    continue
                case_rows = []
                for provider, fn in providers.items():
                    try:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        fn()
                        end.record()
                        torch.cuda.synchronize()
                        ms = median_ms(fn)
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # reported, not hidden
                        rows.append({**case, "provider": provider, "note": f"not run: {str(exc).splitlines()[0][:80]}"})
                        continue
                    tflops = flops / (ms * 1e-3) / 1e12
                    case_rows.append({**case, "provider": provider, "ms": ms, "cold_ms": start.elapsed_time(end),
                                      "TFLOP/s": tflops, "of_matmul": tflops / ceiling})  # fmt: skip
                sdpa = [r for r in case_rows if r["provider"].startswith("sdpa_") and r["provider"] != "sdpa_math"]
                if sdpa:
                    fastest = min(sdpa, key=lambda r: r["ms"])
                    for r in case_rows:
                        if r["provider"].startswith("fastvit"):
                            r["vs_fastest_sdpa"] = fastest["ms"] / r["ms"]
                            r["fastest_sdpa"] = fastest["provider"]
                rows.extend(case_rows)
                del providers
                torch.cuda.empty_cache()
    return rows, ceiling


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    parser.add_argument("--batch", nargs="+", default=["auto", "1"], help="'auto' (fills the GPU) and/or integers")
    parser.add_argument("--quick", action="store_true", help="only the ViT-B/L 224 shapes")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json/.csv")
    args = parser.parse_args(argv)
    require_gpu("bench_attention.py")

    rows, ceiling = run(args)
    columns = ["shape", "B", "H", "N", "D", "mode", "provider", "ms", "cold_ms", "TFLOP/s", "of_matmul",
               "vs_fastest_sdpa", "note"]  # fmt: skip
    print(markdown_table(rows, columns))
    if not args.no_save:
        path = write_results("attention", rows, {"matmul_ceiling_tflops": ceiling}, csv_too=True)
        print("wrote", path, "and", path[: -len(".json")] + ".csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention kernel benchmark: fastvit's Triton flash attention vs torch SDPA backends (and flash_attn).

    python benchmarks/bench_attention.py [--dtype bf16] [--modes fwd fwd_bwd] [--batch auto 1] [--quick]

For each ViT attention shape (below), at a batch that fills the GPU and at batch 1, forward and
forward+backward, it times with ``triton.testing.do_bench`` (median and 20/80% quantiles, warm-up first;
the first fastvit call, which includes autotuning, is reported separately as ``cold_ms``):

* ``fastvit``        ops.attention on contiguous (B, H, N, D) q, k, v (SDPA's own layout)
* ``fastvit_packed`` ops.attention_qkvpacked on (B, N, 3*H*D) -> (B, N, H*D) (the no-copy model path)
* ``sdpa_<backend>`` F.scaled_dot_product_attention under each SDPA backend that accepts the input
  (flash, efficient, cudnn, math)
* ``flash_attn``     flash_attn_qkvpacked_func on (B, N, 3, H, D), when the package is installed

FLOPs: forward 4*B*H*N^2*D; forward+backward 3.5x that (the backward's five matmuls vs two). TFLOP/s are
reported beside the bf16 matmul ceiling measured in the same run (8192^3 torch.matmul). Results go to
benchmarks/results/attention_<gpu>_<timestamp>.{json,csv} with GPU, driver, versions and git sha.
Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:
        return "unknown"


def _environment() -> dict[str, Any]:
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.check_output(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True
        ).splitlines()[0]
    except Exception:
        driver = "unknown"
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _bench(fn: Callable[[], Any], grad_to_none: Optional[list] = None) -> tuple[float, float, float]:
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=200, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return p50, p20, p80


def matmul_ceiling_tflops(dtype: torch.dtype) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms, _, _ = _bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _sdpa_backends() -> dict[str, Any]:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3
        return {}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _providers(B: int, H: int, N: int, D: int, dtype: torch.dtype, backward: bool) -> dict[str, Callable]:
    """name -> zero-argument callable running one step (forward, or forward + backward)."""
    from fastvit import ops

    def step(run: Callable[[], torch.Tensor], dout: Optional[torch.Tensor]) -> Callable[[], None]:
        if not backward:
            return lambda: run()
        return lambda: run().backward(dout)

    providers: dict[str, Callable] = {}
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=backward) for _ in range(3))
    dout_bhnd = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    providers["fastvit"] = step(lambda: ops.attention(q, k, v, backend="triton"), dout_bhnd)
    qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=dtype, requires_grad=backward)
    dout_packed = torch.randn(B, N, H * D, device="cuda", dtype=dtype)
    providers["fastvit_packed"] = step(lambda: ops.attention_qkvpacked(qkv, H, backend="triton"), dout_packed)
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
        providers[f"sdpa_{name}"] = step(run, dout_bhnd)
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except ImportError:
        pass
    else:
        packed5 = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=backward)
        if dtype != torch.float32:
            dout_fa = torch.randn(B, N, H, D, device="cuda", dtype=dtype)
            providers["flash_attn"] = step(lambda: flash_attn_qkvpacked_func(packed5), dout_fa)
    return providers


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    env = _environment()
    ceiling = matmul_ceiling_tflops(torch.bfloat16 if dtype == torch.float32 else dtype)
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}  sha {env['git_sha'][:10]}")
    print(f"# {args.dtype} matmul ceiling (8192^3): {ceiling:.0f} TFLOP/s")
    rows = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    for name, H, N, D, full_batch in shapes:
        for batch in args.batch:
            B = full_batch if batch == "auto" else int(batch)
            for mode in args.modes:
                backward = mode == "fwd_bwd"
                flops = 4 * B * H * N * N * D * (3.5 if backward else 1.0)
                try:
                    providers = _providers(B, H, N, D, dtype, backward)
                except torch.cuda.OutOfMemoryError:
                    print(f"{name} B={B} {mode}: out of memory, skipped")
                    continue
                results = {}
                for provider, fn in providers.items():
                    try:
                        cold = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        cold[0].record()
                        fn()
                        cold[1].record()
                        torch.cuda.synchronize()
                        p50, p20, p80 = _bench(fn)
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                        print(f"{name} B={B} {mode} {provider}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
                        continue
                    tflops = flops / (p50 * 1e-3) / 1e12
                    results[provider] = p50
                    rows.append({
                        "shape": name, "B": B, "H": H, "N": N, "D": D, "dtype": args.dtype, "mode": mode,
                        "provider": provider, "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                        "cold_ms": cold[0].elapsed_time(cold[1]), "tflops": tflops,
                        "fraction_of_matmul_ceiling": tflops / ceiling, **env,
                    })  # fmt: skip
                    print(f"{name:12s} B={B:<4d} {mode:7s} {provider:15s} {p50:8.3f} ms  {tflops:6.1f} TFLOP/s")
                sdpa = {p: ms for p, ms in results.items() if p.startswith("sdpa_") and p != "sdpa_math"}
                if sdpa and "fastvit" in results:
                    best = min(sdpa, key=sdpa.get)
                    for ours in ("fastvit", "fastvit_packed"):
                        if ours in results:
                            print(f"{'':12s} {ours} speedup vs fastest SDPA ({best}): {sdpa[best] / results[ours]:.2f}x")
                del providers
                torch.cuda.empty_cache()
    return rows


def write_results(rows: list[dict[str, Any]], out_dir: Path) -> None:
    if not rows:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = rows[0]["gpu"].replace(" ", "_")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = out_dir / f"attention_{gpu}_{stamp}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"# wrote {stem}.json and .csv")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    parser.add_argument("--batch", nargs="+", default=["auto", "1"], help="'auto' (fills the GPU) and/or integers")
    parser.add_argument("--quick", action="store_true", help="only the ViT-B/L 224 shapes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure.")
        return 0
    write_results(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

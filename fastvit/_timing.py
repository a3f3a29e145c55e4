"""Timing and peak-memory helpers shared by every benchmark and ``python -m fastvit.selftest``.

Two ways to time, one home: :func:`time_calls` (model-level: host-timed first call, warm-up until
stable, CUDA-event median over rotated inputs) and :func:`median_ms` (kernel-level:
``triton.testing.do_bench``'s median with the L2 flushed between runs), plus the ceilings measured in
the same run (:func:`copy_bandwidth_gbps`, :func:`matmul_ceiling_tflops`).

The method (also the README's): the first call is timed on its own with a host clock and reported
separately (it carries compilation, autotuning and allocator warm-up); then warm-up calls continue
until the per-call time is stable (two consecutive windows within ``stable_tol`` of each other), so
``torch.compile`` and Triton autotuning are finished before anything is timed; then ``iters`` calls
are timed one by one, with CUDA events on a GPU (host clock plus synchronisation on the CPU), each
call on the next of several input buffers so repeated calls do not measure a warm cache. The result
carries the median (the number reported), the mean, the 10th and 90th percentiles and the number of
calls. Clocks are left as the machine has them.

``time_calls`` is the reusable entry point for ``benchmarks/bench_*.py`` as well::

    from fastvit._timing import time_calls
    t = time_calls(lambda x: op(x), [torch.randn(shape, device="cuda") for _ in range(3)])
    print(t.median_ms, t.first_call_s)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

__all__ = [
    "MIN_TIMED_ITERS",
    "Timing",
    "copy_bandwidth_gbps",
    "matmul_ceiling_tflops",
    "median_ms",
    "peak_memory_gib",
    "random_inputs",
    "synchronize",
    "time_calls",
]

# The method's floor: a median over fewer calls is too noisy to quote.
MIN_TIMED_ITERS = 20


@dataclass
class Timing:
    """One timed function. Times in milliseconds per call unless named otherwise.

    Args:
        median_ms: median over the timed calls (the reported number).
        mean_ms: mean over the timed calls (the mmseg fps protocol divides by the total).
        p10_ms: 10th percentile.
        p90_ms: 90th percentile.
        iters: number of timed calls.
        warmup_calls: calls made before timing, the first call included.
        warmup_converged: False when the warm-up hit its time cap before the call time settled.
        first_call_s: wall time of the very first call (compilation, autotuning), in seconds.
        clock: "cuda events" or "host clock".
    """

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    iters: int
    warmup_calls: int
    warmup_converged: bool
    first_call_s: float
    clock: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(inputs: Sequence[Any]) -> torch.device:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
        if isinstance(x, (tuple, list)):
            for y in x:
                if isinstance(y, torch.Tensor):
                    return y.device
    return torch.device("cpu")


def _host_time(fn: Callable[[Any], Any], inputs: Sequence[Any], start: int, calls: int, device: torch.device) -> float:
    """Seconds per call over ``calls`` calls, synchronised at both ends."""
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(inputs[(start + i) % len(inputs)])
    synchronize(device)
    return (time.perf_counter() - t0) / calls


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_calls(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    *,
    iters: int = 30,
    warmup: Union[str, int] = "auto",
    min_warmup_calls: int = 5,
    stable_tol: float = 0.1,
    max_warmup_s: float = 60.0,
    device: Optional[torch.device] = None,
) -> Timing:
    """Time ``fn(x)`` over the buffers in ``inputs`` (rotating), after warm-up.

    Args:
        fn: called with one element of ``inputs`` per call; its result is discarded.
        inputs: several input buffers (3 or more recommended) with random real values, not zeros.
        iters: timed calls; at least ``MIN_TIMED_ITERS`` (20).
        warmup: "auto" (first call, then windows of calls until the time per call is stable, at
            least ``min_warmup_calls`` calls and at most ``max_warmup_s`` seconds), or an exact
            number of warm-up calls including the first (the mmseg protocol uses 5).
        min_warmup_calls: fewest warm-up calls in "auto" mode, the first call included.
        stable_tol: relative change between two consecutive warm-up windows that counts as stable.
        max_warmup_s: cap on the "auto" warm-up after the first call.
        device: where ``fn`` runs; by default the device of the first tensor in ``inputs``.

    Returns:
        A :class:`Timing`.
    """
    if not inputs:
        raise ValueError("time_calls: inputs is empty; pass one or more input buffers (several, to rotate)")
    if iters < MIN_TIMED_ITERS:
        raise ValueError(f"time_calls: iters={iters} is below the method's minimum of {MIN_TIMED_ITERS} timed calls")
    if not (warmup == "auto" or (isinstance(warmup, int) and warmup >= 1)):
        raise ValueError(f"time_calls: warmup={warmup!r}; expected 'auto' or an int >= 1 (calls, the first included)")
    device = device or _device_of(inputs)

    first_call_s = _host_time(fn, inputs, 0, 1, device)
    calls = 1
    converged = True
    if warmup == "auto":
        window = max(3, len(inputs))
        deadline = time.perf_counter() + max_warmup_s
        previous = _host_time(fn, inputs, calls, window, device)
        calls += window
        while True:
            current = _host_time(fn, inputs, calls, window, device)
            calls += window
            if calls >= min_warmup_calls and abs(current - previous) <= stable_tol * previous:
                break
            if time.perf_counter() > deadline:
                converged = False
                break
            previous = current
    else:
        for i in range(1, warmup):
            fn(inputs[i % len(inputs)])
        calls = warmup

    samples: list[float] = []
    if device.type == "cuda":
        clock = "cuda events"
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        synchronize(device)
        for i in range(iters):
            starts[i].record()
            fn(inputs[(calls + i) % len(inputs)])
            ends[i].record()
        synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        clock = "host clock"
        for i in range(iters):
            t0 = time.perf_counter()
            fn(inputs[(calls + i) % len(inputs)])
            samples.append((time.perf_counter() - t0) * 1e3)
    ordered = sorted(samples)
    return Timing(
        median_ms=statistics.median(ordered),
        mean_ms=statistics.fmean(ordered),
        p10_ms=_quantile(ordered, 0.1),
        p90_ms=_quantile(ordered, 0.9),
        iters=iters,
        warmup_calls=calls,
        warmup_converged=converged,
        first_call_s=first_call_s,
        clock=clock,
    )


def peak_memory_gib(fn: Callable[[Any], Any], x: Any, device: torch.device) -> Optional[float]:
    """Peak ``torch.cuda.max_memory_allocated`` during one ``fn(x)`` call, in GiB (None on the CPU).

    Everything alive during the call counts (weights, optimizer state, inputs), as in mmseg's "Mem".
    """
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(x)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def random_inputs(
    shape: Sequence[int], *, count: int = 3, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """``count`` independent standard-normal buffers (real-valued, never zeros) to rotate through."""
    return [torch.randn(*shape, device=device, dtype=dtype) for _ in range(count)]


def median_ms(fn: Callable[[], Any], *, warmup_ms: int = 50, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn()`` by ``triton.testing.do_bench`` (warm-up, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (read + write bytes per second): the ceiling for memory-bound ops."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def matmul_ceiling_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    """Measured ``torch.matmul`` TFLOP/s at n x n x n in ``dtype``: the ceiling for GEMM-like ops."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b) * 1e-3) / 1e12

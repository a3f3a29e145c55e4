"""Numerical checking shared by tests and benchmarks: the tolerance table and the three-way rule.

Elementwise and normalisation ops compare against their fp32 reference with the per-dtype atol/rtol
below (the one place they are kept). Attention and GEMM-like ops use :func:`assert_three_way`: the
kernel's error against an fp32/fp64 reference must be at most ``factor`` times the error of the same
PyTorch computation done in the kernel's dtype, plus a floor at that dtype's rounding noise.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from fastvit.ops import _library

__all__ = ["TOLERANCES", "assert_close", "assert_three_way", "poisoned_outputs"]

# dtype -> (atol, rtol) for elementwise / normalisation ops, outputs and gradients alike.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Gradients that are sums over many rows (dweight, dbias) accumulate more rounding.
GRAD_TOLERANCE_SCALE = 4.0


def _first_mismatches(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int = 5) -> str:
    idx = bad.nonzero()[:limit]
    rows = [
        f"    at {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}"
        for i in idx
    ]
    return "\n".join(rows)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    *,
    scale: float = 1.0,
    name: str = "output",
) -> None:
    """``actual`` within the table's (atol, rtol) * scale of ``expected`` (compared in fp32).

    NaN or inf in ``actual`` where ``expected`` is finite always fails; the message shows the worst
    error and the first mismatching indices.
    """
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    atol, rtol = atol * scale, rtol * scale
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nonfinite = ~torch.isfinite(a) & torch.isfinite(e)
    bad = nonfinite | ((a - e).abs() > atol + rtol * e.abs())
    if bad.any():
        err = (a - e).abs()
        err[~torch.isfinite(err)] = float("inf")
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {a.numel()} elements outside atol={atol:g}, rtol={rtol:g}; "
            f"max abs error {err.max().item():.3g}, {int(nonfinite.sum())} non-finite\n" + _first_mismatches(a, e, bad)
        )


def assert_three_way(
    kernel: torch.Tensor,
    reference: torch.Tensor,
    torch_lowp: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: Optional[float] = None,
    name: str = "output",
) -> None:
    """max|kernel - ref| <= factor * max|torch_lowp - ref| + floor.

    ``reference`` is the computation in fp32/fp64; ``torch_lowp`` the same PyTorch computation in the
    kernel's dtype. ``floor`` defaults to twice the rounding noise of the kernel's dtype at the
    reference's magnitude (FlashAttention-3's rule), so exact low-precision matches do not demand 0.
    """
    ref = reference.detach().double().cpu()
    k = kernel.detach().double().cpu()
    lp = torch_lowp.detach().double().cpu()
    if not torch.isfinite(k).all() and torch.isfinite(ref).all():
        raise AssertionError(f"{name}: kernel output has {int((~torch.isfinite(k)).sum())} non-finite values")
    if floor is None:
        rounded = (ref + 0.3 - 0.3).to(kernel.dtype).double()
        floor = 2 * (rounded - ref).abs().max().item() + 1e-6
    err = (k - ref).abs().max().item()
    err_lp = (lp - ref).abs().max().item()
    bound = factor * err_lp + floor
    if not err <= bound:
        raise AssertionError(
            f"{name}: max error {err:.3g} vs reference exceeds {factor:g} x torch {kernel.dtype} error "
            f"({err_lp:.3g}) + floor {floor:.3g} = {bound:.3g}"
        )


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within the block, every kernel output buffer starts as NaN, so an element a kernel forgets to
    write shows up as a mismatch instead of passing on leftover memory."""
    previous = _library.POISON_OUTPUTS
    _library.POISON_OUTPUTS = True
    try:
        yield
    finally:
        _library.POISON_OUTPUTS = previous

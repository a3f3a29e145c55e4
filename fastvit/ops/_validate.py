"""Argument checks run first by the public ops, so a wrong call names the argument instead of failing
deep inside (``AttributeError: 'NoneType' object has no attribute 'dim'``, a reshape error, a kernel launch
with an empty reduction).

Each public op calls :func:`check_call` with one line before its own validation; the op-specific checks
(dtypes, shapes, devices) stay in the op.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping, Optional

import torch

__all__ = ["check_call", "gemm_backend"]


def check_call(
    op: str,
    required: Mapping[str, Any],
    *,
    optional: Optional[Mapping[str, Any]] = None,
    eps: Optional[Mapping[str, Any]] = None,
) -> None:
    """Validate the generic arguments of op ``op`` (e.g. ``"fastvit.ops.linear"``).

    Args:
        required: name -> value of inputs that must be tensors (None is refused by name).
        optional: name -> value of inputs that are a tensor or None.
        eps: name -> value of epsilons: a real number (not a bool, not a string), finite and > 0.

    Raises:
        TypeError: a required tensor is None or not a tensor, an optional one is neither, or an eps of the
            wrong type.
        ValueError: an eps that is not finite and > 0.
    """
    for name, value in required.items():
        if value is None:
            raise TypeError(f"{op}: {name} is None; it must be a torch.Tensor (a module built without it?)")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (optional or {}).items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(value).__name__}")
    for name, value in (eps or {}).items():
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__} {value!r}")
        if not 0 < value < math.inf:  # NaN fails too; comparisons (not math.isfinite) also take a traced SymFloat
            raise ValueError(f"{op}: {name} must be > 0 and finite, got {value!r}")


def gemm_backend(op: str, in_features: int, backend: Optional[str]) -> Optional[str]:
    """The backend for a GEMM with ``in_features`` = K: unchanged for K >= 1. With K = 0 (an empty
    reduction: the product is all zeros) auto dispatch takes the torch reference, and an explicit
    kernel backend is refused by name, since the fused kernels need K >= 1."""
    if in_features > 0:
        return backend
    if backend in (None, "torch"):
        return "torch"
    raise ValueError(
        f"{op}: x has in_features K=0 (an empty reduction), which the {backend!r} kernels do not take; "
        "use backend='torch' or None (both return bias / residual only)"
    )

"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["device_guard", "rows_view"]


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU the current one for the launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D (rows, last dim) with a unit last stride and non-overlapping rows, copying only if needed.

    Expanded tensors (stride 0, e.g. the gradient of a sum) and column-strided views are made contiguous;
    row-strided views such as a slice of a wider buffer pass through without a copy.
    """
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) == 1 and (t2.shape[0] <= 1 or t2.stride(0) >= t2.shape[-1]):
        return t2
    return t2.contiguous()

"""Shared geometry and launch-settings arithmetic: patch grids, unfold output sizes, int pairs, program counts.

Sits low in the layering (imports torch only, never fastvit.ops / layers / models) so kernels/, ops/, layers/,
models/ and the CLI modules all use one copy of each formula.
"""

from numbers import Integral
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ["ceil_div", "int_pair", "num_programs", "patch_grid", "sm_count", "to_2tuple", "unfold_grid", "unfold_size"]


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (b > 0), without going through floats."""
    return -(-a // b)


def patch_grid(height: int, width: int, patch: int) -> Tuple[int, int]:
    """The (rows, cols) grid of ``patch`` x ``patch`` patches covering an image, a partial patch counting as one."""
    return ceil_div(height, patch), ceil_div(width, patch)


def unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of ``F.unfold`` / a convolution along one axis: ``(size + 2 * padding - kernel) // stride + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def unfold_grid(height: int, width: int, kernel: Sequence[int]) -> Tuple[int, int]:
    """(Ho, Wo) of ``F.unfold`` on an (H, W) image; ``kernel`` = (kh, kw, sh, sw, ph, pw)."""
    kh, kw, sh, sw, ph, pw = kernel
    return unfold_size(height, kh, sh, ph), unfold_size(width, kw, sw, pw)


def int_pair(
    value: object, error: Callable[[object], Exception], *, minimum: Optional[int] = None, exact: bool = True
) -> Tuple[int, int]:
    """``value`` (an int, or a 2-element tuple / list) as a pair of ints.

    Args:
        value: what the caller was given.
        error: builds the exception raised for a bad ``value`` (called with ``value``), so each caller keeps its
            own message and exception type.
        minimum: when given, both ints must be >= it.
        exact: True accepts only integers (``numbers.Integral``: int, numpy ints; not bool, not float);
            False converts each element with ``int()`` (lenient, timm's ``to_2tuple``), letting ``int()``'s
            own error through for unconvertible ones.
    """
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise error(value)
    if exact:
        if any(isinstance(v, bool) or not isinstance(v, Integral) for v in pair):
            raise error(value)
        pair = (int(pair[0]), int(pair[1]))  # numpy / torch-free Integral types become plain ints
    else:
        pair = (int(pair[0]), int(pair[1]))  # type: ignore[call-overload]
    if minimum is not None and any(v < minimum for v in pair):  # type: ignore[operator]
        raise error(value)
    return pair  # type: ignore[return-value]


def _hw_pair_error(value: object) -> Exception:
    return ValueError(f"fastvit: expected an int or an (h, w) pair, got {value!r}")


def to_2tuple(v: object) -> Tuple[int, int]:
    """``v`` as an (h, w) pair of ints (timm-style: an int repeats, a 2-sequence converts with ``int()``)."""
    return int_pair(v, _hw_pair_error, exact=False)


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU; 1 for a CPU tensor (so launch sizes stay small there)."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 1


def num_programs(t: torch.Tensor, rows: int, per_sm: int = 4) -> int:
    """Persistent-program count for a row loop: ``per_sm`` programs per SM, never more than ``rows``, at least 1."""
    return max(1, min(rows, per_sm * sm_count(t)))

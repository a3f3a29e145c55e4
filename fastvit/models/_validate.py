"""Constructor-argument checks shared by the model classes: one call at the top of each ``__init__``.

A zero, negative, fractional or wrongly typed size would otherwise build a model that refuses every
input (or divides by zero); each check raises at construction with the argument's name, the value
and what is allowed.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Optional

from fastvit._geometry import int_pair

__all__ = ["check_model_args", "image_size"]


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise (TypeError if not _is_int(value) else ValueError)(f"{owner}: {name} must be {what}, got {value!r}")


def _real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def image_size(owner: str, value: Any, name: str = "img_size") -> tuple[int, int]:
    """``value`` (an int side or an (H, W) pair of positive ints) as ``(H, W)``; TypeError / ValueError else."""

    def wrong_type(v: object) -> TypeError:
        return TypeError(f"{owner}: {name} must be an int or an (H, W) pair of ints, got {v!r}")

    pair = int_pair(value, wrong_type)
    if min(pair) < 1:
        raise ValueError(f"{owner}: {name} must be positive, got {value!r}")
    return pair


def check_model_args(
    owner: str,
    *,
    img_size: Any = None,
    patch_size: Any = None,
    positive: Optional[dict[str, Any]] = None,
    non_negative: Optional[dict[str, Any]] = None,
    ratios: Optional[dict[str, Any]] = None,
    rates: Optional[dict[str, Any]] = None,
    heads: Optional[tuple[int, int]] = None,
) -> None:
    """Validate a model's constructor arguments (``owner``: the class name for the messages).

    Args:
        img_size / patch_size: image side or (H, W); patch side (or square pair) no larger than the image.
        positive: ints that must be >= 1 (``in_chans``, ``embed_dim``, ``num_heads``, ...).
        non_negative: ints that may be 0 (``num_classes``: no head; ``depth``; ``reg_tokens``).
        ratios: finite reals > 0 (``mlp_ratio``).
        rates: probabilities in [0, 1) (dropout and drop-path rates).
        heads: ``(embed_dim, num_heads)``, the width that must split evenly over the heads.

    Raises:
        TypeError: a value of the wrong type (``bool`` is not an int here).
        ValueError: a value out of range or inconsistent with another.
    """
    for name, value in (positive or {}).items():
        _int(owner, name, value, 1)
    for name, value in (non_negative or {}).items():
        _int(owner, name, value, 0)
    for name, value in (ratios or {}).items():
        if not _real(value) or value <= 0:
            raise (ValueError if _real(value) else TypeError)(f"{owner}: {name} must be a number > 0, got {value!r}")
    for name, value in (rates or {}).items():
        if not _real(value) or not 0 <= value < 1:
            raise (ValueError if _real(value) else TypeError)(
                f"{owner}: {name} must be a probability in [0, 1), got {value!r}"
            )
    size = image_size(owner, img_size) if img_size is not None else None
    if patch_size is not None:
        patch = image_size(owner, patch_size, "patch_size")
        if size is not None and (patch[0] > size[0] or patch[1] > size[1]):
            raise ValueError(
                f"{owner}: patch_size {patch_size!r} is larger than img_size {img_size!r}: no patch fits; "
                "use a smaller patch or a larger image"
            )
    if heads is not None:
        dim, num_heads = heads
        if dim % num_heads:
            raise ValueError(
                f"{owner}: embed_dim {dim} is not divisible by num_heads {num_heads}; pick num_heads dividing "
                f"embed_dim (e.g. {next(h for h in range(min(num_heads, dim), 0, -1) if dim % h == 0)})"
            )

"""Constants and small helpers the segmentation modules share (mmseg's conventions)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
# SegDataPreProcessor of the ADE20K configs: mean/std on 0-255 RGB, i.e. ImageNet's on 0-1 images.
_ADE_PREPROCESSING = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")
# Position tables kept per token grid, least recently used dropped first (ADE20K's whole-image test sees
# dozens of widths; a ViT-B table for a 32x43 grid is 4 MiB in fp32).
_POS_CACHE_SIZE = 16

Features = tuple[Any, ...]  # per level: a (B, C, h, w) map, or (map, cls token (B, D)) for DPT


def _resize(
    x: Tensor, size: Optional[Sequence[int]] = None, scale_factor: Optional[float] = None, align_corners: bool = False
) -> Tensor:
    """Bilinear resize, mmseg's ``resize`` (``F.interpolate``; ``scale_factor`` maps coordinates by the
    factor itself, the output size is floored)."""
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if tuple(x.shape[-2:]) == size:
            return x
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())

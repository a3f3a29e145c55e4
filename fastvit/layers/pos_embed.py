"""Absolute position-embedding resampling, with the interpolation each checkpoint source uses.

A position table trained on one grid is resized to another by interpolating its patch rows as an image
(prefix rows, e.g. the class token's, are kept). Sources disagree on the filter, and the choice changes
the outputs of a fine-tuned model, so fastvit names them:

====================  =========================================  ==========================
``interp``            who does this                              F.interpolate arguments
====================  =========================================  ==========================
``"timm"``            timm (dynamic_img_size, state-dict load)  bicubic, antialias=True
``"npz"``             timm's / Google's .npz loading            bilinear, antialias=False
``"mmseg"``           mmsegmentation ViT backbones              bicubic, antialias=False
``"mmpretrain"``      mmpretrain ViT backbones                  bicubic, antialias=False
====================  =========================================  ==========================

(``align_corners=False`` in every case; antialias only matters when shrinking.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["POS_EMBED_INTERPOLATIONS", "resample_abs_pos_embed"]

POS_EMBED_INTERPOLATIONS: dict[str, tuple[str, bool]] = {
    "timm": ("bicubic", True),
    "npz": ("bilinear", False),
    "mmseg": ("bicubic", False),
    "mmpretrain": ("bicubic", False),
}


def resample_abs_pos_embed(
    pos_embed: Tensor,
    new_size: Sequence[int],
    old_size: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 1,
    interp: str = "timm",
) -> Tensor:
    """Resizes a (1, P + h*w, C) position table to the grid ``new_size``, keeping the P prefix rows.

    Args:
        pos_embed: (1, P + old_h*old_w, C) table.
        new_size: (new_h, new_w) target grid.
        old_size: (old_h, old_w) grid the table was trained on; None assumes a square grid.
        num_prefix_tokens: P, rows that are not on the grid (class / distillation / register tokens).
        interp: the source convention, a key of :data:`POS_EMBED_INTERPOLATIONS`.

    Returns:
        (1, P + new_h*new_w, C) in pos_embed's dtype (interpolated in fp32); the input itself when the
        grid is unchanged.

    Raises:
        ValueError: unknown ``interp``, or a table whose row count does not fit ``old_size``.
    """
    if interp not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(
            f"fastvit: unknown pos-embed interpolation {interp!r}; expected one of {sorted(POS_EMBED_INTERPOLATIONS)}"
        )
    mode, antialias = POS_EMBED_INTERPOLATIONS[interp]
    new_size = (int(new_size[0]), int(new_size[1]))
    grid_rows = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(round(grid_rows**0.5))
        old_size = (side, side)
    old_size = (int(old_size[0]), int(old_size[1]))
    if old_size[0] * old_size[1] != grid_rows:
        raise ValueError(
            f"fastvit: position table has {grid_rows} grid rows (+{num_prefix_tokens} prefix), which is not the "
            f"old grid {old_size[0]}x{old_size[1]}; pass the grid it was trained on as old_size"
        )
    if new_size == old_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=mode, align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid

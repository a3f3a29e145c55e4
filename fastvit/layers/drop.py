"""Stochastic depth (DropPath), active only in training."""

from __future__ import annotations

from torch import Tensor, nn

from fastvit.layers.fused import register_dropout

__all__ = ["DropPath", "drop_path"]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Zeroes whole samples of the residual branch ``x`` with probability ``drop_prob`` (training only).

    Args:
        x: (B, ...) branch output.
        drop_prob: probability of dropping a sample's branch.
        training: identity unless True.
        scale_by_keep: divide the kept samples by ``1 - drop_prob`` so the expectation is unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return x * mask


@register_dropout
class DropPath(nn.Module):
    """Module form of :func:`drop_path` (timm's name and semantics)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"fastvit.layers.DropPath: drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"

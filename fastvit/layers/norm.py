"""LayerNorm on ``fastvit.ops.layer_norm``, with the fused residual add the transformer blocks use."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from fastvit.layers import fused

__all__ = ["LayerNorm"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension (same parameters and state-dict keys) that runs
    ``fastvit.ops.layer_norm`` and can fold the residual add into the same pass.

    Args:
        normalized_shape: C, the size of the last dimension.
        eps: added to the variance; timm's ViTs use 1e-6 (the default here), T2T-ViT 1e-5.
        elementwise_affine: must be True (every model here has weight and bias).
        bias: keep the shift parameter.
    """

    def __init__(
        self, normalized_shape: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True, **kwargs
    ):
        if not elementwise_affine:
            raise ValueError("fastvit.layers.LayerNorm needs elementwise_affine=True; use torch.nn.LayerNorm otherwise")
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, bias=bias, **kwargs)
        if len(self.normalized_shape) != 1:
            raise ValueError(
                "fastvit.layers.LayerNorm normalises the last dimension only; "
                f"got normalized_shape={self.normalized_shape}"
            )

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """``LN(x)``; with ``residual``: ``(LN(x + residual), x + residual)`` from one pass over memory."""
        return fused.layer_norm(self, x, residual=residual)

"""The transformer MLP: fc1 with the activation in its epilogue, fc2 with the block's residual add in its
epilogue (``fastvit.ops.linear`` both times, through :func:`fastvit.layers.fused.mlp`, which ``patch_model``
runs on timm's Mlp too)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from fastvit.layers import fused
from fastvit.layers.linear import Linear

__all__ = ["Mlp", "QuickGELU", "fused_activation_name"]


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (OpenAI CLIP's GELU approximation)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
}


def fused_activation_name(act: nn.Module) -> Optional[str]:
    """The ``fastvit.ops.linear`` activation equal to module ``act``, or None when the op has none
    (the module then runs after the GEMM)."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if type(act) is QuickGELU or type(act).__name__ == "QuickGELU":  # timm.layers.QuickGELU is the same math
        return "quick_gelu"
    return None


def _make_activation(act_layer: Union[str, Callable[[], nn.Module]]) -> nn.Module:
    if isinstance(act_layer, str):
        if act_layer not in _ACTIVATIONS:
            raise ValueError(
                f"fastvit.layers.Mlp: unknown act_layer {act_layer!r}; "
                f"expected one of {sorted(_ACTIVATIONS)} or a module class"
            )
        return _ACTIVATIONS[act_layer]()
    return act_layer()


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> act -> drop1 -> norm -> fc2 -> drop2) with the same module tree and keys.

    Args:
        in_features: input width.
        hidden_features: fc1 width (default ``in_features``).
        out_features: fc2 width (default ``in_features``).
        act_layer: "gelu" (erf, the ViT default), "gelu_tanh", "quick_gelu", or a module class; a module the
            op has no epilogue for runs after fc1 unfused.
        bias: bias on fc1 and fc2.
        drop: dropout after the activation and after fc2 (training only).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Union[str, Callable[[], nn.Module]] = "gelu",
        bias: bool = True,
        drop: float = 0.0,
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.act = _make_activation(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    @property
    def fused_act(self) -> Optional[str]:
        """The epilogue name equal to ``act`` (read per call, so a replaced ``act`` is honoured), or None."""
        return fused_activation_name(self._modules["act"])

    def residual_fusable(self) -> bool:
        """True when ``forward(x, residual=r)`` may add ``r`` inside fc2 (no active output dropout)."""
        return not (self.training and self.drop2.p > 0.0)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``drop2(fc2(drop1(act(fc1(x)))))``, plus ``residual`` added in fc2's epilogue when given.

        Raises:
            RuntimeError: ``residual`` given while output dropout is active (the add cannot be fused
                before the dropout; add it outside).
        """
        if residual is not None and not self.residual_fusable():
            raise RuntimeError(
                "fastvit.layers.Mlp: residual fusion with active output dropout; add the residual after the call"
            )
        return fused.mlp(self, x, self.fused_act, residual=residual)

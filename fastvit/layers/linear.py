"""Linear on ``fastvit.ops.linear``: the bias, activation and residual add run in the GEMM's epilogue."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastvit import ops

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward runs ``fastvit.ops.linear``.

    Calling the module (rather than the op on its weight) keeps forward hooks, ``count_flops`` and
    module-level tooling working on the fused path.
    """

    def forward(self, x: Tensor, activation: Optional[str] = None, residual: Optional[Tensor] = None) -> Tensor:
        """``act(x @ W.T + b) (+ residual)``.

        Args:
            x: (..., in_features).
            activation: None, "gelu" (erf), "gelu_tanh" or "quick_gelu", applied before the residual add.
            residual: (..., out_features) added last, or None.
        """
        return ops.linear(x, self.weight, self.bias, activation=activation, residual=residual)

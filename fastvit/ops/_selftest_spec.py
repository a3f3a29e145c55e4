"""What ``python -m fastvit.selftest`` runs of one op, declared next to the op's row in the op table.

An op file passes a :class:`SelftestSpec` as ``OpDispatcher(..., selftest=...)``; the selftest reads every
row of ``dispatch.registered_ops()`` and builds its cases from the spec alone, so adding an op does not
touch ``fastvit/selftest.py``. This module imports torch only (the selftest imports the ops, never the
reverse).

A *shape* is a JSON-able dict (it travels to the selftest's worker process); a *problem* is what one case
runs at one shape: ``(leaves, kernel, reference)`` with ``leaves`` the fp32 inputs by name,
``kernel(leaves, backend)`` the public op on them and ``reference(leaves)`` its plain-torch specification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = ["SelftestSpec", "bytes_moved", "cap_batch", "normal"]

Shape = Dict[str, Any]
Leaves = Dict[str, torch.Tensor]
Problem = Tuple[Leaves, Callable[[Leaves, Optional[str]], Any], Callable[[Leaves], Any]]

# The fp64 oracle of attention holds B*H*N*N probabilities: :func:`cap_batch` keeps such a product <= 2**28.
ORACLE_ELEMENTS = 2**28
RULES = ("three_way", "table")


@dataclass(frozen=True)
class SelftestSpec:
    """One op's selftest cases.

    Args:
        model_shapes: batch -> {label: shape}, the shapes the models run the op at.
        small_shapes: {label: shape}, the smallest shapes (the Triton interpreter on the CPU, --sanitize).
        problem: (shape, device) -> (leaves, kernel, reference), see the module docstring.
        rule: how outputs and gradients are judged: "three_way" (attention / GEMM-like) or "table"
            (the tolerance table; row-sum parameter gradients still by the three-way rule).
        speed_shape: the label of ``model_shapes(256)`` the speed case times.
        composition: (leaves in the speed dtype, shape) -> a no-argument call of the torch composition the
            op replaces (the baseline of the speed ratio).
        work: (shape, leaves, baseline output) -> ("tflops", FLOPs) or ("gbps", bytes moved).
        primary_shapes: labels every backend x dtype runs at batch 256 by default on a GPU.
        cpu_torch_shapes: labels the CPU runs on the torch backend in fp32 at batch 1.
        sanitizers: the compute-sanitizer tools ``--sanitize`` runs on the first small shape.
        baseline_times: optional, the baseline call -> {"<name>_ms": ms} for several implementations of
            the baseline (attention: each SDPA backend); the baseline time is then their minimum.
        order: position in the run (lower first; the riskiest ops first). Rows with equal order keep the
            op table's order.
    """

    model_shapes: Callable[[int], Dict[str, Shape]]
    small_shapes: Dict[str, Shape]
    problem: Callable[[Shape, torch.device], Problem]
    rule: str
    speed_shape: str
    composition: Callable[[Leaves, Shape], Callable[[], Any]]
    work: Callable[[Shape, Leaves, torch.Tensor], Tuple[str, float]]
    primary_shapes: Tuple[str, ...] = ()
    cpu_torch_shapes: Tuple[str, ...] = ()
    sanitizers: Tuple[str, ...] = ("memcheck",)
    baseline_times: Optional[Callable[[Callable[[], Any]], Dict[str, float]]] = None
    order: int = 100

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"SelftestSpec: rule must be one of {RULES}, got {self.rule!r}")
        if not self.small_shapes:
            raise ValueError("SelftestSpec: small_shapes is empty; declare at least one shape the CPU can run")
        labels = set(self.model_shapes(256))
        unknown = [x for x in (self.speed_shape, *self.primary_shapes, *self.cpu_torch_shapes) if x not in labels]
        if unknown:
            raise ValueError(
                f"SelftestSpec: labels {unknown} are not shapes of model_shapes(256) ({sorted(labels)}); "
                "name one of those"
            )


def cap_batch(batch: int, per_sample: int, limit: int = ORACLE_ELEMENTS) -> int:
    """``batch`` halved until ``batch * per_sample <= limit`` (at least 1)."""
    while batch > 1 and batch * per_sample > limit:
        batch //= 2
    return batch


def normal(dev: torch.device) -> Callable[..., torch.Tensor]:
    """``rn(*shape, scale=1.0)``: standard normal fp32 on ``dev``, times ``scale``."""

    def rn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=dev) * scale

    return rn


def bytes_moved(leaves: Leaves, out: torch.Tensor, outputs: int = 1) -> Tuple[str, float]:
    """("gbps", every leaf read once + ``outputs`` tensors of ``out``'s size written)."""
    read = sum(v.numel() * v.element_size() for v in leaves.values())
    return "gbps", float(read + out.numel() * out.element_size() * outputs)

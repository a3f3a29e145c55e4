"""Backend choice for every op: explicit argument > ``FASTVIT_BACKEND`` > auto (fastest supported).

Each op declares, per backend, a function returning the reasons that backend cannot serve a given
input (an empty list means it can). On top of those, the environment adds its own reasons: Triton not
importable, CPU tensors without the Triton interpreter, the extension not built, a GPU older than
sm_80. Then:

* an explicit backend (argument or ``FASTVIT_BACKEND``) that has any reason raises
  :class:`BackendNotSupported`, one error listing every reason with a hint;
* auto dispatch walks the op's documented preference order for the tensor's device type and takes
  the first backend with no reasons, recording why the ones before it were passed over
  (:func:`fallback_log`, shown by ``python -m fastvit.info``). CPU tensors go to "torch" unless
  "triton" is asked for explicitly (the interpreter is for testing, not speed).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from fastvit import _ext, kernels

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendNotSupported",
    "OpDispatcher",
    "describe_inputs",
    "environment_reasons",
    "fallback_log",
    "registered_ops",
]

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "FASTVIT_BACKEND"
_MIN_CAPABILITY = (8, 0)
_log = logging.getLogger("fastvit.dispatch")
_REGISTRY: "OrderedDict[str, OpDispatcher]" = OrderedDict()
_FALLBACKS: dict[tuple[str, str], list[str]] = {}

ReasonsFn = Callable[..., list[str]]


class BackendNotSupported(ValueError):
    """An explicitly requested backend cannot serve the given input; the message lists every reason."""


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def environment_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run at all on ``device`` in this process, independent of the op's inputs."""
    reasons: list[str] = []
    if backend == "triton":
        if kernels.TRITON_IMPORT_ERROR is not None:
            reasons.append(f"triton is not importable ({kernels.TRITON_IMPORT_ERROR})")
        elif device.type == "cpu" and not kernels.INTERPRET:
            reasons.append(
                "tensors are on the CPU and the Triton interpreter is off: set TRITON_INTERPRET=1 before importing "
                "fastvit to run Triton kernels on the CPU (slow; for testing)"
            )
    elif backend == "cuda":
        if not _ext.available():
            reasons.append(f"the CUDA extension fastvit._C is not loaded ({_ext.load_error()})")
        if device.type != "cuda":
            reasons.append(f"tensors are on {device.type}, the 'cuda' backend needs CUDA tensors")
        elif _ext.available():
            # Only for CUDA tensors (CPU calls never pay for the query); cached per process in _ext.
            problem = _ext.device_problem()
            if problem:
                reasons.append(f"fastvit._C cannot use the GPU: {problem}")
    if backend in ("triton", "cuda") and device.type == "cuda":
        cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if cap < _MIN_CAPABILITY:
            reasons.append(f"GPU compute capability {cap[0]}.{cap[1]} is below 8.0; fastvit's kernels target sm_80+")
    if device.type not in ("cpu", "cuda"):
        if backend != "torch":
            reasons.append(f"device type {device.type!r} is only served by the 'torch' backend")
    return reasons


def describe_inputs(inputs: dict[str, Any]) -> str:
    """One line per input: dtype, shape, device and strides for tensors, the value otherwise."""
    parts = []
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dt = str(value.dtype).replace("torch.", "")
            parts.append(f"{name}: {dt}{list(value.shape)} on {value.device}, strides {tuple(value.stride())}")
        elif value is not None:
            parts.append(f"{name}: {value!r}")
    return "; ".join(parts)


@dataclass
class OpDispatcher:
    """Backend registry and chooser for one op family.

    Args:
        name: public op name (``fastvit.ops.<name>``).
        reasons: backend name -> function(**inputs) returning why that backend cannot serve the inputs.
        preference: backend order tried by auto dispatch for CUDA tensors (fastest first). Documented in
            each op's module docstring with the measurement behind it.
    """

    name: str
    reasons: dict[str, ReasonsFn]
    preference: Sequence[str]
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [b for b in (*self.reasons, *self.preference) if b not in BACKENDS]
        if unknown:
            raise ValueError(f"op {self.name}: unknown backends {unknown}; expected some of {BACKENDS}")
        _REGISTRY[self.name] = self

    def unsupported_reasons(self, backend: str, device: torch.device, inputs: dict[str, Any]) -> list[str]:
        if backend not in self.reasons:
            return [f"op {self.name} has no {backend!r} backend (it has {', '.join(self.reasons)})"]
        return environment_reasons(backend, device) + self.reasons[backend](**inputs)

    def select(self, backend: Optional[str], device: torch.device, **inputs: Any) -> str:
        """The backend to run ``inputs`` on; raises BackendNotSupported for an explicit one that cannot."""
        source = "backend="
        if backend is None:
            env = os.environ.get(ENV_VAR, "").strip().lower()
            if env and env != "auto":
                backend, source = env, f"{ENV_VAR}="
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(
                    f"fastvit.ops.{self.name}: unknown backend {source}{backend!r}; expected one of "
                    f"{', '.join(BACKENDS)} or None (auto)"
                )
            reasons = self.unsupported_reasons(backend, device, inputs)
            if reasons:
                raise BackendNotSupported(self._refusal(backend, source, device, inputs, reasons))
            return backend
        order = self.preference if device.type == "cuda" else ("torch",)
        for candidate in order:
            reasons = self.unsupported_reasons(candidate, device, inputs)
            if not reasons:
                return candidate
            if not torch.compiler.is_compiling():
                self._record_fallback(candidate, reasons)
        return "torch"

    def _refusal(
        self, backend: str, source: str, device: torch.device, inputs: dict[str, Any], reasons: list[str]
    ) -> str:
        usable = [b for b in self.reasons if b != backend and not self.unsupported_reasons(b, device, inputs)]
        hint = (
            f"use backend={usable[0]!r}"
            + (f" (or {', '.join(repr(b) for b in usable[1:])})" if usable[1:] else "")
            + " or backend=None to choose automatically"
            if usable
            else "no backend can serve this input; check the input itself"
        )
        if source.startswith(ENV_VAR):
            hint += f", or unset {ENV_VAR}"
        lines = "\n".join(f"  - {r}" for r in reasons)
        return (
            f"fastvit.ops.{self.name}: backend {source}{backend!r} cannot run these inputs "
            f"({describe_inputs(inputs)}):\n{lines}\nHint: {hint}."
        )

    def _record_fallback(self, backend: str, reasons: list[str]) -> None:
        key = (self.name, backend)
        if _FALLBACKS.get(key) != reasons:
            _FALLBACKS[key] = reasons
            _log.info("fastvit.ops.%s: auto dispatch passed over %r: %s", self.name, backend, "; ".join(reasons))

    def availability(self, device: torch.device) -> dict[str, list[str]]:
        """Backend -> environment reasons it cannot run on ``device`` here (empty: available)."""
        return {b: environment_reasons(b, device) for b in self.reasons}


def registered_ops() -> "OrderedDict[str, OpDispatcher]":
    return _REGISTRY


def fallback_log() -> dict[tuple[str, str], list[str]]:
    """(op, backend) -> the latest reasons auto dispatch passed that backend over in this process."""
    return dict(_FALLBACKS)

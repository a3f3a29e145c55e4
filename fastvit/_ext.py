"""Soft loader for the optional CUDA extension ``fastvit._C``.

Importing this module never raises: if the extension is missing or broken, ``load_error()`` says why
and the ops fall back to their Triton and torch backends. The extension is torch-independent, so the
helpers that turn tensors into its arguments (pointers, dtype codes, stream handles) live here.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from types import ModuleType
from typing import Any, Optional

import torch

__all__ = [
    "DTYPE_CODES",
    "available",
    "build_info",
    "device_problem",
    "dtype_code",
    "load_error",
    "module",
    "ptr",
    "require",
    "stream_handle",
]

_BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build_info.json")

_module: Optional[ModuleType] = None
_load_error: Optional[str] = None
try:
    _module = importlib.import_module("fastvit._C")
except ModuleNotFoundError as exc:
    _load_error = f"no compiled fastvit._C module in {os.path.dirname(_BUILD_INFO)} ({exc})"
except Exception as exc:  # a broken or mismatched shared library
    _load_error = f"{type(exc).__name__}: {exc}"
if _module is not None and not hasattr(_module, "DTYPE_CODES"):
    _module = None
    _load_error = (
        f"fastvit._C in {os.path.dirname(_BUILD_INFO)} predates the DTYPE_CODES table this package reads; "
        "rebuild it (`pip install -e .`)"
    )

# torch dtype -> csrc/common.h::DTypeCode, read from the extension (empty when it did not load: nothing calls it).
DTYPE_CODES: dict[torch.dtype, int] = (
    {getattr(torch, name): code for name, code in _module.DTYPE_CODES.items()} if _module is not None else {}
)


def build_info() -> dict[str, Any]:
    """What the last build recorded (nvcc version, archs, flags), or why it was skipped."""
    try:
        with open(_BUILD_INFO) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"built": False, "skip_reason": "no build record: the package was not installed with `pip install -e .`"}


def available() -> bool:
    return _module is not None


@functools.lru_cache(maxsize=None)
def device_problem() -> Optional[str]:
    """Why the loaded ``fastvit._C`` cannot use a GPU on this machine (with the fix), or None.

    A driver older than the CUDA runtime the extension was built with (static cudart) fails every kernel
    call even where torch's own runtime works. Asked once per process (one cudaGetDeviceCount) and never
    raises; None as well when the extension is not loaded (``load_error()`` says why).
    """
    if _module is None:
        return None
    try:
        return _module.device_problem() or None
    except Exception as exc:  # a broken build: report it as the problem rather than raise from dispatch
        return f"fastvit._C.device_problem() failed: {type(exc).__name__}: {exc}"


def load_error() -> Optional[str]:
    """Why ``fastvit._C`` could not be imported (with the build's own skip reason when it has one)."""
    if _module is not None:
        return None
    info = build_info()
    reason = info.get("skip_reason")
    return f"{_load_error}" + (f" (build skipped: {reason})" if reason and not info.get("built") else "")


def module() -> Optional[ModuleType]:
    return _module


def require(op: str) -> ModuleType:
    """The loaded extension, or a RuntimeError that says why it is not there and how to get it."""
    if _module is None:
        raise RuntimeError(
            f"fastvit.ops.{op}: the 'cuda' backend needs the compiled extension fastvit._C, which did not load: "
            f"{load_error()}. Reinstall with nvcc on PATH (`pip install -e .`) or use backend='triton' / 'torch'."
        )
    return _module


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: Optional[torch.Tensor]) -> int:
    """Device address of ``t`` (0 for None), as the extension takes it."""
    return 0 if t is None else t.data_ptr()


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream

"""Triton kernels and their launchers, one module per op family (no dispatch, no torch.library).

Importing a kernel module decorates its kernels with ``triton.jit``; under ``TRITON_INTERPRET=1``
(read by Triton at that moment) they run on the CPU through the interpreter.
"""

import os
from typing import Optional

__all__ = ["INTERPRET", "TRITON_IMPORT_ERROR", "TRITON_VERSION", "TRITON_VERSION_TUPLE", "release_tuple"]


def release_tuple(version: str) -> tuple:
    """``"2.5.1+cu124"`` -> ``(2, 5, 1)``; a non-numeric field ends it (``"3.2.0rc1"`` -> ``(3, 2)``)."""
    out = []
    for field in version.split("+")[0].split("."):
        if not field.isdigit():
            break
        out.append(int(field))
    return tuple(out)


INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_IMPORT_ERROR: Optional[str] = None
TRITON_VERSION: Optional[str] = None
try:
    import triton

    TRITON_VERSION = triton.__version__
except Exception as exc:  # not installed (e.g. macOS / Windows) or broken
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
TRITON_VERSION_TUPLE: tuple = release_tuple(TRITON_VERSION or "")

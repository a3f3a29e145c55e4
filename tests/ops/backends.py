"""Per-backend test parametrisation read from the op table (fastvit.ops.dispatch.registered_ops()): a
backend added to an op's row is tested by every matrix that asks for it here."""

from typing import List

import pytest

from fastvit.ops import dispatch


def kernel_backends(op: str, *, gpu_mark_cuda: bool = False) -> List:
    """The op's non-torch backends, in table order; ``gpu_mark_cuda`` marks "cuda" as a GPU-only case
    (for matrices whose other cases run under the Triton interpreter)."""
    names = [b for b in dispatch.backends_of(op) if b != "torch"]
    return [pytest.param(b, marks=pytest.mark.gpu) if gpu_mark_cuda and b == "cuda" else b for b in names]


def all_backends(op: str) -> List[str]:
    """Every backend the op declares, torch included."""
    return dispatch.backends_of(op)

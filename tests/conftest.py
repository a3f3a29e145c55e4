"""Test configuration shared by every test module.

Without a GPU, TRITON_INTERPRET=1 is set here, before any fastvit kernel module is imported, so the
Triton kernels run on the CPU through the interpreter (slow: interpreter cases are kept small). Tests
marked ``gpu`` are skipped with the reason when torch sees no GPU.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

# The suite never reads or writes the user's dispatch cache (~/.cache/fastvit/dispatch.json): it gets a
# per-session temp file (tests that need their own cache file still set FASTVIT_DISPATCH_CACHE themselves).
_DISPATCH_CACHE_DIR = tempfile.mkdtemp(prefix="fastvit-test-dispatch-")
atexit.register(shutil.rmtree, _DISPATCH_CACHE_DIR, ignore_errors=True)
os.environ["FASTVIT_DISPATCH_CACHE"] = os.path.join(_DISPATCH_CACHE_DIR, "dispatch.json")

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastvit  # noqa: E402,F401  (imported after TRITON_INTERPRET is decided)

# The device Triton-kernel tests run on: the GPU when there is one, else the CPU under the interpreter.
DEVICE = torch.device("cuda") if HAS_GPU else torch.device("cpu")
NO_GPU_REASON = "needs an NVIDIA GPU: torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    return DEVICE

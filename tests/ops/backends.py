"""Per-backend test parametrisation read from the op table (fastvit.ops.dispatch.registered_ops()): a
backend added to an op's row is tested by every matrix that asks for it here. Also the one way the ops
files run a backend's kernels under compute-sanitizer (``run_under_memcheck``)."""

import os
import shutil
import subprocess
import sys
import textwrap
from typing import List

import pytest

from fastvit.ops import dispatch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kernel_backends(op: str, *, gpu_mark_cuda: bool = False) -> List:
    """The op's non-torch backends, in table order; ``gpu_mark_cuda`` marks "cuda" as a GPU-only case
    (for matrices whose other cases run under the Triton interpreter)."""
    names = [b for b in dispatch.backends_of(op) if b != "torch"]
    return [pytest.param(b, marks=pytest.mark.gpu) if gpu_mark_cuda and b == "cuda" else b for b in names]


def all_backends(op: str) -> List[str]:
    """Every backend the op declares, torch included."""
    return dispatch.backends_of(op)


_MEMCHECK_DONE = "memcheck script ran to the end"


def run_under_memcheck(body: str, *, timeout: float = 600) -> None:
    """Runs ``body`` (Python with ``torch`` and ``fastvit.ops as ops`` imported, seed 0) in a fresh process
    under ``compute-sanitizer --tool memcheck`` and fails on any error it reports, or if the script did not
    run to its end. Skips when compute-sanitizer (CUDA toolkit) is not installed."""
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None
    )
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed (it ships with the CUDA toolkit)")
    script = "\n".join(
        [
            "import torch",
            "from fastvit import ops",
            "torch.manual_seed(0)",
            textwrap.dedent(body),
            "torch.cuda.synchronize()",
            f"print({_MEMCHECK_DONE!r})",
        ]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(
        [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )  # fmt: skip
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0 and _MEMCHECK_DONE in out.stdout, log
    assert "ERROR SUMMARY: 0 errors" in out.stdout + out.stderr, log

"""Fault injection for interrupted writes: run Python code in a child process under a file-size limit, or
killed (SIGKILL) right before the temporary file would be renamed over the destination."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""

_KILL_BEFORE_RENAME = """
import os, signal
def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = _die  # fastvit.fileio renames with os.replace: die with the temporary file fully written
"""


def run_child(code: str, *, size_limit: int | None = None, kill_before_rename: bool = False, timeout: int = 120):
    """Run ``code`` in a fresh interpreter (repo root on sys.path) with the faults asked for."""
    prelude = ""
    if size_limit is not None:
        prelude += _SIZE_LIMIT.format(limit=int(size_limit))
    if kill_before_rename:
        prelude += _KILL_BEFORE_RENAME
    script = textwrap.dedent(prelude) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )

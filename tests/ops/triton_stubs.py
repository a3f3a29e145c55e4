"""Runs fastvit's real Triton launchers on CPU tensors the way a GPU run calls them, without a GPU.

The interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) gives every autotuned kernel a single
config, so Triton never calls the kernels' ``early_config_prune`` and graph-capture branches never pick a
config. ``run_stubbed`` runs a snippet in a child process without TRITON_INTERPRET, so the kernel modules
carry their GPU config lists, with two stubs: ``Autotuner._bench`` returns a made-up timing instead of
timing a kernel, and ``JITFunction.run`` records the launch instead of compiling it. Everything between the
launcher and those two points (argument passing, Triton's own Autotuner.run and prune call, heuristics,
fastvit's config caches) is the real code.

The snippet sees ``BENCHED`` (kernel name, config kwargs) per trial, ``LAUNCHED`` (kernel name, the launch's
BLOCK_* / num_warps / num_stages keywords) per launch, and ``torch``; it reports by printing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

__all__ = ["run_stubbed"]

_REPO = Path(__file__).resolve().parents[2]

_PREAMBLE = """
import torch
import triton.runtime.autotuner as _autotuner
import triton.runtime.jit as _jit

BENCHED, LAUNCHED = [], []


def _bench(self, *args, config, **meta):
    BENCHED.append((self.base_fn.__name__, dict(config.kwargs)))
    # Later trials are faster, so the autotuner picks the last surviving config, not simply the first.
    return [1.0 / len(BENCHED)] * 3


def _run(self, *args, grid, warmup, **kwargs):
    meta = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}
    LAUNCHED.append((self.__name__, meta))


_autotuner.Autotuner._bench = _bench
_jit.JITFunction.run = _run
"""


def run_stubbed(snippet: str, timeout: float = 120.0) -> str:
    """Runs ``snippet`` after the stubs in a fresh interpreter-free Python; returns its stdout.

    Raises:
        AssertionError: the child failed (its stderr is in the message).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH", "")]))
    code = _PREAMBLE + textwrap.dedent(snippet)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"stubbed launcher run failed:\n{proc.stderr[-4000:]}"
    return proc.stdout

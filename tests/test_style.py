"""The tree is ruff-clean (DESIGN.md §5): lint rules and formatting from pyproject.toml."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["fastvit", "tests", "benchmarks", "setup.py"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (it comes with the [test] extra)"
)


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    done = subprocess.run([sys.executable, "-m", "ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"`ruff {' '.join(command)}` found problems:\n{done.stdout}{done.stderr}"

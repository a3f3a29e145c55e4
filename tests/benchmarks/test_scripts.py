"""Every benchmarks/*.py script starts as ``python benchmarks/<script>.py`` with fastvit importable (installed, or
on PYTHONPATH) and nothing else: no script edits sys.path, its own folder (benchmarks/, for bench_utils, _harness,
published) is on it because Python puts a script's folder first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in ("bench_utils.py", "published.py"))


def test_no_benchmark_script_edits_sys_path():
    offenders = [p.name for p in (ROOT / "benchmarks").rglob("*.py") if "sys.path.insert" in p.read_text()]
    assert not offenders, f"{offenders} edit sys.path: rely on `pip install -e .` and the script's own folder instead"


# One child for all scripts (torch imported once): each runs as ``python <script> --help`` would, its folder first on
# sys.path and nothing from benchmarks/ imported yet; prints "<script> <exit code>" per script.
_CHILD = """
import runpy, sys
base_path, base_modules = list(sys.path), set(sys.modules)
for script in sys.argv[1:]:
    sys.path[:] = [script.rsplit("/", 1)[0]] + base_path[1:]
    for name in set(sys.modules) - base_modules:
        if not name.startswith(("torch", "triton", "numpy", "fastvit", "timm")):
            del sys.modules[name]
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    print(script, code, flush=True)
"""


@pytest.mark.slow
def test_every_script_starts_from_another_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # stands in for `pip install -e .`: fastvit importable, benchmarks/ not
    scripts = [str(ROOT / "benchmarks" / s) for s in SCRIPTS]
    proc = subprocess.run([sys.executable, "-c", _CHILD, *scripts], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    codes = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines() if line.startswith(str(ROOT)))
    assert codes == {s: "0" for s in scripts}, proc.stderr[-3000:]

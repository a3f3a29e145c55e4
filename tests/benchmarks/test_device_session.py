"""benchmarks/device_session.sh, the one prepared call for a lent GPU: with stand-ins for pip and python on PATH it
runs every step in order with the right commands, writes one line per step, caps steps by the time left, and
refuses a bad total."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_session.sh"
STEPS = ["build", "info", "selftest", "tune", "bench_attention", "bench_linear", "bench_layer_norm", "bench_overhead"]


def _stub_path(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pip", "python"):  # each records its arguments and succeeds
        exe = bin_dir / tool
        exe.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls.txt"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_stub_path(tmp_path), capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_every_step_runs_in_order_with_its_command(tmp_path):
    out = tmp_path / "out"
    proc = _run(tmp_path, str(out), "600")
    assert proc.returncode == 0, proc.stderr
    lines = (out / "steps.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == STEPS
    assert all(": rc=0 in " in line for line in lines), lines
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0].startswith("python -c import sys, torch, triton")  # the versions in env.txt, before the build
    assert calls[1] == "pip install -e . --no-build-isolation --no-deps"
    assert f"python -m fastvit.selftest --budget-min 4 --out {out}/selftest" in calls
    assert any(c.startswith("python benchmarks/tune_models.py") and f"--json {out}/tune.json" in c for c in calls)
    for name in ("tune_models", "bench_attention", "bench_linear", "bench_layer_norm", "bench_overhead"):
        assert (ROOT / "benchmarks" / f"{name}.py").exists()
    assert (out / "env.txt").read_text().startswith("git: ")
    assert not (out / ".start").exists()


def test_steps_past_the_total_are_listed_not_run(tmp_path):
    out = tmp_path / "out"
    proc = _run(tmp_path, str(out), "10")
    assert proc.returncode == 0, proc.stderr
    lines = (out / "steps.txt").read_text().splitlines()
    assert len(lines) == len(STEPS) and all("not run" in line for line in lines), lines
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 1  # only env.txt's version line ran


def test_a_bad_total_is_refused(tmp_path):
    proc = _run(tmp_path, str(tmp_path / "out"), "8min")
    assert proc.returncode == 2 and "total_seconds must be a whole number, got '8min'" in proc.stderr

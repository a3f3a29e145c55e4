"""Shared plumbing for the per-op benchmarks (benchmarks/bench_<op>.py).

Timing is ``fastvit._timing.median_ms`` (``triton.testing.do_bench``: median over repeated runs after
warm-up, L2 flushed between runs; shared with ``python -m fastvit.selftest``, re-exported here for the
scripts), the ceiling is a device-to-device copy measured in the same run, and results are written as
JSON beside a markdown table, tagged with the GPU, versions and git sha.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any, Sequence

import torch

from fastvit._timing import copy_bandwidth_gbps, median_ms  # noqa: F401  (re-exported for bench_<op>.py)
from fastvit.info import git_sha

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def require_gpu(script: str) -> None:
    """Exits 0 with a message on a machine without a GPU: kernel timings need one."""
    if not torch.cuda.is_available():
        print(
            f"{script}: no GPU visible to torch (torch.cuda.is_available() is False); this benchmark times GPU "
            "kernels and has nothing to measure here. Run it on an NVIDIA GPU machine."
        )
        sys.exit(0)


def kernel_backends(op: str) -> tuple:
    """The op's non-torch backends, from the op table (fastvit.ops.dispatch): what a bench times beside torch."""
    from fastvit.ops import dispatch

    return tuple(b for b in dispatch.backends_of(op) if b != "torch")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: Sequence[dict[str, Any]], extra: dict[str, Any]) -> str:
    """Writes benchmarks/results/<name>_<gpu>_<date>.json with the environment; returns the path."""
    from fastvit.info import collect

    info = collect()
    gpu = info["gpus"][0]["name"].replace(" ", "_") if info["gpus"] else "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}_{gpu}_{stamp}.json")
    payload = {
        "benchmark": name,
        "command": " ".join(sys.argv),
        "date": stamp,
        "git_sha": git_sha(),
        "environment": info,
        **extra,
        "rows": list(rows),
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path

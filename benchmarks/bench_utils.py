"""The results writer and the markdown table of the per-op benchmarks (benchmarks/bench_<op>.py).

The runner that measures them is ``_harness.opbench`` (timing through ``fastvit._timing``); results are
written as JSON (optionally a CSV beside it) with the environment record of benchmarks/run.py
(``_harness.report.environment``).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from typing import Any, Optional, Sequence

import torch
from _harness.report import environment

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# The environment columns every row of a bench_<op>.py CSV carries (the JSON holds the whole record).
CSV_ENV_KEYS = ("gpu", "driver", "torch", "cuda", "cudnn", "triton")


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    extra: dict[str, Any],
    csv_too: bool = False,
    device: Optional[torch.device] = None,
) -> str:
    """Writes benchmarks/results/<name>_<gpu>_<date>.json with the environment (``_harness.report.environment``,
    the record benchmarks/run.py writes too) and, with ``csv_too``, a .csv beside it (one line per row, plus the
    CSV_ENV_KEYS columns); returns the JSON path. ``device``: what the rows ran on (default: GPU 0, else the CPU)."""
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = environment(device)
    gpu = (env["gpu"] or "cpu").replace(" ", "_")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}_{gpu}_{stamp}.json")
    payload = {
        "benchmark": name,
        "command": env["command"],
        "date": stamp,
        "git_sha": env["fastvit_info"]["git_sha"],
        "environment": env,
        **extra,
        "rows": list(rows),
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    if csv_too:
        columns = sorted({k for r in rows for k in r}) + list(CSV_ENV_KEYS)
        with open(path[: -len(".json")] + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({**r, **{k: env[k] for k in CSV_ENV_KEYS}} for r in rows)
    return path

"""Results files and tables: environment record, JSON / CSV / markdown writers, --compare, the chart.

The JSON file is the record (``SCHEMA`` below); the CSV has one line per number (or per cell without
one); the markdown tables are what run.py prints and what the README quotes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "CSV_FIELDS",
    "SCHEMA",
    "chart",
    "compare",
    "environment",
    "load_results",
    "log_line",
    "markdown",
    "with_ratios",
    "write_csv",
    "write_json",
]

SCHEMA = "fastvit-benchmarks-run/1"
BASELINE = "timm_eager"
UNITS = {"img_s": "img/s", "ms": "ms", "p90_ms": "ms", "peak_mem_gib": "GiB", "fps": "fps", "mem_gib": "GiB"}
# Ratio to the baseline, oriented so that > 1 means "better than timm eager" for speed; memory is ours / theirs.
_RATIO = {
    "img_s": lambda ours, base: ours / base,
    "fps": lambda ours, base: ours / base,
    "ms": lambda ours, base: base / ours,
    "peak_mem_gib": lambda ours, base: ours / base,
    "mem_gib": lambda ours, base: ours / base,
}
CSV_FIELDS = (
    "suite",
    "model",
    "label",
    "provider",
    "provider_label",
    "metric",
    "quantity",
    "value",
    "unit",
    "vs_timm_eager",
    "batch",
    "dtype",
    "status",
    "reason",
    "first_call_s",
    "iters",
    "clock",
    "published",
    "device",
    "gpu",
    "torch",
    "git_sha",
    "date",
)


def environment(device: torch.device, command: Optional[str] = None) -> dict[str, Any]:
    """The one environment record of every benchmark result (benchmarks/run.py, bench_<op>.py, bench_overhead.py):
    GPU, driver, versions, fastvit git sha, date, command line (``command``; default: this process's), the torch
    settings that change timings, and all of ``fastvit.info.collect()`` under ``fastvit_info``."""
    from fastvit import info

    collected = info.collect()
    gpu = collected["gpus"][0] if collected["gpus"] else None
    sha = collected["git_sha"]  # "<sha>" or "<sha>-dirty" (tracked files changed), None outside a checkout
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command if command is not None else "python " + shlex.join(sys.argv),
        "device": str(device),
        "gpu": gpu["name"] if gpu else None,
        "gpu_capability": gpu["capability"] if gpu else None,
        "gpu_memory_gib": gpu["memory_gib"] if gpu else None,
        "driver": collected["driver"],
        "torch": collected["torch"],
        "cuda": collected["torch_cuda"],
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": collected["triton"],
        "timm": collected["timm"],
        "fastvit": collected["fastvit"],
        "fastvit_git_sha": sha[: -len("-dirty")] if sha and sha.endswith("-dirty") else sha,
        "git_dirty": sha.endswith("-dirty") if sha else None,
        "cpu_threads": torch.get_num_threads(),
        "timm_fused_attn": _timm_fused_attn(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "fastvit_info": collected,
    }


def _timm_fused_attn() -> Optional[bool]:
    """Whether timm's Attention calls F.scaled_dot_product_attention (the "SDPA" of timm eager)."""
    try:
        from timm.layers import use_fused_attn
    except ImportError:
        return None
    return bool(use_fused_attn())


def with_ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``vs_timm_eager`` (per quantity) to every measured cell whose row has a timm eager number."""
    base = {(c["row"], c["metric"]): c for c in cells if c["provider"] == BASELINE and c.get("status") == "ok"}
    for c in cells:
        b = base.get((c["row"], c["metric"]))
        if c.get("status") != "ok" or b is None or c["provider"] == BASELINE:
            continue
        ratios = {}
        for q, v in c.get("values", {}).items():
            bv = b.get("values", {}).get(q)
            if q in _RATIO and bv and v:
                ratios[q] = _RATIO[q](v, bv)
        c["vs_timm_eager"] = ratios
    return cells


def log_line(cell: dict[str, Any]) -> str:
    """One measurement as a log line: time, cell, status, and its numbers or its reason."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    head = f"{stamp} {cell['row']} {cell['provider']} {cell['metric']} {cell['status']}"
    if cell["status"] != "ok":
        return f"{head}: {cell.get('reason', '')}"
    numbers = " ".join(f"{q}={v:.4g}" for q, v in cell.get("values", {}).items())
    first = cell.get("timing", {}).get("first_call_s")
    tail = f" first_call_s={first:.3g}" if first else ""
    return f"{head} batch={cell.get('batch')} {cell.get('dtype')} {numbers}{tail}"


def write_json(results: dict[str, Any], path: Path) -> Path:
    """Write atomically (a Ctrl-C mid-write must not leave a broken file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def load_results(path: Path) -> dict[str, Any]:
    """A results file written by run.py; a clear error for anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--compare: no such file {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--compare: {path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"--compare: {path} is not a benchmarks/run.py results file (expected schema {SCHEMA!r})")
    return data


def _published_text(row: dict[str, Any], metric: str) -> str:
    """Published values as printed, grouped by where they were measured: "29.85 / 29.19 (V100, verify)"."""
    groups: dict[str, list[str]] = {}
    for p in row.get("published", []):
        if p["metric"] != metric:
            continue
        where = f"{p['gpu'] or 'no GPU'}{', verify' if p.get('verify') else ''}"
        text = f"{p['value']:,.0f}" if p["value"] >= 1000 else f"{p['value']:g}"
        if text not in groups.setdefault(where, []):
            groups[where].append(text)
    return "; ".join(f"{' / '.join(values)} ({where})" for where, values in groups.items())


def write_csv(results: dict[str, Any], path: Path) -> Path:
    meta = results["meta"]
    rows = {r["key"]: r for r in results["rows"]}
    labels = {p["key"]: p["label"] for p in results["providers"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for c in results["cells"]:
            row = rows[c["row"]]
            common = {
                "suite": row["suite"],
                "model": c["row"],
                "label": row["label"],
                "provider": c["provider"],
                "provider_label": labels.get(c["provider"], c["provider"]),
                "metric": c["metric"],
                "batch": c.get("batch"),
                "dtype": c.get("dtype"),
                "status": c["status"],
                "reason": c.get("reason", ""),
                "first_call_s": c.get("timing", {}).get("first_call_s"),
                "iters": c.get("timing", {}).get("iters"),
                "clock": c.get("timing", {}).get("clock"),
                "device": meta["device"],
                "gpu": meta["gpu"],
                "torch": meta["torch"],
                "git_sha": meta["fastvit_git_sha"],
                "date": meta["date"],
            }
            values = c.get("values") or {}
            if not values:
                w.writerow(common)
            for q, v in values.items():
                pub_metric = {
                    ("infer", "img_s"): "infer_img_s",
                    ("paper_mem", "mem_gib"): "paper_mem_gib",
                    ("paper_fps", "fps"): "paper_fps",
                }.get((c["metric"], q))
                w.writerow(
                    {
                        **common,
                        "quantity": q,
                        "value": v,
                        "unit": UNITS.get(q, ""),
                        "vs_timm_eager": c.get("vs_timm_eager", {}).get(q),
                        "published": _published_text(row, pub_metric) if pub_metric else "",
                    }
                )
    return path


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - len(str(int(abs(v)))), 1)}f}"


class _Notes:
    """Footnotes for cells without a number: the table shows "n/a [2]", the note says why."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], int] = {}

    def mark(self, status: str, reason: str) -> str:
        key = (status, reason)
        if key not in self.items:
            self.items[key] = len(self.items) + 1
        return f"{status} [{self.items[key]}]"

    def lines(self) -> list[str]:
        return [f"[{n}] {status}: {reason}" for (status, reason), n in self.items.items()]


# (metric, quantity, header, with ratio) per suite; columns only appear when their metric was planned.
_COLUMNS = {
    "classification": (
        ("infer", "img_s", "img/s", True),
        ("latency", "ms", "bs1 ms", True),
        ("infer", "peak_mem_gib", "infer GiB", False),
        ("train", "img_s", "train img/s", True),
        ("train", "peak_mem_gib", "train GiB", False),
    ),
    "segmentation": (
        ("paper_mem", "mem_gib", "Mem GiB (paper)", False),
        ("paper_fps", "fps", "fps (paper)", True),
        ("infer", "img_s", "img/s", True),
        ("latency", "ms", "bs1 ms", True),
        ("infer", "peak_mem_gib", "infer GiB", False),
        ("train", "img_s", "train img/s", True),
        ("train", "peak_mem_gib", "train GiB", False),
    ),
}
_PUBLISHED_COLUMNS = {
    "classification": (("infer_img_s", "published img/s"),),
    "segmentation": (("paper_mem_gib", "published Mem GB"), ("paper_fps", "published fps")),
}


def _gmacs_text(row: dict[str, Any], notes: _Notes) -> str:
    g = row.get("gmacs") or {}
    if "reason" in g:
        status, _, reason = g["reason"].partition(": ")
        return notes.mark(status, reason)
    conventions = (("full", "full"), ("linear_norm", "lin+LN"), ("unlabelled", "?"))
    parts = [f"{_fmt(g[k])} {label}" for k, label in conventions if k in g]
    return " / ".join(parts) or "-"


def _params_text(row: dict[str, Any], notes: _Notes) -> str:
    p = row.get("params") or {}
    if "value" in p:
        return f"{p['value'] / 1e6:.2f}"
    status, _, reason = p.get("reason", "n/a: not counted").partition(": ")
    return notes.mark(status, reason)


def markdown(results: dict[str, Any]) -> str:
    """The run's tables (one per suite), header, footnotes and GPU note, as markdown."""
    meta, settings = results["meta"], results["settings"]
    out = [
        f"## fastvit benchmarks: {meta['gpu'] or 'CPU (' + str(meta['cpu_threads']) + ' threads)'}",
        "",
        f"`{meta['command']}`  ",
        f"{meta['date']}; torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta['triton']}, timm {meta['timm']}, "
        f"driver {meta['driver'] or '-'}; fastvit {meta['fastvit']} @ {(meta['fastvit_git_sha'] or 'unknown')[:10]}"
        f"{' (dirty)' if meta.get('git_dirty') else ''}  ",
        f"dtype {settings['dtype']} (paper columns fp32); img/s and ms = median of {settings['iters']} timed calls "
        f"({'CUDA events' if meta['device'].startswith('cuda') else 'host clock'}) after warm-up; batch per row "
        f"(inference / training) unless --batch; vs timm = ratio to timm eager (speed: > 1 is faster)",
    ]
    if results.get("interrupted"):
        out += ["", "**Interrupted: the tables hold what was measured before the interruption.**"]
    if not meta["device"].startswith("cuda"):
        out += [
            "",
            "GPU columns (peak memory, training step, torch.compile, forced Triton/CUDA backends, CUDA-graph "
            "replay, the mmseg paper protocol) need a GPU: torch.cuda.is_available() is False on this machine. "
            "The numbers below are CPU timings.",
        ]
        if meta.get("cpu_note"):
            out += ["", f"Note: {meta['cpu_note']}."]
    notes = _Notes()
    cells = {(c["row"], c["provider"], c["metric"]): c for c in results["cells"]}
    providers = results["providers"]
    for suite in ("classification", "segmentation"):
        rows = [r for r in results["rows"] if r["suite"] == suite]
        if not rows:
            continue
        suite_cells = [c for c in results["cells"] if c["row"] in {r["key"] for r in rows}]
        planned = {c["metric"] for c in suite_cells}
        measured = {(c["metric"], q) for c in suite_cells if c["status"] == "ok" for q in c.get("values", {})}
        measured_metrics = {m for m, _q in measured}
        # A column whose metric was measured but never yields the quantity (memory on a CPU) is dropped.
        cols = [c for c in _COLUMNS[suite] if c[0] in planned and (c[0] not in measured_metrics or c[:2] in measured)]
        # Ratio columns only where timm eager has numbers (no timm segmentors: none in that table).
        has_baseline = any(c["provider"] == BASELINE and c["status"] == "ok" for c in suite_cells)
        cols = [(m, q, title, ratio and has_baseline) for m, q, title, ratio in cols]
        batch_title = "batch inf/train" if "train" in planned else "batch"
        header = ["Model", "Provider", "Params M", "GMACs", batch_title]
        for metric, _q, title, ratio in cols:
            header.append(title)
            if ratio:
                header.append("vs timm")
        header.append("first call s")
        header += [title for _m, title in _PUBLISHED_COLUMNS[suite]]
        out += ["", f"### {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            if not any(c["row"] == row["key"] for c in suite_cells):
                line = [row["label"], "not timed in this run (params and GMACs only)"]
                line += [_params_text(row, notes), _gmacs_text(row, notes), ""]
                line += [""] * (len(header) - len(line) - len(_PUBLISHED_COLUMNS[suite]))
                line += [_published_text(row, m) for m, _title in _PUBLISHED_COLUMNS[suite]]
                out.append("| " + " | ".join(line) + " |")
                continue
            for i, prov in enumerate(providers):
                row_cells = [cells.get((row["key"], prov["key"], m)) for m, *_ in cols]
                line = [row["label"] if i == 0 else "", prov["label"]]
                if i == 0:
                    batch = f"{row['batch']['infer']}" + (f"/{row['batch']['train']}" if "train" in planned else "")
                    line += [_params_text(row, notes), _gmacs_text(row, notes), batch]
                else:
                    line += ["", "", ""]
                present = [c for c in row_cells if c is not None]
                same = (
                    present
                    and all(c["status"] != "ok" for c in present)
                    and len({(c["status"], c.get("reason")) for c in present}) == 1
                )
                for j, ((metric, q, _t, ratio), c) in enumerate(zip(cols, row_cells)):
                    if c is None:
                        text, rtext = "", ""
                    elif c["status"] != "ok":
                        text = notes.mark(c["status"], c.get("reason", "")) if (not same or j == 0) else ""
                        rtext = ""
                    else:
                        text = _fmt(c["values"].get(q))
                        r = c.get("vs_timm_eager", {}).get(q)
                        rtext = f"{r:.2f}x" if r else ""
                    line.append(text)
                    if ratio:
                        line.append(rtext)
                timed = {
                    m: c["timing"]["first_call_s"]
                    for (m, *_), c in zip(cols, row_cells)
                    if c and c["status"] == "ok" and c.get("timing")
                }
                first = next((timed[m] for m in ("infer", "latency", "train", "paper_fps") if m in timed), None)
                line.append(_fmt(first) if first is not None else "")
                for pub_metric, _title in _PUBLISHED_COLUMNS[suite]:
                    line.append(_published_text(row, pub_metric) if i == 0 else "")
                out.append("| " + " | ".join(line) + " |")
    if notes.items:
        out += ["", *notes.lines()]
    chart_note = results.get("chart")
    if chart_note:
        out += ["", f"Chart: {chart_note}"]
    return "\n".join(out) + "\n"


def compare(new: dict[str, Any], old: dict[str, Any]) -> str:
    """Markdown table of new / old for every number present in both results files."""
    old_cells = {(c["row"], c["provider"], c["metric"]): c for c in old["cells"]}
    lines = [
        f"## compare: this run vs {old['meta']['date']} ({old['meta']['gpu'] or 'CPU'}, "
        f"fastvit @ {(old['meta']['fastvit_git_sha'] or 'unknown')[:10]}, dtype {old['settings']['dtype']})",
        "",
        "| Model | Provider | Metric | Quantity | old | new | new/old |",
        "|---|---|---|---|---|---|---|",
    ]
    if (new["meta"]["gpu"], new["settings"]["dtype"]) != (old["meta"]["gpu"], old["settings"]["dtype"]):
        lines.insert(
            1,
            f"\nNote: GPU or dtype differ ({old['meta']['gpu']}/{old['settings']['dtype']} -> "
            f"{new['meta']['gpu']}/{new['settings']['dtype']}).",
        )
    matched = 0
    for c in new["cells"]:
        o = old_cells.get((c["row"], c["provider"], c["metric"]))
        if c.get("status") != "ok" or not o or o.get("status") != "ok":
            continue
        for q, v in c.get("values", {}).items():
            ov = o.get("values", {}).get(q)
            if ov:
                matched += 1
                lines.append(
                    f"| {c['row']} | {c['provider']} | {c['metric']} | {q} ({UNITS.get(q, '')}) | "
                    f"{_fmt(ov)} | {_fmt(v)} | {v / ov:.3f} |"
                )
    if not matched:
        lines.append("| (no number measured in both runs) | | | | | | |")
    lines.append("")
    lines.append("new/old > 1: more img/s or fps, but also more ms or GiB (worse) for those quantities.")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> str:
    """PNG of inference img/s and peak memory per model and provider; returns what happened, in words."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib; it is a dependency of fastvit)"
    panels = (
        ("infer", "img_s", "inference img/s (log)"),
        ("infer", "peak_mem_gib", "inference peak memory GiB"),
        ("paper_mem", "mem_gib", "training Mem GiB (mmseg protocol)"),
    )
    data = []
    for metric, q, title in panels:
        series: dict[str, dict[str, float]] = {}
        for c in results["cells"]:
            v = c.get("values", {}).get(q) if c.get("status") == "ok" and c["metric"] == metric else None
            if v is not None:
                series.setdefault(c["provider"], {})[c["row"]] = v
        if series:
            data.append((title, series))
    if not data:
        return "skipped: no measured numbers to draw"
    labels = {r["key"]: r["label"] for r in results["rows"]}
    provider_labels = {p["key"]: p["label"] for p in results["providers"]}
    fig, axes = plt.subplots(len(data), 1, figsize=(14, 4.5 * len(data)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], data):
        models = [r["key"] for r in results["rows"] if any(r["key"] in s for s in series.values())]
        width = 0.8 / len(series)
        for k, (prov, values) in enumerate(series.items()):
            xs = [i + k * width for i, m in enumerate(models) if m in values]
            ax.bar(xs, [values[m] for m in models if m in values], width, label=provider_labels.get(prov, prov))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
        ax.set_xticklabels([labels[m] for m in models], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        if "log" in title:
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"fastvit benchmarks on {results['meta']['gpu'] or 'CPU'} ({results['settings']['dtype']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"written to {path.name}"

"""``python benchmarks/run.py``: the fps and memory columns of the seed tables, beside every baseline.

What it measures
----------------
Rows (``--suite classification|segmentation|all``, ``--models`` with names or wildcards): ViT-B/16,
B/32, L/16, L/32 at 224 and 384, ViT-H/14 at 224, R50+ViT-B/16 at 384, DeiT-Ti/S/B, T2T-ViT-t-14/19/24;
UPerNet (ViT-B, DeiT-S, DeiT-B, with and without MLN and the final LayerNorm) and DPT ViT-B at 512x512.

Providers (``--providers``), all in the same run: timm eager (SDPA attention), timm + torch.compile
(default mode; max-autotune), timm + fastvit.patch_model, fastvit (auto backend), fastvit with each
backend forced (FASTVIT_BACKEND=torch|triton|cuda), fastvit + torch.compile, fastvit replayed from a
CUDA graph at batch 1. Every number is also given as a ratio to timm eager. A provider that does not
apply says so in its cell ("n/a: timm has no T2T-ViT"); one that is missing today says "not
available: <reason>". No number is ever printed that was not measured in this run.

Columns: parameters (M, trainable, counted on the meta device); GMACs from fastvit.utils.count_flops
in its labelled conventions ("full" includes the attention matmuls; "lin+LN" counts Linear and
LayerNorm only, the mmpretrain convention); inference img/s at a batch that fills the GPU (per row;
``--batch`` overrides); batch-1 latency (ms); inference peak memory; training-step img/s and peak
memory (GiB). Segmentation rows add mmseg's paper protocol: Mem = peak allocated memory in a training
step on 2 images of 512x512 in fp32 (AdamW, after two warm-up steps); fps = batch-1 predict in fp32,
5 warm-up and 200 timed calls, 1 / mean time (on a fixed 512x512 input rather than ADE20K's images).
The published value stands beside ours with the GPU it was measured on (benchmarks/published.py).

Method
------
* Inputs: random normal images (never zeros), three buffers rotated so repeated calls do not time a
  warm cache; random labels for training steps.
* Warm-up until compilation and autotuning are done: the first call is timed alone and reported as
  "first call s" (the table shows the inference measurement's, the JSON every measurement's); further
  calls run in windows until two consecutive windows agree within 10% (capped by ``--max-warmup-s``).
  Only then are calls timed.
* Timing: CUDA events around each call, median of ``--iters`` (>= 20, default 30) timed calls; on a
  CPU the host clock. GPU clocks are left as they are.
* Memory: ``torch.cuda.max_memory_allocated`` over one call after resetting the peak: weights,
  optimizer state, inputs and activations all count (as in mmseg's Mem).
* Precision: ``--dtype bf16|fp16|fp32`` (bf16 by default on a GPU, fp32 on a CPU). Inference casts
  weights and inputs to it; training autocasts over fp32 weights (SGD with momentum, as timm's
  benchmark.py). The paper-protocol columns are always fp32.
* torch.compile runs with ``dynamic=False`` and fresh dynamo caches per cell; CUDA-graph replay copies
  each input into the captured buffer before replaying.
* An out-of-memory cell is skipped with a note; Ctrl-C, SIGTERM or the ``--budget-min`` deadline
  stops the run and still writes what was measured (the JSON is also rewritten after every cell).

Output: a markdown table on stdout; under benchmarks/results/ (``--out``) a JSON record (GPU,
driver, torch / triton / CUDA versions, fastvit git sha, date, command line, fastvit.info), a CSV with
one line per number, the markdown table, a log with one line per measurement, and a PNG chart of
img/s and memory (when matplotlib is installed). ``--compare FILE`` prints the ratios of this run to
an earlier results file.

Without a GPU, ``python benchmarks/run.py`` runs a small CPU table (DeiT-Ti and T2T-ViT-t-14 at batch 8
and batch 1; timm eager and fastvit's torch backend; three warm-up calls, as eager CPU code has nothing
to compile; one thread when the machine is already busier than its cores) in under 3 minutes on a
2-core machine, and says which columns need a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from _harness import report
from _harness.measure import METRICS, Settings, plan_for, run_cell, status_result
from _harness.providers import (
    CPU_PROVIDERS,
    PROVIDERS,
    Provider,
    count_gmacs,
    count_params,
    provider_by_key,
    unavailable_reason,
)
from _harness.rows import CPU_QUICK_BATCH, CPU_QUICK_MODELS, SUITES, ModelRow, select_rows
from published import published_for

from fastvit._cli import ArgumentParser, add_debug_flag, run_main
from fastvit._timing import MIN_TIMED_ITERS
from fastvit.fileio import atomic_write_text

__all__ = ["main", "parse_args"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Eager CPU code has nothing to compile or autotune: the first call plus two more warm it up.
CPU_WARMUP_CALLS = 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _iters(text: str) -> int:
    n = int(text)
    if n < MIN_TIMED_ITERS:
        raise argparse.ArgumentTypeError(
            f"{n} < {MIN_TIMED_ITERS}: the method takes the median of >= {MIN_TIMED_ITERS} timed calls"
        )
    return n


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: a batch must be >= 1")
    return n


def _finite(text: str, unit: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number of {unit} {bound}")
    return value


def _budget_minutes(text: str) -> float:
    return _finite(text, "minutes", allow_zero=False)


def _seconds(text: str) -> float:
    return _finite(text, "seconds", allow_zero=True)


# What --compare reads from an earlier results file (report.compare): checked before anything is measured.
_COMPARE_KEYS = {"meta": ("date", "gpu", "fastvit_git_sha"), "settings": ("dtype",)}
_CELL_KEYS = ("row", "provider", "metric")


def _load_compare(path: Path) -> dict[str, Any]:
    """The earlier results file, with every field --compare uses present; ValueError naming the one missing."""
    data = report.load_results(path)
    for section, keys in _COMPARE_KEYS.items():
        block = data.get(section)
        missing = [k for k in keys if not isinstance(block, dict) or k not in block]
        if missing:
            raise ValueError(f"--compare: {path} lacks {section}.{missing[0]}: not a complete results file")
    cells = data.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) and all(k in c for k in _CELL_KEYS) for c in cells):
        raise ValueError(f"--compare: {path} has no list of cells with {', '.join(_CELL_KEYS)}")
    return data


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv`` without the program name); every check (including reading the
    --compare file) happens here, before anything is measured."""
    p = ArgumentParser(
        prog="python benchmarks/run.py",
        description="Measure the fps and memory columns of the seed tables for fastvit and its baselines.",
    )
    p.add_argument("--suite", choices=SUITES, help="rows to run (default: all on a GPU; a small CPU set without one)")
    p.add_argument(
        "--models",
        type=_csv_list,
        action="extend",
        help="comma-separated model names or labels, wildcards allowed (e.g. 'vit_base_*,DeiT-S*')",
    )
    p.add_argument(
        "--providers",
        type=_csv_list,
        action="extend",
        help=f"comma-separated providers (default: all on a GPU; {','.join(CPU_PROVIDERS)} on a CPU); "
        f"known: {', '.join(x.key for x in PROVIDERS)}",
    )
    p.add_argument(
        "--metrics",
        type=_csv_list,
        action="extend",
        help="comma-separated metrics (default: all that apply on a GPU; infer,latency on a CPU); "
        f"known: {', '.join(METRICS)}",
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), help="inference / autocast dtype (default bf16 on a GPU, fp32 on a CPU)"
    )
    p.add_argument(
        "--batch",
        type=_positive,
        help=f"inference batch for every row (default: per row on a GPU, {CPU_QUICK_BATCH} on a CPU)",
    )
    p.add_argument("--train-batch", type=_positive, help="training-step batch for every row (default: per row)")
    p.add_argument("--iters", type=_iters, help="timed calls per measurement, >= 20 (default 30 on a GPU, 20 on a CPU)")
    p.add_argument(
        "--max-warmup-s", type=_seconds, help="cap on the automatic warm-up after the first call (default 120 s)"
    )
    p.add_argument(
        "--budget-min",
        type=_budget_minutes,
        metavar="MINUTES",
        help="start no new measurement after this many minutes; the rest is marked, the files written",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results)")
    p.add_argument(
        "--compare", type=Path, metavar="FILE", help="an earlier results JSON: print this run's ratios to it"
    )
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; it must be a folder (or not exist yet)")
    try:
        args.compare_results = _load_compare(args.compare) if args.compare else None
    except ValueError as exc:
        p.error(str(exc))
    if args.providers:
        for key in args.providers:
            try:
                provider_by_key(key)
            except ValueError as exc:
                p.error(str(exc))
    if args.metrics:
        unknown = [m for m in args.metrics if m not in METRICS]
        if unknown:
            p.error(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    try:
        args.rows = _choose_rows(args, torch.cuda.is_available())
    except ValueError as exc:
        p.error(str(exc))
    return args


def _choose_rows(args: argparse.Namespace, has_gpu: bool) -> list[ModelRow]:
    """The rows to report. A plain CPU run lists every row (params and GMACs, counted on the meta device)
    but times only CPU_QUICK_MODELS (see ``args.timed``)."""
    args.timed = None
    if not has_gpu and not args.models and not args.suite:
        args.timed = set(CPU_QUICK_MODELS)
    return select_rows(args.suite or "all", args.models)


def _fit_cpu_threads() -> Optional[str]:
    """On a CPU already busier than its cores, drop to one thread; say so (None when idle enough).

    Two spinning OpenMP threads on an oversubscribed machine run several times slower than one
    (measured on the 2-core CI machine at load 10: 4-7 s vs 1.5 s for a DeiT-Ti batch of 8).
    """
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load <= cores or torch.get_num_threads() == 1:
        return None
    torch.set_num_threads(1)
    return (
        f"this CPU is busy (load average {load:.1f} on {cores} cores): timed with 1 thread; "
        "the CPU timings say little about speed"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _row_record(row: ModelRow, providers: Sequence[Provider], s: Settings) -> dict[str, Any]:
    """Static facts of a row: params and GMACs (from the fastvit model when it exists, else timm's)."""
    fastvit_p = next((p for p in PROVIDERS if p.key == "fastvit_auto"))
    timm_p = next((p for p in PROVIDERS if p.key == "timm_eager"))
    cpu = torch.device("cpu")
    builder = fastvit_p if unavailable_reason(fastvit_p, row, cpu) is None else timm_p
    if builder is timm_p and unavailable_reason(timm_p, row, cpu) is not None:
        reason = unavailable_reason(fastvit_p, row, cpu) or "not available: no library builds this model"
        params: dict[str, Any] = {"reason": reason}
        gmacs: dict[str, Any] = {"reason": reason}
    else:
        params = count_params(builder, row)
        gmacs = count_gmacs(builder, row)
    return _row_facts(row, s, params, gmacs)


def _row_facts(row: ModelRow, s: Settings, params: dict[str, Any], gmacs: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": row.key,
        "label": row.label,
        "suite": row.suite,
        "img_size": row.img_size,
        "timm_name": row.timm_name,
        "batch": {"infer": s.batch(row, "infer"), "train": s.batch(row, "train")},
        "params": params,
        "gmacs": gmacs,
        "published": [p.as_dict() for p in published_for(row.key)],
    }


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (a timeout, a scheduler) or the --budget-min deadline, handled like Ctrl-C: stop and
    write what was measured."""

    def __init__(self, why: str = "the run was stopped before this cell") -> None:
        super().__init__(why)
        self.why = why


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Interrupted("the run was stopped (SIGTERM) before this cell")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks; returns the exit status (130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run_main(lambda: _run(args, argv), args.debug)
    finally:
        torch.set_num_threads(threads)  # the CPU policy below must not outlive the call (tests call main)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    has_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if has_gpu else torch.device("cpu")
    dtype_name = args.dtype or ("bf16" if has_gpu else "fp32")
    settings = Settings(
        device=device,
        dtype=DTYPES[dtype_name],
        iters=args.iters or (30 if has_gpu else MIN_TIMED_ITERS),
        infer_batch=args.batch or (None if has_gpu else CPU_QUICK_BATCH),
        train_batch=args.train_batch,
        max_warmup_s=args.max_warmup_s if args.max_warmup_s is not None else 120.0,
        warmup="auto" if has_gpu else CPU_WARMUP_CALLS,
    )
    busy_note = None if has_gpu else _fit_cpu_threads()
    providers = (
        [provider_by_key(k) for k in args.providers]
        if args.providers
        else (list(PROVIDERS) if has_gpu else [provider_by_key(k) for k in CPU_PROVIDERS])
    )
    old = args.compare_results  # read and checked by parse_args, before measuring anything

    from tqdm import tqdm

    meta = report.environment(device, "python " + shlex.join(["benchmarks/run.py", *argv]))
    meta["cpu_note"] = busy_note
    results: dict[str, Any] = {
        "schema": report.SCHEMA,
        "meta": meta,
        "settings": {
            "dtype": dtype_name,
            "iters": settings.iters,
            "infer_batch": args.batch,
            "train_batch": args.train_batch,
            "max_warmup_s": settings.max_warmup_s,
            "warmup": settings.warmup,
            "buffers": settings.buffers,
            "providers": [p.key for p in providers],
            "metrics": args.metrics or "default",
        },
        "providers": [{"key": p.key, "label": p.label} for p in providers],
        "rows": [],
        "cells": [],
        "interrupted": False,
    }
    stamp = meta["date"].replace("-", "").replace(":", "")
    stem = args.out / f"run-{stamp}-{_slug(meta['gpu'] or 'cpu')}-{dtype_name}"

    def metrics_for(row: ModelRow) -> list[str]:
        return plan_for(row, device, args.metrics) if args.timed is None or row.key in args.timed else []

    plan = [(row, p, metrics_for(row)) for row in args.rows for p in providers]
    done: set[tuple[str, str, str]] = set()

    deadline = time.monotonic() + 60 * args.budget_min if args.budget_min else None

    log = _open_log(stem.with_suffix(".log"), meta)

    def record(row: ModelRow, prov: Provider, metric: str, result: dict[str, Any]) -> None:
        results["cells"].append({"row": row.key, "provider": prov.key, "metric": metric, **result})
        done.add((row.key, prov.key, metric))
        report.write_json(results, stem.with_suffix(".json"))  # a crash or kill keeps what was measured
        log.write(report.log_line(results["cells"][-1]) + "\n")
        log.flush()
        if deadline is not None and time.monotonic() > deadline:
            raise _Interrupted(f"the --budget-min {args.budget_min:g} deadline passed before this cell")

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    bar = tqdm(
        total=sum(len(m) for _, _, m in plan), unit="cell", desc="benchmarks", dynamic_ncols=True, file=sys.stderr
    )
    try:
        for row in args.rows:
            bar.set_postfix_str(f"{row.key}: params/GMACs")
            results["rows"].append(_row_record(row, providers, settings))
            for prov in providers:
                metrics = metrics_for(row)
                bar.set_postfix_str(f"{row.key} / {prov.key}")

                def on_result(metric: str, result: dict[str, Any], row: ModelRow = row, prov: Provider = prov) -> None:
                    record(row, prov, metric, result)
                    bar.update(1)

                run_cell(row, prov, metrics, settings, on_result)
    except KeyboardInterrupt as exc:
        why = exc.why if isinstance(exc, _Interrupted) else "the run was stopped (Ctrl-C) before this cell"
        results["interrupted"] = True
        recorded = {r["key"] for r in results["rows"]}
        for row, prov, metrics in plan:
            if row.key not in recorded:
                results["rows"].append(_row_record_stub(row, settings))
                recorded.add(row.key)
            for metric in metrics:
                if (row.key, prov.key, metric) not in done:
                    results["cells"].append(
                        {"row": row.key, "provider": prov.key, "metric": metric, **status_result(f"interrupted: {why}")}
                    )
    finally:
        bar.close()
        log.close()
        signal.signal(signal.SIGTERM, previous)

    report.with_ratios(results["cells"])
    results["chart"] = report.chart(results, stem.with_suffix(".png"))
    report.write_json(results, stem.with_suffix(".json"))
    report.write_csv(results, stem.with_suffix(".csv"))
    table = report.markdown(results)
    atomic_write_text(stem.with_suffix(".md"), table)
    print(table)
    if old is not None:
        print(report.compare(results, old))
    written = ", ".join(str(stem.with_suffix(s).relative_to(args.out)) for s in (".json", ".csv", ".md", ".log"))
    if results["chart"].startswith("written"):
        written += f", {stem.with_suffix('.png').name}"
    print(f"results: {args.out}/ {written}")
    return 130 if results["interrupted"] else 0


def _open_log(path: Path, meta: dict[str, Any]) -> Any:
    """The run's log: one line per measurement as it lands (the JSON holds the details)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "w")
    log.write(
        f"# {meta['command']}\n# {meta['date']} {meta['gpu'] or 'CPU'} torch {meta['torch']} "
        f"fastvit @ {meta['fastvit_git_sha']}\n"
    )
    return log


def _row_record_stub(row: ModelRow, s: Settings) -> dict[str, Any]:
    """A row reached by no cell before an interruption: its static facts were not computed."""
    reason = {"reason": "interrupted: the run was stopped before this row"}
    return _row_facts(row, s, reason, reason)


if __name__ == "__main__":
    sys.exit(main())

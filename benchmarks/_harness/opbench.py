"""The op-bench runner: every ``benchmarks/bench_<op>.py`` is an :class:`OpSpec` handed to :func:`run`.

A spec declares what differs between ops: its cases (named shapes, built per dtype, with the FLOPs and/or
bytes each mode must do), its providers (name -> zero-argument call on the case's inputs: fastvit per
backend through ``backend=``, the torch baseline through the op's ``fastvit.ops.<op>_ref``, other
competitors such as SDPA), the ceiling its throughput is a fraction of, the baseline the speedup is
against, and its own command-line options. The runner owns the rest, the same for every op:

* the command line: ``--dtypes`` (alias ``--dtype``), ``--modes fwd fwd_bwd`` (``--backward`` adds
  ``fwd_bwd``), ``--backends``, ``--device``, ``--no-save``, ``--csv``, plus the spec's options;
* the device: CUDA by default (without a GPU it says so and exits 0), ``--device cpu`` for a CPU run;
* timing through ``fastvit._timing``: the first call timed alone (``cold_ms``: compilation, autotuning),
  then the median of ``median_ms`` (``triton.testing.do_bench``: warm-up, L2 flushed) on a GPU, of
  ``time_calls`` (warm-up, host clock) on the CPU; ``fwd`` runs under ``torch.no_grad()``, ``fwd_bwd``
  is forward + ``torch.autograd.grad`` for the case's leaves against fixed random output gradients;
* metrics: TFLOP/s from the case's FLOPs, GB/s from its bytes, ``of_ceiling`` against the ceiling
  measured in the same run (device copy bandwidth, ``torch.matmul`` at 8192^3, or the case's own
  same-shape reference call), ``vs_baseline`` = baseline ms / provider ms (> 1: faster than the baseline);
* a provider (or a case's inputs) that cannot run becomes a row with ``status: "not run"`` and its reason;
* output: a markdown table, and benchmarks/results/<op>_<gpu>_<date>.json (and .csv) through
  ``bench_utils.write_results`` with the one environment record (``_harness.report.environment``).

Row schema (one per case x dtype x mode x provider): the case's label columns, ``dtype``, ``mode``,
``provider``, ``status``; when ok ``ms``, ``cold_ms``, ``TFLOP/s`` / ``GB/s`` (when the case gives the
work), ``ceiling`` / ``ceiling_value`` / ``of_ceiling`` (when a ceiling is known), ``baseline`` /
``vs_baseline`` (when the baseline ran); when not run ``reason``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

__all__ = ["MODES", "Case", "OpSpec", "Option", "Unavailable", "measure", "parse_args", "run"]

MODES = ("fwd", "fwd_bwd")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
# How many timed calls on the CPU (the GPU path lets do_bench choose from its time budget).
CPU_ITERS = 20
CPU_WARMUP_CALLS = 3

Inputs = dict[str, torch.Tensor]
Call = Callable[[], Any]


class Unavailable(RuntimeError):
    """Raised by a provider call that cannot run here; its message becomes the row's reason."""


@dataclass
class Case:
    """One benchmarked shape, for one dtype.

    Args:
        label: the columns naming the case in every row (e.g. ``{"rows": 12608, "width": 768}``).
        inputs: ``(device, dtype) -> {name: tensor}``; called once per case, tensors without gradients.
        flops: mode -> floating-point operations one call does (TFLOP/s); a mode missing here has none.
        bytes: mode -> bytes one call must move (GB/s).
        leaves: names of the inputs that get gradients in ``fwd_bwd`` (a provider may name its own).
        reference: ``inputs -> call``: a same-work call whose throughput is this case's ``fwd`` ceiling
            (linear: ``torch.matmul`` of the same operands); overrides the spec's ceiling for ``fwd``.
        reference_name: the ``ceiling`` column for ``reference``.
    """

    label: dict[str, Any]
    inputs: Callable[[torch.device, torch.dtype], Inputs]
    flops: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)
    leaves: tuple[str, ...] = ()
    reference: Optional[Callable[[Inputs], Call]] = None
    reference_name: str = "same-shape reference"


@dataclass
class Option:
    """One spec-specific command-line option: ``argparse.add_argument(*flags, **kwargs)``."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


# A provider is a zero-argument call, or (call, the tensors it needs gradients for in fwd_bwd).
Provider = Union[Call, tuple[Call, Sequence[torch.Tensor]]]


@dataclass
class OpSpec:
    """What one bench_<op>.py declares.

    Args:
        name: results file stem (benchmarks/results/<name>_<gpu>_<date>.json).
        op: the fastvit op whose non-torch backends are timed by default (``fastvit.ops.dispatch``).
        doc: the script's docstring (``--help``).
        cases: ``(args, dtype) -> cases`` for one dtype.
        providers: ``(case, inputs, backends) -> {name: provider}``, in reporting order.
        baseline: the provider the speedup is against, or a predicate on provider names: the fastest of
            those that ran is the baseline (attention: the fastest non-math SDPA backend).
        ceiling: "copy" (device copy GB/s), "matmul" (torch.matmul TFLOP/s at 8192^3) or None.
        dtypes: default ``--dtypes``.
        modes: default ``--modes``.
        options: the spec's own command-line options.
        csv: write the .csv beside the JSON without ``--csv``.
        extras: ``args -> {key: value}`` recorded at the top of the JSON.
    """

    name: str
    op: str
    doc: str
    cases: Callable[[argparse.Namespace, torch.dtype], Iterable[Case]]
    providers: Callable[[Case, Inputs, Sequence[str]], dict[str, Provider]]
    baseline: Union[str, Callable[[str], bool]] = "torch"
    ceiling: Optional[str] = None
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    modes: tuple[str, ...] = ("fwd",)
    options: tuple[Option, ...] = ()
    csv: bool = False
    extras: Optional[Callable[[argparse.Namespace], dict[str, Any]]] = None


# ---------------------------------------------------------------------------------------- command line


def _dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return str(DTYPES[text]).replace("torch.", "")


def _all_backends(op: str) -> list[str]:
    from fastvit.ops import dispatch

    return list(dispatch.backends_of(op))


def parser_for(spec: OpSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=spec.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = parser.add_argument_group("common to every bench_<op>.py (benchmarks/_harness/opbench.py)")
    common.add_argument(
        "--dtypes",
        "--dtype",
        nargs="+",
        type=_dtype_name,
        default=list(spec.dtypes),
        help=f"default: {' '.join(spec.dtypes)} (bf16/fp16/fp32 or torch names)",
    )
    common.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(spec.modes),
        help=f"fwd (under no_grad) and/or fwd_bwd; default: {' '.join(spec.modes)}",
    )
    common.add_argument("--backward", action="store_true", help="also time forward + backward (adds fwd_bwd)")
    common.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help=f"fastvit backends to time (default: those of {spec.op} except torch)",
    )
    common.add_argument("--device", default="cuda", help="cuda (default; exits 0 without a GPU) or cpu")
    common.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    common.add_argument("--csv", action="store_true", default=spec.csv, help="also write a .csv beside the JSON")
    for option in spec.options:
        parser.add_argument(*option.flags, **option.kwargs)
    return parser


def parse_args(spec: OpSpec, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The spec's command line, checked: bad values exit 2 with a message naming the flag and the fix."""
    parser = parser_for(spec)
    args = parser.parse_args(argv)
    if args.backward and "fwd_bwd" not in args.modes:
        args.modes = [*args.modes, "fwd_bwd"]
    args.dtypes = list(dict.fromkeys(_dtype_name(d) for d in args.dtypes))  # the defaults skip argparse's type
    known = _all_backends(spec.op)
    if args.backends is None:
        args.backends = [b for b in known if b != "torch"]
    unknown = [b for b in args.backends if b not in known]
    if unknown:
        parser.error(f"--backends: {spec.op} has no backend {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}; use cuda, cuda:<index> or cpu")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: only cuda and cpu are supported")
    return args


# ---------------------------------------------------------------------------------------- measuring


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(call: Call, device: torch.device) -> tuple[float, float]:
    """(cold_ms, median ms): the first call alone, then the median after warm-up (fastvit._timing)."""
    from fastvit import _timing

    _synchronize(device)
    t0 = time.perf_counter()
    call()
    _synchronize(device)
    cold_ms = (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        return cold_ms, _timing.median_ms(call)
    timing = _timing.time_calls(
        lambda _: call(), [None], iters=max(CPU_ITERS, _timing.MIN_TIMED_ITERS), warmup=CPU_WARMUP_CALLS, device=device
    )
    return cold_ms, timing.median_ms


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    raise TypeError(f"a provider returned {type(out).__name__}; fwd_bwd needs a tensor or a tuple of tensors")


def _fwd_bwd(call: Call, leaves: Sequence[torch.Tensor]) -> Call:
    """forward + backward for ``leaves`` against random output gradients made once (not timed)."""
    if not leaves:
        raise Unavailable("no input of this case takes a gradient")
    for t in leaves:
        t.requires_grad_(True)
    outs = _tensors(call())
    grads = [torch.randn_like(o) for o in outs]

    def step() -> None:
        torch.autograd.grad(_tensors(call()), list(leaves), grads)

    return step


def _ceiling(kind: Optional[str], dtype: torch.dtype, device: torch.device) -> Optional[tuple[str, str, float]]:
    """(name, unit, value) of the spec's ceiling, measured now; None without one (or on the CPU)."""
    if kind is None or device.type != "cuda":
        return None
    from fastvit import _timing

    with torch.cuda.device(device):
        if kind == "copy":
            return "device copy", "GB/s", _timing.copy_bandwidth_gbps()
        if kind == "matmul":
            return "torch.matmul 8192^3", "TFLOP/s", _timing.matmul_ceiling_tflops(dtype)
    raise ValueError(f"OpSpec.ceiling {kind!r}: use 'copy', 'matmul' or None")


def _is_baseline(spec: OpSpec, provider: str) -> bool:
    return spec.baseline(provider) if callable(spec.baseline) else provider == spec.baseline


def _add_baseline(spec: OpSpec, rows: list[dict[str, Any]]) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    base = [r for r in ok if _is_baseline(spec, r["provider"])]
    if not base:
        return
    fastest = min(base, key=lambda r: r["ms"])
    for r in ok:
        if r is not fastest:
            r["baseline"], r["vs_baseline"] = fastest["provider"], fastest["ms"] / r["ms"]


def _measure_case(spec: OpSpec, args: argparse.Namespace, case: Case, dtype_name: str, ceilings: dict) -> list:
    device, dtype = args.device, DTYPES[dtype_name]
    head = {**case.label, "dtype": dtype_name}
    rows: list[dict[str, Any]] = []
    try:
        inputs = case.inputs(device, dtype)
        providers = spec.providers(case, inputs, args.backends)
    except Exception as exc:  # e.g. out of memory: the whole case is reported, not hidden
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [{**head, "mode": m, "provider": "*", "status": "not run", "reason": _reason(exc)} for m in args.modes]
    reference = None
    if case.reference is not None and "fwd" in args.modes:
        flops, nbytes = case.flops.get("fwd"), case.bytes.get("fwd")
        work, unit = (flops / 1e12, "TFLOP/s") if flops else (nbytes / 1e9 if nbytes else None, "GB/s")
        if work:
            try:
                with torch.no_grad():
                    ref_ms = _time(case.reference(inputs), device)[1]
                reference = (case.reference_name, unit, work / (ref_ms * 1e-3))
            except Exception as exc:
                print(f"{spec.name}: {case.reference_name} for {case.label} not run: {_reason(exc)}", file=sys.stderr)
    for mode in args.modes:
        mode_rows = []
        for name, provider in providers.items():
            call, own_leaves = provider if isinstance(provider, tuple) else (provider, None)
            leaves = list(own_leaves) if own_leaves is not None else [inputs[k] for k in case.leaves]
            row: dict[str, Any] = {**head, "mode": mode, "provider": name}
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        cold_ms, ms = _time(call, device)
                else:
                    step = _fwd_bwd(call, leaves)
                    cold_ms, ms = _time(step, device)
            except Exception as exc:  # a provider that cannot run is reported with its reason
                mode_rows.append({**row, "status": "not run", "reason": _reason(exc)})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            finally:
                for t in leaves:
                    t.requires_grad_(False)
            row.update(status="ok", ms=ms, cold_ms=cold_ms)
            if case.flops.get(mode):
                row["TFLOP/s"] = case.flops[mode] / (ms * 1e-3) / 1e12
            if case.bytes.get(mode):
                row["GB/s"] = case.bytes[mode] / (ms * 1e-3) / 1e9
            ceiling = reference if (mode == "fwd" and reference) else ceilings.get(dtype_name)
            if ceiling is not None and ceiling[1] in row:
                row.update(
                    ceiling=f"{ceiling[0]} {ceiling[1]}",
                    ceiling_value=ceiling[2],
                    of_ceiling=row[ceiling[1]] / ceiling[2],
                )
            mode_rows.append(row)
        _add_baseline(spec, mode_rows)
        rows.extend(mode_rows)
    del inputs, providers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(spec: OpSpec, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All rows of the spec under ``args`` (from :func:`parse_args`), and the run's record for the JSON."""
    ceilings: dict[str, tuple[str, str, float]] = {}
    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        ceiling = _ceiling(spec.ceiling, DTYPES[dtype_name], args.device)
        if ceiling is not None:
            ceilings[dtype_name] = ceiling
            print(f"{dtype_name} ceiling ({ceiling[0]}): {ceiling[2]:.0f} {ceiling[1]}")
        for case in spec.cases(args, DTYPES[dtype_name]):
            rows.extend(_measure_case(spec, args, case, dtype_name, ceilings))
    record = {
        "op": spec.op,
        "device": str(args.device),
        "modes": list(args.modes),
        "backends": list(args.backends),
        "ceilings": {d: {"name": c[0], "unit": c[1], "value": c[2]} for d, c in ceilings.items()},
        **(spec.extras(args) if spec.extras else {}),
    }
    if spec.ceiling and not ceilings:
        record["ceilings_reason"] = f"the {spec.ceiling} ceiling is measured on a GPU only (device {args.device})"
    return rows, record


COLUMNS = ("dtype", "mode", "provider", "ms", "cold_ms", "TFLOP/s", "GB/s", "of_ceiling", "vs_baseline", "reason")


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The case label columns (in order of appearance), then the runner's columns that some row has."""
    label = [
        k for r in rows for k in r if k not in COLUMNS and k not in ("status", "baseline", "ceiling", "ceiling_value")
    ]
    present = {k for r in rows for k in r}
    return list(dict.fromkeys(label)) + [c for c in COLUMNS if c in present]


def run(spec: OpSpec, argv: Optional[Sequence[str]] = None) -> int:
    """A bench_<op>.py's main: parse, measure, print the table, write the results; returns the exit code."""
    from bench_utils import markdown_table, write_results

    args = parse_args(spec, argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"bench_{spec.name}.py: no GPU visible to torch (torch.cuda.is_available() is False); this benchmark "
            "times GPU kernels. Run it on an NVIDIA GPU machine, or pass --device cpu for a CPU run."
        )
        return 0
    rows, record = measure(spec, args)
    print(markdown_table(rows, table_columns(rows)))
    if not args.no_save:
        path = write_results(spec.name, rows, record, csv_too=args.csv, device=args.device)
        print("wrote", path, *(["and", path[: -len(".json")] + ".csv"] if args.csv else []))
    return 0

"""``python -m fastvit.selftest``: does fastvit work on this GPU, and how fast, in one command within a budget.

    python -m fastvit.selftest [--budget-min 8] [--out DIR] [--quick | --full] [--sanitize] [--list]

Order of a run:

1. **Environment**: ``fastvit.info.collect()`` (versions, GPU, driver, git sha, fastvit._C and its build).
2. **Correctness**, riskiest first: every op x backend x fp32/fp16/bf16 on the shapes the models use
   (ViT-B/16, ViT-L/16@384, ViT-H/14, DeiT-S, the T2T-ViT-t-14 soft splits and its 3136-token
   attention; batch 1 and 256, the batch capped where the fp64 oracle would not fit), output and every
   gradient judged by :mod:`fastvit.testing` (three-way rule for attention / GEMM-like ops, the tolerance
   table for layer norm and soft split); then whole models (fastvit ViT-B/16 and a patched timm
   ViT-B/16 against fp32 timm, ``torch.compile(fullgraph=True)`` of both, CUDA-graph capture and replay,
   one training step); with ``--sanitize`` one case per kernel under compute-sanitizer.
3. **Speed**, as ratios: each op's backends at the ViT-B/16 bs256 bf16 shapes against the torch
   composition it replaces, with TFLOP/s or GB/s against ceilings measured in the same run; ViT-B/16
   img/s and batch-1 latency. Timed with :mod:`fastvit._timing` (the benchmarks' timer).

Every case runs in a worker subprocess that is restarted after a crash, so a CUDA fault in one case is
reported as that case's failure and the next case still runs. The budget bounds the whole run: speed
cases are dropped first (at planning and again whenever time runs short), correctness cases only when the
budget is spent, and every case that did not run is listed with its reason. Exit status: 1 when any
correctness case failed, errored, crashed or hung; 0 otherwise.

Without a GPU the correctness cases run on the CPU (torch backend, and the Triton kernels under
``TRITON_INTERPRET=1`` at small shapes, set in the worker's environment before fastvit is imported); the
GPU-only cases are listed as such.

Output, in ``--out`` (default ``fastvit-selftest-<UTC time>``): ``selftest.json`` (environment and every
case), ``summary.md`` (read this first) and ``selftest.log`` (the raw log), rewritten after every case.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["Case", "Worker", "build_cases", "execute", "main", "plan", "run_case", "write_outputs"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CORRECTNESS_FAILURES = ("fail", "error", "crashed", "timeout")
# A case with time left that gives no result within HANG_FACTOR x its estimate + HANG_FLOOR_S hangs ("timeout",
# a failure); one stopped because the budget ran out is "cut_off" (listed, not a failure).
HANG_FACTOR = 10.0
HANG_FLOOR_S = 60.0
OUTPUT_FILES = ("selftest.json", "summary.md", "selftest.log")
_MARK = "@@fastvit-selftest-result@@ "  # prefix of the worker's result lines (anything else is log)
_GPU_ONLY = "needs an NVIDIA GPU (torch.cuda.is_available() is False here)"
_NO_CASES = (
    "no selftest cases declared: its op table row has selftest=None (declare a "
    "fastvit.ops._selftest_spec.SelftestSpec next to its OpDispatcher row)"
)


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One unit of the run.

    Args:
        name: unique, e.g. ``correctness/attention/triton/bf16/vit_b16_224-b256``.
        kind: "correctness" or "speed".
        params: what the worker runs (JSON): ``group`` picks the runner, the rest are its arguments.
        est_s: expected seconds, for planning the budget.
        needs: why this case cannot run on this machine (None: it can).
    """

    name: str
    kind: str
    params: dict[str, Any]
    est_s: float
    needs: Optional[str] = None
    result: dict[str, Any] = field(default_factory=dict)


BACKEND_RISK = {"cuda": 0, "triton": 1, "torch": 2}
DTYPE_RISK = {"bf16": 0, "fp16": 1, "fp32": 2}


def declared_ops() -> tuple[list[tuple[str, Any]], list[str]]:
    """The op table read for the selftest: ([(name, its SelftestSpec)] in run order (the specs' ``order``,
    then the table's), [names of the rows that declare no selftest cases])."""
    from fastvit.ops.dispatch import registered_ops

    rows = registered_ops()
    declared = sorted(((n, r.selftest) for n, r in rows.items() if r.selftest is not None), key=lambda x: x[1].order)
    return declared, [n for n, r in rows.items() if r.selftest is None]


def op_spec(op: str) -> Any:
    """The SelftestSpec op ``op``'s row declares."""
    from fastvit.ops.dispatch import registered_ops

    row = registered_ops().get(op)
    if row is None or row.selftest is None:
        declared = [n for n, _ in declared_ops()[0]]
        why = "is not in the op table" if row is None else "declares no selftest cases (selftest=None)"
        raise ValueError(f"selftest: op {op!r} {why}; ops with cases: {declared}")
    return row.selftest


def model_shapes(op: str, batch: int) -> dict[str, dict[str, Any]]:
    """The shapes ``op`` runs on in the models, at ``batch`` (as its SelftestSpec declares them)."""
    return op_spec(op).model_shapes(batch)


MODEL_CHECKS = ("fastvit_vs_timm", "patched_timm_vs_timm", "train_step", "compile_fullgraph", "cuda_graph")
MODEL_SPEED = ("timm_eager", "fastvit_auto", "timm_patched", "bs1_eager", "bs1_graph_replay", "timm_compile")


def _op_case(
    op: str, backend: str, dtype: str, label: str, shape: dict[str, Any], est_s: float, needs: Optional[str] = None
) -> Case:
    params = {"group": "op", "op": op, "backend": backend, "dtype": dtype, "label": label, "shape": shape}
    batch = shape.get("B", shape.get("M", 0) // shape.get("N", 1))
    return Case(f"correctness/{op}/{backend}/{dtype}/{label}-b{batch}", "correctness", params, est_s, needs)


def _op_case_gap(
    gpu: bool, quick: bool, full: bool, backend: str, dtype: str, label: str, batch: int, spec: Any
) -> Optional[str]:
    """Why an op case at a model shape is not in this run's plan (None: it is).

    GPU default (sized for ~8 minutes on an H200): every backend x dtype at the op's primary shapes (ViT-B/16,
    T2T stage 0) at batch 256; the other model shapes and batch 1 in bf16 on the kernel backends. ``--full``:
    all of them; ``--quick``: the primary batch-256 block only. CPU: the torch backend in fp32 at batch 1 at
    the op's ``cpu_torch_shapes``."""
    primary = label in spec.primary_shapes
    if not gpu:
        if backend == "torch" and dtype == "fp32" and batch == 1 and label in spec.cpu_torch_shapes:
            return None
        return _GPU_ONLY
    if full or (primary and batch == 256):
        return None
    if quick:
        return "not in --quick (ViT-B/16 batch-256 shapes only)"
    if dtype == "bf16" and backend != "torch":
        return None
    return "only with --full (the default plan runs other shapes and batch 1 in bf16 on the kernel backends)"


def _cpu_order(case: Case) -> int:
    backend = case.params.get("backend")
    if backend is None:
        return 2  # whole models (and the ops that declare no cases)
    if backend != "torch":
        return 0
    return 1 if case.params["label"] in op_spec(case.params["op"]).small_shapes else 3


def build_cases(
    *, gpu: bool, quick: bool = False, full: bool = False, sanitize: bool = False, interpreter: bool = True
) -> list[Case]:
    """Every case of a run, in the order they run (correctness by risk, then speed), including those this
    run will not run (``needs`` says why)."""
    cases: list[Case] = []
    declared, undeclared = declared_ops()
    # Correctness of the ops: riskiest backend and dtype first.
    for backend in sorted(BACKEND_RISK, key=BACKEND_RISK.get):
        for dtype in sorted(DTYPES, key=DTYPE_RISK.get):
            for op, spec in declared:
                for batch in (256, 1):
                    for label, shape in spec.model_shapes(batch).items():
                        gap = _op_case_gap(gpu, quick, full, backend, dtype, label, batch, spec)
                        est = (2.0 if batch > 1 else 1.0) if gpu else 1.0
                        cases.append(_op_case(op, backend, dtype, label, shape, est, gap))
    for op in undeclared:  # listed, never silently left out
        cases.append(
            Case(f"correctness/{op}/no-cases-declared", "correctness", {"group": "op", "op": op}, 0.0, _NO_CASES)
        )
    if not gpu:  # the kernels themselves, under the Triton interpreter, at the smallest shapes; torch in low precision
        for op, spec in declared:
            for label, shape in spec.small_shapes.items():
                for dtype in ("bf16", "fp16"):
                    cases.append(_op_case(op, "torch", dtype, label, shape, 0.5))
                for dtype in ("fp32", "fp16"):
                    needs = None if interpreter else "needs triton importable (for TRITON_INTERPRET=1 on the CPU)"
                    cases.insert(0, _op_case(op, "triton", dtype, label, shape, 1.0, needs))
                cases.append(
                    _op_case(
                        op,
                        "triton",
                        "bf16",
                        label,
                        shape,
                        2.5,
                        "needs an NVIDIA GPU (the Triton interpreter has no bf16 arithmetic)",
                    )
                )
                cases.append(_op_case(op, "cuda", "fp32", label, shape, 2.5, _GPU_ONLY))
    # Whole models.
    for check in MODEL_CHECKS:
        gpu_only = check in ("compile_fullgraph", "cuda_graph")
        # On the CPU: a 2-block ViT-Ti/16 (the same code path; building 12 blocks alone takes seconds on a busy
        # CPU) in fp32 at batch 2, to fit a minute.
        params = {
            "group": "model",
            "check": check,
            "dtype": "bf16" if gpu else "fp32",
            "model": "vit_base_patch16_224" if gpu else "vit_tiny_patch16_224",
            "overrides": {} if gpu else {"depth": 2},
            "batch": 256 if gpu else 2,
        }
        needs = _GPU_ONLY if gpu_only and not gpu else None
        if gpu and quick and check == "compile_fullgraph":
            needs = "not in --quick (compiling two ViT-B/16s takes minutes)"
        est = {"compile_fullgraph": 90.0, "cuda_graph": 15.0}.get(check, 12.0 if gpu else 8.0)
        cases.append(
            Case(
                f"correctness/model/{check}/{params['dtype']}/{params['model']}{'' if gpu else '-depth2'}"
                f"-b{params['batch']}",
                "correctness",
                params,
                est,
                needs,
            )
        )
    if sanitize:
        for op, spec in declared:
            shape = next(iter(spec.small_shapes.values()))
            for backend in ("triton", "cuda"):
                for tool in spec.sanitizers:
                    params = {
                        "group": "op",
                        "op": op,
                        "backend": backend,
                        "dtype": "fp16",
                        "label": "small",
                        "shape": shape,
                        "sanitizer": tool,
                    }
                    needs = None if gpu else _GPU_ONLY
                    if gpu and shutil.which("compute-sanitizer") is None:
                        needs = "needs compute-sanitizer on PATH (CUDA toolkit)"
                    cases.append(
                        Case(
                            f"correctness/sanitize-{tool}/{op}/{backend}/fp16/small", "correctness", params, 40.0, needs
                        )
                    )
    if not gpu:  # riskiest first: kernels under the interpreter, torch in low precision, models, torch in fp32
        cases.sort(key=_cpu_order)
    # Speed: ceilings first (the fractions need them), then ops, then models.
    speed_needs = None if gpu else _GPU_ONLY
    cases.append(Case("speed/ceilings/bf16", "speed", {"group": "ceilings", "dtype": "bf16"}, 6.0, speed_needs))
    for op, _ in declared:
        cases.append(
            Case(
                f"speed/op/{op}/bf16/vit_b16-b256",
                "speed",
                {"group": "op_speed", "op": op, "dtype": "bf16"},
                10.0,
                speed_needs,
            )
        )
    for variant in MODEL_SPEED if not quick else ("timm_eager", "fastvit_auto", "bs1_eager"):
        est = {"timm_compile": 90.0, "bs1_graph_replay": 20.0}.get(variant, 20.0)
        params = {"group": "model_speed", "variant": variant, "dtype": "bf16", "model": "vit_base_patch16_224"}
        cases.append(Case(f"speed/model/{variant}/bf16/vit_base_patch16_224", "speed", params, est, speed_needs))
    return cases


# ------------------------------------------------------------------------------------------ budget


def plan(cases: list[Case], budget_s: float) -> tuple[list[Case], list[Case]]:
    """Splits the runnable cases into (to run, dropped): all correctness cases are kept (in their
    order), speed cases are kept in order while the estimated total fits the budget."""
    runnable = [c for c in cases if c.needs is None]
    correctness = [c for c in runnable if c.kind == "correctness"]
    total = sum(c.est_s for c in correctness)
    kept, dropped = list(correctness), []
    for c in (c for c in runnable if c.kind == "speed"):
        if total + c.est_s <= budget_s:
            kept.append(c)
            total += c.est_s
        else:
            c.result = _not_run(
                f"dropped at planning to fit the budget: correctness and earlier speed cases need "
                f"~{total:.0f} s of {budget_s:.0f} s, this case ~{c.est_s:.0f} s"
            )
            dropped.append(c)
    return kept, dropped


def _not_run(reason: str) -> dict[str, Any]:
    return {"status": "not_run", "reason": reason}


Runner = Callable[[Case, float], dict[str, Any]]


def execute(
    cases: list[Case],
    budget_s: float,
    runner: Runner,
    *,
    clock: Callable[[], float] = time.monotonic,
    start: Optional[float] = None,
    on_result: Optional[Callable[[Case], None]] = None,
) -> list[Case]:
    """Runs the planned cases in order within ``budget_s`` seconds from ``start`` (default: now).

    A speed case starts only when its estimate fits the time left; a correctness case starts whenever any
    time is left and may use all of it (``cut_off`` if the budget ends first, ``timeout`` if it hangs). A case
    that cannot start is marked not run with the reason. Each case's result (with ``seconds``) is stored on it;
    ``on_result`` is called after each.
    """
    start = clock() if start is None else start
    for case in cases:
        left = budget_s - (clock() - start)
        if case.kind == "speed" and left < case.est_s:
            case.result = _not_run(f"budget: {max(left, 0):.0f} s left, this speed case needs ~{case.est_s:.0f} s")
        elif left <= 0:
            case.result = _not_run(f"budget of {budget_s:.0f} s spent before this case could start")
        else:
            t0 = clock()
            timeout = min(left, case.est_s * HANG_FACTOR + HANG_FLOOR_S)
            case.result = runner(case, timeout)
            if case.result.get("status") == "timeout" and timeout == left:
                case.result = {"status": "cut_off", "reason": f"stopped when the budget ran out ({left:.0f} s left)"}
            case.result["seconds"] = round(clock() - t0, 3)
        if on_result is not None:
            on_result(case)
    return cases


# ------------------------------------------------------------------------------------------ worker


class Worker:
    """A subprocess that runs cases one at a time (``python -m fastvit.selftest --worker``), started on first
    use and again after a crash or a hang; its non-result output goes to ``log``.

    Args:
        env: the worker's environment (TRITON_INTERPRET=1 without a GPU).
        log: called with every line of raw output.
        argv: the command (tests substitute one that crashes).
    """

    def __init__(self, env: dict[str, str], log: Callable[[str], None], argv: Optional[list[str]] = None) -> None:
        self.env = env
        self.log = log
        self.argv = argv or [sys.executable, "-m", "fastvit.selftest", "--worker"]
        self.proc: Optional[subprocess.Popen] = None
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.recent: list[str] = []

    def _start(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=self.env,
            start_new_session=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: "queue.Queue[Optional[str]]") -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __call__(self, case: Case, timeout_s: float) -> dict[str, Any]:
        sanitizer = case.params.get("sanitizer")
        if sanitizer:  # one fresh worker under compute-sanitizer per case
            self.stop()
            self._start(["compute-sanitizer", "--tool", sanitizer, "--target-processes", "all", *self.argv])
        elif self.proc is None or self.proc.poll() is not None:
            self._start(self.argv)
        assert self.proc is not None and self.proc.stdin is not None
        self.recent = []
        try:
            self.proc.stdin.write(json.dumps(case.params) + "\n")
            self.proc.stdin.flush()
            if sanitizer:
                self.proc.stdin.close()
        except OSError:
            pass  # the worker died at start; its output (below) says why
        deadline = time.monotonic() + timeout_s
        result: Optional[dict[str, Any]] = None
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()
                return {
                    "status": "timeout",
                    "error": f"no result within {timeout_s:.0f} s; worker killed",
                }
            if line is None:
                break
            if line.startswith(_MARK):
                result = json.loads(line[len(_MARK) :])
                if not sanitizer:
                    return result
                continue
            self.log(f"  | {line}")
            self.recent = (self.recent + [line])[-20:]
        code = self.proc.wait()
        self.proc = None
        if sanitizer:
            return _sanitizer_verdict(result, self.recent, code)
        tail = "\n".join(self.recent[-8:])
        return {"status": "crashed", "error": f"worker exited with code {code} during this case; last output:\n{tail}"}


def _sanitizer_verdict(result: Optional[dict[str, Any]], lines: list[str], code: int) -> dict[str, Any]:
    summary = next((ln for ln in reversed(lines) if "ERROR SUMMARY" in ln), None)
    found = re.search(r"ERROR SUMMARY: (\d+) error", summary or "")
    out = dict(result or {"status": "crashed"})
    out["sanitizer_summary"] = summary
    if found is None:
        out["status"] = "error"
        out["error"] = f"compute-sanitizer gave no ERROR SUMMARY (exit code {code}); last output: {lines[-5:]}"
    elif int(found.group(1)) > 0:
        out["status"] = "fail"
        out["error"] = f"{summary}; first reports: " + " | ".join(ln for ln in lines if "=========" in ln)[:2000]
    return out


# Errors after which every later CUDA call in the process fails too.
_STICKY_CUDA_ERROR = re.compile(
    r"illegal memory access|device-side assert|unspecified launch failure|misaligned address|illegal instruction"
    r"|CUDA error: an illegal|cudaErrorLaunchFailure|uncorrectable ECC"
)


def worker_main() -> None:
    """Reads one case (JSON) per stdin line, prints its result after ``_MARK``; never stops on a failure."""
    for line in sys.stdin:
        if not line.strip():
            continue
        result = run_case(json.loads(line))
        sticky = bool(_STICKY_CUDA_ERROR.search(str(result.get("error", ""))))
        if sticky:
            result["note"] = "CUDA context is unusable after this error: the worker restarts for the next case"
        print(_MARK + json.dumps(result, default=str), flush=True)
        if sticky:
            os._exit(70)


def run_case(params: dict[str, Any]) -> dict[str, Any]:
    """Runs one case in this process: ``{"status": pass|fail|error|unsupported|measured, ...}``."""
    from fastvit.ops import BackendNotSupported

    torch.manual_seed(0)
    runner = {
        "op": _check_op,
        "model": _check_model,
        "ceilings": _speed_ceilings,
        "op_speed": _speed_op,
        "model_speed": _speed_model,
    }[params["group"]]
    try:
        out = runner(params)
    except BackendNotSupported as exc:
        return {"status": "unsupported", "reason": str(exc)}
    except AssertionError as exc:
        return {"status": "fail", "error": str(exc)}
    except Exception as exc:  # reported, and the run goes on
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    return out


# ------------------------------------------------------------------------------------------ op checks


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _forward_backward(
    fn: Callable, leaves: dict[str, torch.Tensor], dtype: torch.dtype, cotangents: list[torch.Tensor]
):
    """fn on copies of ``leaves`` in ``dtype``: (outputs, {name: gradient})."""
    cast = {n: t.detach().to(dtype).requires_grad_() for n, t in leaves.items()}
    out = fn(cast)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not cotangents:
        cotangents.extend(torch.randn_like(o, dtype=torch.float32) for o in outs)
    grads = torch.autograd.grad(outs, list(cast.values()), [c.to(o.dtype) for c, o in zip(cotangents, outs)])
    return outs, dict(zip(cast, grads))


# Parameter gradients of the table-rule ops are sums over every row (50k at ViT-B/16 bs256): judged by the
# three-way rule like a GEMM's reduction, since a fixed atol cannot scale with the row count.
ROW_SUM_GRADS = ("dweight", "dbias", "dnorm_weight", "dnorm_bias")


def _check_op(params: dict[str, Any]) -> dict[str, Any]:
    """Output and every gradient of one op/backend/dtype/shape against the reference: the verdict comes from
    fastvit.testing (three-way rule for attention / GEMM-like ops and row-sum gradients, the tolerance table
    with the tests' gradient scale otherwise); the error numbers (kernel's and torch's own low-precision
    error against the oracle) are recorded either way."""
    from fastvit.testing import GRAD_TOLERANCE_SCALE, assert_close, assert_three_way, poisoned_outputs

    dev = _device()
    dtype = DTYPES[params["dtype"]]
    spec = op_spec(params["op"])
    leaves, kernel, reference = spec.problem(params["shape"], dev)
    rule = spec.rule
    backend = params["backend"]
    cot: list[torch.Tensor] = []
    with poisoned_outputs():
        outs, grads = _forward_backward(lambda t: kernel(t, backend), leaves, dtype, cot)
    oracle_dtype = torch.float64 if rule == "three_way" else torch.float32
    ref_outs, ref_grads = _forward_backward(reference, leaves, oracle_dtype, cot)
    lp_outs, lp_grads = _forward_backward(reference, leaves, dtype, cot)
    # Row-sum gradients are judged by the three-way rule under every rule, against an fp64 oracle: against an
    # fp32 one, torch's own fp32 error is 0 and the rule would demand a bit-exact reduction order.
    row_sums = [n for n in grads if f"d{n}" in ROW_SUM_GRADS]
    if rule != "three_way" and row_sums:
        _, grads64 = _forward_backward(reference, leaves, torch.float64, cot)
        ref_grads = {n: (grads64[n] if n in row_sums else g) for n, g in ref_grads.items()}
    names = [f"out{i}" if len(outs) > 1 else "out" for i in range(len(outs))] + [f"d{n}" for n in grads]
    kernels = outs + list(grads.values())
    refs = ref_outs + list(ref_grads.values())
    lows = lp_outs + list(lp_grads.values())
    errors: dict[str, dict[str, float]] = {}
    problems: list[str] = []
    for name, k, r, lp in zip(names, kernels, refs, lows):
        errors[name] = {
            "max_abs_err": (k.double() - r.double()).abs().max().item(),
            "torch_lowp_err": (lp.double() - r.double()).abs().max().item(),
        }
        try:
            if k.dtype != dtype or k.shape != r.shape:
                raise AssertionError(f"{name}: got {k.dtype}{list(k.shape)}, expected {dtype}{list(r.shape)}")
            if rule == "three_way" or name in ROW_SUM_GRADS:
                assert_three_way(k, r, lp, factor=3.0 if name.startswith("d") else 2.0, name=name)
            else:
                assert_close(k, r, dtype, scale=GRAD_TOLERANCE_SCALE if name.startswith("d") else 1.0, name=name)
        except AssertionError as exc:
            problems.append(str(exc))
    result = {"status": "fail" if problems else "pass", "rule": rule, "errors": errors}
    if problems:
        result["error"] = "\n".join(problems)
    return result


# ------------------------------------------------------------------------------------------ model checks


_MODELS: dict[tuple[str, str, str], tuple[torch.nn.Module, torch.nn.Module]] = {}


def _timm_and_fastvit(
    name: str, dev: torch.device, overrides: Optional[dict[str, Any]] = None
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Fresh copies of (timm fp32 model, fastvit model loaded from its state dict, strict); built once per
    worker (model construction is most of a CPU case's time)."""
    import timm

    import fastvit

    overrides = overrides or {}
    key = (name, str(dev), json.dumps(overrides, sort_keys=True))
    if key not in _MODELS:
        torch.manual_seed(0)
        ref = timm.create_model(name, pretrained=False, **overrides).to(dev).eval()
        fast = fastvit.create_model(name, **overrides).to(dev).eval()
        fast.load_state_dict(ref.state_dict(), strict=True)
        _MODELS[key] = (ref, fast)
    return tuple(copy.deepcopy(m).eval() for m in _MODELS[key])  # type: ignore[return-value]


def _lowp_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``dtype`` (itself when that is fp32: torch in fp32 *is* the oracle then)."""
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def _check_model(params: dict[str, Any]) -> dict[str, Any]:
    import fastvit
    from fastvit.testing import assert_three_way

    dev = _device()
    dtype = DTYPES[params["dtype"]]
    check, batch = params["check"], params["batch"]
    timm_fp32, fast = _timm_and_fastvit(params["model"], dev, params.get("overrides"))
    x = torch.randn(batch, 3, 224, 224, device=dev)
    values: dict[str, Any] = {}
    if check == "train_step":
        return _train_step(timm_fp32, fast, x, dtype)
    with torch.no_grad():
        ref = timm_fp32(x)
        lowp = _lowp_copy(timm_fp32, dtype)(x.to(dtype))
        if check in ("fastvit_vs_timm", "compile_fullgraph", "cuda_graph"):
            subjects = {"fastvit": fast.to(dtype)}
        else:
            subjects = {}
        if check in ("patched_timm_vs_timm", "compile_fullgraph"):
            patched = copy.deepcopy(timm_fp32).to(dtype)  # a copy even in fp32: timm_fp32 stays the oracle
            report = fastvit.patch_model(patched)
            values["patch_report"] = str(report)[:2000]
            subjects["patched_timm"] = patched
        for label, model in subjects.items():
            if check == "compile_fullgraph":
                torch._dynamo.reset()
                run = torch.compile(model, fullgraph=True)
            elif check == "cuda_graph":
                run = fastvit.graphs.graph_replay(model, x.to(dtype))
            else:
                run = model
            out = run(x.to(dtype))
            if check == "cuda_graph":  # a second input through the same graph
                x2 = torch.randn_like(x)
                out, ref, lowp = run(x2.to(dtype)), timm_fp32(x2), _lowp_copy(timm_fp32, dtype)(x2.to(dtype))
            values[f"{label}_max_abs_err"] = (out.double() - ref.double()).abs().max().item()
            values["timm_lowp_max_abs_err"] = (lowp.double() - ref.double()).abs().max().item()
            assert_three_way(out, ref, lowp, factor=2.0, name=f"{label} logits ({check})")
    return {"status": "pass", "errors": values}


def _train_step(
    timm_fp32: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype
) -> dict[str, Any]:
    """One SGD step of the fastvit model under autocast vs the same step of fp32 timm: loss by the
    three-way rule (torch's own autocast step as the low-precision computation), every gradient present
    and finite, and the weights moved."""
    from fastvit.testing import assert_three_way

    labels = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    autocast = dtype != torch.float32

    def step(model: torch.nn.Module, low: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=low and autocast):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        return loss.detach(), grads

    before = {n: p.detach().clone() for n, p in fast.named_parameters()}
    timm_low = copy.deepcopy(timm_fp32) if autocast else None
    torch.manual_seed(1)
    loss_ref, grads_ref = step(timm_fp32, False)
    torch.manual_seed(1)
    loss_lp = step(timm_low, True)[0] if timm_low is not None else loss_ref
    torch.manual_seed(1)
    loss, grads = step(fast, True)
    missing = sorted(set(grads_ref) - set(grads))
    nonfinite = sorted(n for n, g in grads.items() if not torch.isfinite(g).all())
    unchanged = sorted(n for n, p in fast.named_parameters() if n in grads and torch.equal(p.detach(), before[n]))
    assert not missing, f"no gradient for {len(missing)} parameters timm trains: {missing[:5]}"
    assert not nonfinite, f"non-finite gradients in {nonfinite[:5]}"
    assert len(unchanged) < len(grads), "the optimizer step changed no weight"
    worst = max(((grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12), n) for n, g in grads_ref.items())
    assert_three_way(loss, loss_ref, loss_lp, factor=2.0, name="training loss")
    return {
        "status": "pass",
        "errors": {
            "loss": loss.item(),
            "timm_fp32_loss": loss_ref.item(),
            "timm_lowp_loss": loss_lp.item(),
            "worst_relative_grad_diff": worst[0],
            "worst_grad": worst[1],
            "params_with_grad": len(grads),
        },
    }


# ------------------------------------------------------------------------------------------ speed

_CEILINGS: dict[str, float] = {}


def _speed_ceilings(params: dict[str, Any]) -> dict[str, Any]:
    from fastvit._timing import copy_bandwidth_gbps, matmul_ceiling_tflops

    _CEILINGS["matmul_tflops"] = matmul_ceiling_tflops(DTYPES[params["dtype"]])
    _CEILINGS["copy_gbps"] = copy_bandwidth_gbps()
    return {"status": "measured", "values": dict(_CEILINGS)}


def _speed_op(params: dict[str, Any]) -> dict[str, Any]:
    """Each available backend of one op at its ViT-B/16 bs256 shape vs the torch composition."""
    from fastvit._timing import median_ms
    from fastvit.ops import BackendNotSupported

    spec, dtype, dev = op_spec(params["op"]), DTYPES[params["dtype"]], _device()
    s = spec.model_shapes(256)[spec.speed_shape]
    leaves, kernel, _ = spec.problem(s, dev)
    t = {n: v.to(dtype) for n, v in leaves.items()}
    values: dict[str, Any] = {"shape": s}
    baseline = spec.composition(t, s)
    variants: dict[str, float] = {}
    with torch.no_grad():
        out = baseline()
        unit, work = spec.work(s, t, out)
        if spec.baseline_times is not None:  # e.g. SDPA under each of its backends: the fastest is the baseline
            variants = spec.baseline_times(baseline)
            values.update(variants)
            values["torch_composition_ms"] = min(variants.values())
        else:
            values["torch_composition_ms"] = median_ms(baseline)
        for backend in ("torch", "triton", "cuda", None):
            name = backend or "auto"
            try:
                kernel(t, backend)
            except BackendNotSupported as exc:
                values[f"{name}_unsupported"] = " ".join(str(exc).split())[:400]
                continue
            values[f"{name}_ms"] = median_ms(lambda b=backend: kernel(t, b))
    ceiling = _CEILINGS.get("matmul_tflops" if unit == "tflops" else "copy_gbps")
    for key in [k for k in values if k.endswith("_ms") and k not in variants]:
        rate = work / (values[key] * 1e-3) / (1e12 if unit == "tflops" else 1e9)
        values[key.replace("_ms", f"_{unit}")] = rate
        if ceiling:
            values[key.replace("_ms", "_of_ceiling")] = rate / ceiling
        if key != "torch_composition_ms":
            values[key.replace("_ms", "_speedup_vs_torch")] = values["torch_composition_ms"] / values[key]
    return {"status": "measured", "values": values}


def _speed_model(params: dict[str, Any]) -> dict[str, Any]:
    import timm

    import fastvit
    from fastvit._timing import time_calls

    dev, dtype, variant = _device(), DTYPES[params["dtype"]], params["variant"]
    batch = 1 if variant.startswith("bs1") else 256
    if variant == "fastvit_auto" or variant.startswith("bs1"):
        model = fastvit.create_model(params["model"])
    else:
        model = timm.create_model(params["model"], pretrained=False)
    model = model.to(dev, dtype).eval()
    if variant == "timm_patched":
        fastvit.patch_model(model)
    inputs = [torch.randn(batch, 3, 224, 224, device=dev, dtype=dtype) for _ in range(3)]
    run: Callable[[torch.Tensor], Any] = model
    if variant == "timm_compile":
        run = torch.compile(model)
    elif variant == "bs1_graph_replay":
        run = fastvit.graphs.graph_replay(model, inputs[0])
    with torch.no_grad():
        t = time_calls(run, inputs, iters=20, max_warmup_s=30.0)
    values = {"batch": batch, "ms": t.median_ms, "timing": t.as_dict()}
    if batch > 1:
        values["img_s"] = batch / (t.median_ms / 1e3)
    return {"status": "measured", "values": values}


# ------------------------------------------------------------------------------------------ output


def _case_record(case: Case) -> dict[str, Any]:
    return {"name": case.name, "kind": case.kind, "params": case.params, "est_s": case.est_s, **case.result}


def write_outputs(out_dir: str, record: dict[str, Any], cases: list[Case], log_lines: list[str]) -> None:
    """selftest.json, summary.md and selftest.log in ``out_dir``, each written atomically."""
    from fastvit.fileio import atomic_write_text

    record = dict(record, cases=[_case_record(c) for c in cases], counts=_counts(cases))
    atomic_write_text(os.path.join(out_dir, "selftest.json"), json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(os.path.join(out_dir, "summary.md"), summary_markdown(record, cases))
    atomic_write_text(os.path.join(out_dir, "selftest.log"), "\n".join(log_lines) + "\n")


def _counts(cases: list[Case]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for c in cases:
        status = c.result.get("status", "cannot_run_here" if c.needs else "pending")
        counts.setdefault(c.kind, {}).setdefault(status, 0)
        counts[c.kind][status] += 1
    return counts


def _shape_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.get("shape", {}).items())


SUMMARY_COLUMNS = (
    "pass",
    "fail",
    "error",
    "crashed",
    "timeout",
    "cut_off",
    "unsupported",
    "measured",
    "not_run",
    "cannot_run_here",
)


def summary_markdown(record: dict[str, Any], cases: list[Case]) -> str:
    """The page a person reads first: verdict, environment, counts, failures, speed, what did not run."""
    env, ext = record["environment"], record["environment"]["extension"]
    gpu = env["gpus"][0]["name"] if env["gpus"] else "no GPU"
    failed = [c for c in cases if c.kind == "correctness" and c.result.get("status") in CORRECTNESS_FAILURES]
    ran = [c for c in cases if c.result.get("status") not in (None, "not_run")]
    versions = f"torch {env['torch']} (CUDA {env['torch_cuda']}); triton {env['triton']}; timm {env['timm']}"
    lines = [
        f"# fastvit selftest: {'FAILED' if failed else 'passed'} ({gpu})",
        "",
        f"- {record['date']}, `{record['command']}`, budget {record['budget_s']:.0f} s, "
        f"took {record.get('elapsed_s', 0):.0f} s",
        f"- fastvit {env['fastvit']} @ {env.get('git_sha') or 'unknown'}; {versions}",
        f"- GPU driver: {env.get('driver') or '-'}",
        f"- fastvit._C: {'loaded' if ext['loaded'] else 'not loaded: ' + str(ext['load_error'])}",
        f"- mode: {record['mode']}",
        "",
        "| kind | " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|---" * (len(SUMMARY_COLUMNS) + 1) + "|",
    ]
    for kind, count in record["counts"].items():
        lines.append(f"| {kind} | " + " | ".join(str(count.get(k, 0)) for k in SUMMARY_COLUMNS) + " |")
    if failed:
        lines += ["", "## Failures", "", "| op / check | backend | dtype | shape | error |", "|---|---|---|---|---|"]
        for c in failed:
            p = c.params
            err = str(c.result.get("error", "")).replace("\n", " ")[:400].replace("|", "\\|")
            what, shape = p.get("op") or p.get("check"), _shape_text(p) or p.get("model", "")
            lines.append(
                f"| {what} | {p.get('backend', '-')} | {p.get('dtype')} | {shape} | {c.result['status']}: {err} |"
            )
    speed = [c for c in cases if c.kind == "speed" and c.result.get("status") == "measured"]
    if speed:
        lines += ["", "## Speed", "", "| case | numbers |", "|---|---|"]
        for c in speed:
            items = [(k, v) for k, v in c.result["values"].items() if k not in ("timing", "shape")]
            nums = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)
            lines.append(f"| {c.name} | {nums} |")
    by_reason: dict[str, dict[str, int]] = {}
    for c in cases:
        if c.needs or c.result.get("status") in ("not_run", "cut_off"):
            reason = c.needs or c.result.get("reason", "")
        elif not c.result:
            reason = "not reached yet (the run is in progress or was interrupted)"
        else:
            continue
        part = "/".join(c.name.split("/")[:3] if c.name.startswith("correctness/model") else c.name.split("/")[:2])
        parts = by_reason.setdefault(reason, {})
        parts[part] = parts.get(part, 0) + 1
    if by_reason:
        lines += ["", "## Not run", ""]
        for reason, parts in by_reason.items():
            listed = ", ".join(f"{part} ({n})" for part, n in parts.items())
            lines.append(f"- {sum(parts.values())} case(s), {reason}: {listed}")
    lines += ["", f"{len(ran)} of {len(cases)} cases ran; every case and number is in selftest.json.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastvit.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-min", type=float, default=8.0, help="bound on the whole run, minutes (default 8)")
    parser.add_argument("--out", default=None, help="output folder (default fastvit-selftest-<UTC time>)")
    parser.add_argument("--quick", action="store_true", help="ViT-B/16 shapes only, no compile, fewer speed cases")
    parser.add_argument("--full", action="store_true", help="every op x backend x dtype at every shape and batch")
    parser.add_argument("--sanitize", action="store_true", help="also run one case per kernel under compute-sanitizer")
    parser.add_argument("--list", action="store_true", help="print the cases that would run (and the plan) and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.budget_min > 0:
        parser.error(f"--budget-min must be > 0 minutes, got {args.budget_min}")
    if args.out is not None and not re.fullmatch(r"[A-Za-z0-9._/-]+", args.out):
        parser.error(f"--out {args.out!r}: use letters, digits, '.', '_', '-' and '/' only")
    return args


def main(argv: Optional[list[str]] = None, *, clock: Callable[[], float] = time.monotonic) -> int:
    args = _parse(argv)
    if args.worker:
        worker_main()
        return 0
    start = clock()
    from fastvit import kernels
    from fastvit.info import collect

    gpu = torch.cuda.is_available()
    interpreter = kernels.TRITON_IMPORT_ERROR is None
    cases = build_cases(gpu=gpu, quick=args.quick, full=args.full, sanitize=args.sanitize, interpreter=interpreter)
    budget_s = args.budget_min * 60
    to_run, dropped = plan(cases, budget_s)
    if args.list:
        for c in cases:
            state = c.needs or (c.result.get("reason") if c in dropped else f"runs, ~{c.est_s:.0f} s")
            print(f"{c.name:<80} {state}")
        print(
            f"\n{len(to_run)} cases planned (~{sum(c.est_s for c in to_run):.0f} s of {budget_s:.0f} s), "
            f"{len(dropped)} dropped for the budget, {sum(1 for c in cases if c.needs)} not in this run"
        )
        correctness_s = sum(c.est_s for c in to_run if c.kind == "correctness")
        if correctness_s > budget_s:
            print(f"correctness alone is estimated at ~{correctness_s:.0f} s: the last cases may be listed as not run")
        return 0
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or f"fastvit-selftest-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    os.makedirs(out_dir, exist_ok=True)
    log_lines: list[str] = []

    def log(line: str) -> None:
        log_lines.append(line)
        print(line, flush=True)

    mode = (
        "GPU"
        if gpu
        else "CPU: torch backend + Triton interpreter (TRITON_INTERPRET=1) at small shapes; GPU cases listed as not run"
    )
    record = {
        "date": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m fastvit.selftest " + " ".join(argv or sys.argv[1:]),
        "budget_s": budget_s,
        "mode": mode,
        "environment": collect(),
        "output_files": list(OUTPUT_FILES),
    }
    log(f"fastvit selftest: {mode}; {len(to_run)} cases planned, budget {budget_s:.0f} s, output in {out_dir}")
    env = dict(os.environ)
    if not gpu:
        env["TRITON_INTERPRET"] = "1"
    worker = Worker(env, log)

    def on_result(case: Case) -> None:
        r = case.result
        detail = r.get("reason") or str(r.get("error", "")).splitlines()[0][:200] if r.get("status") != "pass" else ""
        log(f"{r['status']:<11} {case.name}  {r.get('seconds', 0):.1f}s  {detail}")
        record["elapsed_s"] = clock() - start
        write_outputs(out_dir, record, cases, log_lines)

    try:
        execute(to_run, budget_s, worker, clock=clock, start=start, on_result=on_result)
    finally:
        worker.stop()
    record["elapsed_s"] = clock() - start
    write_outputs(out_dir, record, cases, log_lines)
    failed = sum(1 for c in cases if c.kind == "correctness" and c.result.get("status") in CORRECTNESS_FAILURES)
    gpu_only = sum(1 for c in cases if c.needs)
    log(
        f"{'FAILED: ' + str(failed) + ' correctness case(s)' if failed else 'no correctness failure'}; "
        f"{gpu_only} case(s) could not run here (see summary.md); wrote {', '.join(OUTPUT_FILES)} in {out_dir} "
        f"({record['elapsed_s']:.0f} s)"
    )
    write_outputs(out_dir, record, cases, log_lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

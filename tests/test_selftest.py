"""python -m fastvit.selftest: the budget (speed dropped first, correctness never silently skipped), the output
schema, a wrong kernel reported without stopping the run, a crashing or hanging case isolated in its worker,
and the CPU mode end to end as CI runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastvit import selftest
from fastvit.selftest import Case, Worker, build_cases, execute, plan, run_case, write_outputs

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_NAME = re.compile(r"[A-Za-z0-9._-]+")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cases(n_correct: int, n_speed: int, est: float = 10.0) -> list[Case]:
    return [Case(f"correctness/c{i}", "correctness", {"i": i}, est) for i in range(n_correct)] + [
        Case(f"speed/s{i}", "speed", {"i": i}, est) for i in range(n_speed)
    ]


def test_plan_drops_speed_before_any_correctness_case():
    cases = _cases(3, 3)
    kept, dropped = plan(cases, budget_s=45)
    assert [c.name for c in kept] == ["correctness/c0", "correctness/c1", "correctness/c2", "speed/s0"]
    assert [c.name for c in dropped] == ["speed/s1", "speed/s2"]
    assert all(c.result["status"] == "not_run" and "budget" in c.result["reason"] for c in dropped)
    # Correctness alone over the budget: every correctness case is still planned, every speed case dropped.
    kept, dropped = plan(_cases(5, 2), budget_s=30)
    assert [c.kind for c in kept] == ["correctness"] * 5 and len(dropped) == 2


def test_plan_leaves_cases_that_cannot_run_here_out():
    cases = _cases(2, 1)
    cases[1].needs = "needs an NVIDIA GPU"
    kept, _ = plan(cases, budget_s=100)
    assert cases[1] not in kept


def test_execute_with_injected_clock_drops_speed_then_lists_unrun_correctness():
    clock = FakeClock()
    durations = {"correctness/c0": 30, "correctness/c1": 25, "speed/s0": 1, "correctness/c2": 10, "speed/s1": 1}
    ran = []

    def runner(case: Case, timeout_s: float) -> dict:
        assert timeout_s > 0
        ran.append(case.name)
        clock.now += durations[case.name]
        return {"status": "pass" if case.kind == "correctness" else "measured"}

    cases = [Case(n, n.split("/")[0], {}, 10.0) for n in durations]
    execute(cases, 60, runner, clock=clock)
    # c0 and c1 took 55 s of 60: speed/s0 (est 10 s) no longer fits, correctness c2 still starts and runs.
    assert ran == ["correctness/c0", "correctness/c1", "correctness/c2"]
    by_name = {c.name: c.result for c in cases}
    assert by_name["speed/s0"]["status"] == "not_run" and "budget" in by_name["speed/s0"]["reason"]
    assert by_name["correctness/c2"]["status"] == "pass" and by_name["correctness/c2"]["seconds"] == 10
    # Once the budget is spent a correctness case is not silently skipped: it is listed with the reason.
    cases = [Case("correctness/a", "correctness", {}, 1.0), Case("correctness/b", "correctness", {}, 1.0)]
    durations = {"correctness/a": 61, "correctness/b": 1}
    ran.clear()
    execute(cases, 60, runner, clock=clock)
    assert ran == ["correctness/a"]
    assert cases[1].result == {"status": "not_run", "reason": "budget of 60 s spent before this case could start"}


def _op_params(op: str, label: str, dtype: str = "fp32", backend: str = "torch") -> dict:
    shape = selftest.op_spec(op).small_shapes[label]
    return {"group": "op", "op": op, "backend": backend, "dtype": dtype, "label": label, "shape": shape}


def test_wrong_kernel_is_reported_with_its_numbers_and_the_run_goes_on(monkeypatch, tmp_path):
    import fastvit.ops

    right = fastvit.ops.layer_norm

    def wrong_layer_norm(x, weight, bias, eps=1e-6, *, residual=None, backend=None):
        y, z = right(x, weight, bias, eps, residual=residual, backend=backend)
        return y * 1.01, z  # 1 % off: well outside fp32's tolerance

    monkeypatch.setattr(fastvit.ops, "layer_norm", wrong_layer_norm)
    cases = [
        Case("correctness/layer_norm", "correctness", _op_params("layer_norm", "small"), 1.0),
        Case("correctness/linear", "correctness", _op_params("linear", "small_gelu"), 1.0),
        Case("correctness/soft_split", "correctness", _op_params("soft_split", "small_tokens", "bf16"), 1.0),
    ]
    execute(cases, 600, lambda case, _: run_case(case.params))
    bad, good, good2 = (c.result for c in cases)
    assert bad["status"] == "fail", bad
    assert "out0 (torch.float32)" in bad["error"] and "max abs error" in bad["error"]
    assert bad["errors"]["out0"]["max_abs_err"] > 1e-3 and bad["errors"]["out1"]["max_abs_err"] == 0
    assert good["status"] == "pass" and good["rule"] == "three_way", good
    assert good2["status"] == "pass" and good2["rule"] == "table", good2
    record = {"date": "d", "command": "c", "budget_s": 600, "mode": "CPU", "environment": _environment()}
    write_outputs(str(tmp_path), record, cases, ["log"])
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# fastvit selftest: FAILED")
    row = next(line for line in summary.splitlines() if line.startswith("| layer_norm |"))
    assert "| torch | fp32 | B=" not in row and "| torch | fp32 | M=8, N=8, C=96 | fail: " in row


def _environment() -> dict:
    from fastvit.info import collect

    return collect()


def test_output_schema(tmp_path):
    cases = build_cases(gpu=False)
    kept, _ = plan(cases, 60)
    kept[0].result = {"status": "pass", "errors": {"out": {"max_abs_err": 0.0}}, "seconds": 0.5}
    record = {"date": "2026-01-01T00:00:00Z", "command": "python -m fastvit.selftest", "budget_s": 60.0,
              "mode": "CPU", "environment": _environment(), "elapsed_s": 1.0}  # fmt: skip
    write_outputs(str(tmp_path), record, cases, ["line one", "line two"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(selftest.OUTPUT_FILES) and len(files) <= 6
    assert all(ALLOWED_NAME.fullmatch(f) for f in files)
    data = json.loads((tmp_path / "selftest.json").read_text())
    env = data["environment"]
    for key in ("gpus", "driver", "torch", "torch_cuda", "triton", "timm", "fastvit", "git_sha", "extension"):
        assert key in env, key
    assert len(data["cases"]) == len(cases)
    for c in data["cases"]:
        assert {"name", "kind", "params", "est_s"} <= set(c)
    assert data["cases"][0]["status"] == "pass"
    assert data["counts"]["correctness"]["pass"] == 1
    assert (tmp_path / "selftest.log").read_text() == "line one\nline two\n"
    assert "## Not run" in (tmp_path / "summary.md").read_text()


_FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    for line in sys.stdin:
        p = json.loads(line)
        print("some log output", flush=True)
        if p["i"] == "crash":
            os._exit(3)
        if p["i"] == "hang":
            time.sleep(60)
        print(%r + json.dumps({"status": "pass", "i": p["i"]}), flush=True)
    """
    % selftest._MARK
)


def test_a_crashing_case_is_reported_and_the_next_cases_still_run():
    log: list[str] = []
    worker = Worker(dict(os.environ), log.append, argv=[sys.executable, "-c", _FAKE_WORKER])
    cases = [Case(f"correctness/{i}", "correctness", {"i": i}, 1.0) for i in ("a", "crash", "b", "c")]
    try:
        execute(cases, 120, worker)
    finally:
        worker.stop()
    assert [c.result["status"] for c in cases] == ["pass", "crashed", "pass", "pass"]
    assert "exited with code 3" in cases[1].result["error"] and "some log output" in cases[1].result["error"]
    assert "  | some log output" in log


@pytest.mark.slow  # > 4 s on 2 cores: out of the quick loop (pytest -m 'not slow'), CI runs it
def test_a_case_running_into_the_end_of_the_budget_is_cut_off_not_failed():
    worker = Worker(dict(os.environ), lambda line: None, argv=[sys.executable, "-c", _FAKE_WORKER])
    cases = [Case(f"correctness/{i}", "correctness", {"i": i}, 1.0) for i in ("a", "hang", "b")]
    try:
        execute(cases, 8, worker)
    finally:
        worker.stop()
    assert [c.result["status"] for c in cases] == ["pass", "cut_off", "not_run"]
    assert "budget ran out" in cases[1].result["reason"]


def test_a_hanging_case_with_time_left_is_a_failure_and_the_next_case_runs(monkeypatch):
    monkeypatch.setattr(selftest, "HANG_FACTOR", 1.0)
    monkeypatch.setattr(selftest, "HANG_FLOOR_S", 2.0)
    worker = Worker(dict(os.environ), lambda line: None, argv=[sys.executable, "-c", _FAKE_WORKER])
    cases = [Case(f"correctness/{i}", "correctness", {"i": i}, 1.0) for i in ("hang", "b")]
    try:
        execute(cases, 100, worker)
    finally:
        worker.stop()
    assert [c.result["status"] for c in cases] == ["timeout", "pass"]
    assert "timeout" in selftest.CORRECTNESS_FAILURES and "no result within 3 s" in cases[0].result["error"]


def test_gpu_plan_covers_every_op_backend_dtype_and_is_listed():
    cases = build_cases(gpu=True)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    ops = {(c.params["op"], c.params["backend"], c.params["dtype"]) for c in cases if c.params.get("group") == "op"}
    declared = [name for name, _ in selftest.declared_ops()[0]]
    assert declared == ["attention", "attention_qkvpacked", "linear", "layer_norm", "patch_embed", "soft_split"]
    assert ops == {(o, b, d) for o in declared for b in ("cuda", "triton", "torch") for d in selftest.DTYPES}
    checks = {c.params["check"] for c in cases if c.params.get("group") == "model"}
    assert checks == set(selftest.MODEL_CHECKS)
    kinds = [c.kind for c in cases]
    assert kinds == sorted(kinds)  # correctness before speed
    kept, dropped = plan(cases, 8 * 60)
    assert all(c.kind == "speed" for c in dropped)
    cpu = build_cases(gpu=False)
    assert all(c.needs for c in cpu if c.kind == "speed")
    assert {c.params["backend"] for c in cpu if not c.needs and c.params.get("group") == "op"} == {"torch", "triton"}


def test_bad_arguments_name_the_fix(capsys):
    with pytest.raises(SystemExit):
        selftest.main(["--budget-min", "0"])
    assert "--budget-min must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        selftest.main(["--out", "my results"])
    assert "letters, digits" in capsys.readouterr().err


@pytest.mark.slow  # > 4 s on 2 cores: out of the quick loop (pytest -m 'not slow'), CI runs it
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode; on a GPU machine the full run takes minutes")
def test_cpu_mode_end_to_end(tmp_path):
    """What CI runs: ``python -m fastvit.selftest --budget-min 1 --out tmp`` exits 0 within its minute."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "fastvit.selftest", "--budget-min", "1", "--out", "tmp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "tmp"
    assert sorted(p.name for p in out.iterdir()) == sorted(selftest.OUTPUT_FILES)
    data = json.loads((out / "selftest.json").read_text())
    assert data["elapsed_s"] < 60 + 30  # the budget, plus at most the teardown of the last case
    statuses = {c["name"]: c.get("status") for c in data["cases"]}
    interpreted = [n for n, s in statuses.items() if "/triton/" in n and s == "pass"]
    assert interpreted, "no Triton kernel ran under the interpreter"
    assert not [n for n, s in statuses.items() if s in selftest.CORRECTNESS_FAILURES]
    summary = (out / "summary.md").read_text()
    assert "needs an NVIDIA GPU" in summary and "passed" in summary.splitlines()[0]


def test_list_shows_every_case_with_its_fate(capsys):
    assert selftest.main(["--list", "--budget-min", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("correctness/", "speed/"))]
    assert len(lines) == len(build_cases(gpu=torch.cuda.is_available()))
    assert any(line.startswith("correctness/attention/triton/") and "runs, ~" in line for line in lines)
    assert "cases planned" in out
    if not torch.cuda.is_available():
        assert all("needs an NVIDIA GPU" in line for line in lines if line.startswith("speed/"))


def test_worker_reports_a_sticky_cuda_error_then_exits_for_a_fresh_process():
    """After an illegal memory access every later CUDA call fails too: the worker reports the case and exits,
    so the parent's next case starts in a new process (no real GPU needed: run_case is replaced)."""
    script = textwrap.dedent(
        """
        import sys
        from fastvit import selftest
        selftest.run_case = lambda params: {"status": "error", "error": "RuntimeError: CUDA error: an illegal "
                                            "memory access was encountered"}
        selftest.worker_main()
        print("still running after a sticky CUDA error")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input='{"group": "op"}\n{"group": "op"}\n', capture_output=True, text=True,
        timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 70, done.stderr
    results = [
        json.loads(line[len(selftest._MARK) :]) for line in done.stdout.splitlines() if line.startswith(selftest._MARK)
    ]
    assert len(results) == 1 and "worker restarts" in results[0]["note"]
    assert "still running" not in done.stdout


# ------------------------------------------------------------------ the cases come from the op table


@pytest.fixture
def toy_rows():
    """Two throwaway op-table rows: "toy_double" (x * 2, torch backend only) with a tiny SelftestSpec, and
    "toy_bare" without one; ``wrong`` makes the toy kernel 1 % off. Both rows are popped afterwards."""
    from fastvit.ops import dispatch
    from fastvit.ops._selftest_spec import SelftestSpec, bytes_moved, normal

    state = {"wrong": False}

    def double(x, backend=None):
        dispatch.registered_ops()["toy_double"].select(backend, x.device, x=x)
        return x * (2.02 if state["wrong"] else 2.0)

    def problem(s, dev):
        return {"x": normal(dev)(s["B"], s["C"])}, lambda t, b: double(t["x"], b), lambda t: t["x"] * 2

    spec = SelftestSpec(
        model_shapes=lambda batch: {"toy_224": {"B": batch, "C": 8}},
        small_shapes={"toy_small": {"B": 1, "C": 4}},
        problem=problem,
        rule="table",
        speed_shape="toy_224",
        composition=lambda t, s: lambda: t["x"] * 2,
        work=lambda s, t, out: bytes_moved(t, out),
        cpu_torch_shapes=("toy_224",),
    )
    no_triton = {"triton": lambda x: ["the toy has no Triton kernel"], "cuda": lambda x: ["nor a CUDA one"]}
    dispatch.OpDispatcher(
        name="toy_double", reasons={"torch": dispatch.no_reasons, **no_triton}, preference=("torch",), selftest=spec
    )
    dispatch.OpDispatcher(name="toy_bare", reasons={"torch": dispatch.no_reasons}, preference=("torch",))
    try:
        yield state
    finally:
        dispatch.registered_ops().pop("toy_double")
        dispatch.registered_ops().pop("toy_bare")


def test_a_new_op_row_with_a_spec_is_planned_and_run_without_editing_selftest(toy_rows, capsys):
    cases = {c.name: c for c in build_cases(gpu=False)}
    # The CPU plan of the toy: torch fp32 at its model shape (batch 1), the small shape in low precision and
    # under the interpreter, the GPU-only cases listed with their reason, and its speed case.
    fp32 = cases["correctness/toy_double/torch/fp32/toy_224-b1"]
    assert fp32.needs is None and fp32.params["shape"] == {"B": 1, "C": 4 * 2}
    assert cases["correctness/toy_double/torch/fp32/toy_224-b256"].needs == selftest._GPU_ONLY
    for name in ("torch/bf16/toy_small-b1", "torch/fp16/toy_small-b1", "triton/fp32/toy_small-b1"):
        assert cases[f"correctness/toy_double/{name}"].needs is None, name
    assert "speed/op/toy_double/bf16/vit_b16-b256" in cases
    kept, _ = plan(list(cases.values()), 600)
    assert fp32 in kept
    # It runs: the right toy passes, the triton backend it lacks is "unsupported", a wrong toy fails.
    assert run_case(fp32.params)["status"] == "pass"
    assert run_case(cases["correctness/toy_double/torch/bf16/toy_small-b1"].params)["status"] == "pass"
    unsupported = run_case(cases["correctness/toy_double/triton/fp32/toy_small-b1"].params)
    assert unsupported["status"] == "unsupported" and "no Triton kernel" in unsupported["reason"], unsupported
    toy_rows["wrong"] = True
    wrong = run_case(fp32.params)
    assert wrong["status"] == "fail" and wrong["errors"]["out"]["max_abs_err"] > 1e-3, wrong
    # A row without a spec is listed, with the fix, in the plan and in --list; it is never silently left out.
    bare = cases["correctness/toy_bare/no-cases-declared"]
    assert bare.needs and "no selftest cases declared" in bare.needs and "SelftestSpec" in bare.needs
    assert selftest.main(["--list", "--budget-min", "1"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"correctness/toy_bare/no-cases-declared +no selftest cases declared", listed)
    assert "correctness/toy_double/torch/fp32/toy_224-b1" in listed
    with pytest.raises(ValueError, match="toy_bare.*declares no selftest cases"):
        selftest.model_shapes("toy_bare", 1)


def test_selftest_has_no_per_op_code():
    """The op names live in the op table only: selftest.py names none of them (no per-op branch or table)."""
    source = (ROOT / "fastvit" / "selftest.py").read_text()
    for op in selftest.declared_ops()[0]:
        assert f'"{op[0]}"' not in source and f"'{op[0]}'" not in source, op[0]


def test_a_spec_naming_a_shape_it_does_not_declare_is_refused():
    from fastvit.ops._selftest_spec import SelftestSpec, bytes_moved

    with pytest.raises(ValueError, match=r"labels \['nope'\] are not shapes of model_shapes"):
        SelftestSpec(
            model_shapes=lambda batch: {"a": {"B": batch}}, small_shapes={"s": {"B": 1}}, problem=None,
            rule="table", speed_shape="nope", composition=None, work=bytes_moved,
        )  # fmt: skip
    with pytest.raises(ValueError, match="rule must be one of"):
        SelftestSpec(
            model_shapes=lambda batch: {"a": {"B": batch}}, small_shapes={"s": {"B": 1}}, problem=None,
            rule="exact", speed_shape="a", composition=None, work=bytes_moved,
        )  # fmt: skip

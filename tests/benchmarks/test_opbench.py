"""benchmarks/_harness/opbench.py, the runner every bench_<op>.py is declared on: each op's spec on the CPU at a
tiny shape (its providers compute the baseline's function; the rows have the runner's schema), a provider that
raises is a row with its reason, the command line, the results files."""

from __future__ import annotations

import csv
import importlib
import json

import bench_utils
import pytest
import torch
from _harness import opbench, report

OPS = ("attention", "layer_norm", "linear", "patch_embed", "soft_split")
# Per op: the smallest command line, and the op's shape table shrunk (same keys, so the CLI choices still hold).
TINY = {
    "attention": ["--quick", "--batch", "1"],
    "layer_norm": ["--batches", "1", "--widths", "16"],
    "linear": ["--models", "S", "--batches", "1"],
    "patch_embed": ["--models", "B32", "--batches", "2"],
    "soft_split": ["--stages", "1", "--batches", "2"],
}
CPU = ["--device", "cpu", "--dtypes", "fp32", "--no-save"]


@pytest.fixture
def tiny(monkeypatch):
    """bench_<op> -> its module, with its shape table at a tiny size."""
    mods = {op: importlib.import_module(f"bench_{op}") for op in OPS}
    monkeypatch.setattr(mods["attention"], "SHAPES", [("tiny_a", 2, 9, 8, 64), ("tiny_b", 1, 12, 16, 64)])
    monkeypatch.setattr(mods["layer_norm"], "TOKENS", 3)
    monkeypatch.setattr(mods["linear"], "TOKENS", 5)
    monkeypatch.setitem(mods["linear"].MODELS, "S", ("tiny", 16))
    monkeypatch.setitem(mods["patch_embed"].MODELS, "B32", ("tiny/8", 3, 16, 8, 32))
    monkeypatch.setitem(mods["soft_split"].STAGES, 1, ((36, 4), (6, 6), 3, 2, 1))
    return mods


def _bhnd(out: torch.Tensor, label: dict) -> torch.Tensor:
    """An attention output in (B, H, N, D), from the packed (B, N, H*D) or flash_attn's (B, N, H, D)."""
    B, H, N, D = (label[k] for k in ("B", "H", "N", "D"))
    return out if out.shape == (B, H, N, D) else out.reshape(B, N, H, D).transpose(1, 2)


@pytest.mark.parametrize("op", OPS)
def test_every_provider_computes_the_baselines_function(tiny, op):
    mod = tiny[op]
    backends = ["torch", "triton"] if op in ("layer_norm", "soft_split") else ["torch"]  # triton: the interpreter
    args = opbench.parse_args(mod.SPEC, [*TINY[op], *CPU, "--backends", *backends])
    checked = set()
    for case in mod.SPEC.cases(args, torch.float32):
        inputs = case.inputs(torch.device("cpu"), torch.float32)
        providers = mod.SPEC.providers(case, inputs, backends)
        assert "torch" in providers and {f"fastvit_{b}" for b in backends} <= set(providers)
        want = opbench._tensors(providers["torch"]())
        for name, provider in providers.items():
            call = provider[0] if isinstance(provider, tuple) else provider
            try:
                got = opbench._tensors(call())
            except (opbench.Unavailable, RuntimeError) as exc:  # SDPA backends, flash_attn: not on this machine
                assert name.startswith(("sdpa_", "flash_attn")), f"{name} raised {exc!r}"
                continue
            if op == "attention":
                got = [_bhnd(got[0], case.label)]
            assert len(got) == len(want), name
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=f"{op} {case.label} {name}")
            checked.add(name)
    assert {f"fastvit_{b}" for b in backends} <= checked


@pytest.mark.parametrize("op", OPS)
def test_every_bench_measures_its_cases_on_the_cpu(tiny, op):
    spec = tiny[op].SPEC
    args = opbench.parse_args(spec, [*TINY[op], *CPU, "--backends", "torch", "--modes", "fwd"])
    rows, record = opbench.measure(spec, args)
    cases = list(spec.cases(args, torch.float32))
    names = [list(spec.providers(c, c.inputs(torch.device("cpu"), torch.float32), ["torch"])) for c in cases]
    assert [(r["provider"]) for r in rows] == [n for ns in names for n in ns]  # one row per case x provider
    assert record["op"] == spec.op and record["device"] == "cpu" and record["backends"] == ["torch"]
    by_case = [rows[sum(map(len, names[:i])) : sum(map(len, names[: i + 1]))] for i in range(len(cases))]
    for case, case_rows in zip(cases, by_case):
        ok = {r["provider"]: r for r in case_rows if r["status"] == "ok"}
        assert {"torch", "fastvit_torch"} <= set(ok), case_rows
        for r in case_rows:
            assert {**case.label, "dtype": "float32", "mode": "fwd"}.items() <= r.items()
            if r["status"] != "ok":
                assert set(r) == {*case.label, "dtype", "mode", "provider", "status", "reason"} and r["reason"]
                continue
            assert r["ms"] > 0 and r["cold_ms"] > 0
            if "fwd" in case.flops:
                assert r["TFLOP/s"] == pytest.approx(case.flops["fwd"] / (r["ms"] * 1e-3) / 1e12)
            if "fwd" in case.bytes:
                assert r["GB/s"] == pytest.approx(case.bytes["fwd"] / (r["ms"] * 1e-3) / 1e9)
            assert ("TFLOP/s" in r or "GB/s" in r) and ("of_ceiling" in r) == (case.reference is not None)
        base = min((r for n, r in ok.items() if opbench._is_baseline(spec, n)), key=lambda r: r["ms"])
        for r in ok.values():
            if r is not base:
                assert r["baseline"] == base["provider"] and r["vs_baseline"] == pytest.approx(base["ms"] / r["ms"])
    if spec.ceiling:  # measured on a GPU only: the record says so instead of a number
        assert record["ceilings"] == {} and "GPU" in record["ceilings_reason"]


def test_fwd_bwd_rows_and_triton_under_the_interpreter(tiny):
    spec = tiny["layer_norm"].SPEC
    args = opbench.parse_args(spec, [*TINY["layer_norm"], *CPU, "--backends", "torch", "triton", "--backward"])
    rows, _ = opbench.measure(spec, args)
    assert [(r["mode"], r["provider"], r["status"]) for r in rows] == [
        (m, p, "ok") for m in ("fwd", "fwd_bwd") for p in ("torch", "fastvit_torch", "fastvit_triton")
    ]
    assert all("GB/s" not in r and r["ms"] > 0 for r in rows if r["mode"] == "fwd_bwd")  # no byte count for bwd


def _spec(providers, inputs=None, cases=None):
    def default_cases(args, dtype):
        yield opbench.Case({"n": 4}, inputs or (lambda dev, dt: {"x": torch.ones(4, device=dev, dtype=dt)}),
                           flops={"fwd": 8.0}, leaves=("x",))  # fmt: skip

    return opbench.OpSpec(name="probe", op="layer_norm", doc="probe", cases=cases or default_cases,
                          providers=lambda case, t, backends: providers(t))  # fmt: skip


def test_a_provider_that_cannot_run_is_a_row_with_its_reason():
    def boom():
        raise ValueError("bad shape\nsecond line")

    def providers(t):
        return {"torch": lambda: t["x"] * 2, "raises": boom, "unavailable": lambda: (_ for _ in ()).throw(
            opbench.Unavailable("needs a GPU")), "no_grad_leaf": (lambda: t["x"] + 1, [])}  # fmt: skip

    args = opbench.parse_args(_spec(providers), [*CPU, "--backward"])
    rows, _ = opbench.measure(_spec(providers), args)
    status = {(r["mode"], r["provider"]): (r["status"], r.get("reason")) for r in rows}
    assert status == {
        ("fwd", "torch"): ("ok", None),
        ("fwd", "raises"): ("not run", "ValueError: bad shape"),
        ("fwd", "unavailable"): ("not run", "Unavailable: needs a GPU"),
        ("fwd", "no_grad_leaf"): ("ok", None),
        ("fwd_bwd", "torch"): ("ok", None),
        ("fwd_bwd", "raises"): ("not run", "ValueError: bad shape"),
        ("fwd_bwd", "unavailable"): ("not run", "Unavailable: needs a GPU"),
        ("fwd_bwd", "no_grad_leaf"): ("not run", "Unavailable: no input of this case takes a gradient"),
    }


def test_inputs_that_cannot_be_built_are_one_reason_row_per_mode_and_the_run_goes_on():
    def cases(args, dtype):
        yield opbench.Case({"n": 1}, lambda dev, dt: (_ for _ in ()).throw(MemoryError("out of memory")))
        yield opbench.Case({"n": 2}, lambda dev, dt: {"x": torch.ones(2)})

    spec = _spec(lambda t: {"torch": lambda: t["x"] + 1}, cases=cases)
    rows, _ = opbench.measure(spec, opbench.parse_args(spec, CPU))
    assert [(r["n"], r["provider"], r["status"], r.get("reason")) for r in rows] == [
        (1, "*", "not run", "MemoryError: out of memory"),
        (2, "torch", "ok", None),
    ]
    assert "vs_baseline" not in rows[1]  # the baseline itself


def test_command_line(tiny, capsys, monkeypatch):
    spec = tiny["layer_norm"].SPEC
    args = opbench.parse_args(spec, ["--dtype", "bf16", "fp16", "bf16", "--backward", "--batches", "2"])
    assert args.dtypes == ["bfloat16", "float16"] and args.modes == ["fwd", "fwd_bwd"] and args.batches == [2]
    assert args.backends == ["triton", "cuda"] and args.device == torch.device("cuda") and not args.csv
    assert opbench.parse_args(tiny["attention"].SPEC, []).dtypes == ["bfloat16"]  # the spec's own defaults
    assert opbench.parse_args(tiny["attention"].SPEC, []).csv and opbench.parse_args(spec, ["--csv"]).csv
    for argv, message in [
        (["--dtypes", "int8"], "unknown dtype 'int8'; choose from bf16"),
        (["--backends", "cudnn"], "layer_norm has no backend cudnn; choose from torch, triton, cuda"),
        (["--device", "tpu"], "; use cuda, cuda:<index> or cpu"),
        (["--device", "meta"], "--device meta: only cuda and cpu are supported"),
        (["--modes", "bwd"], "invalid choice: 'bwd'"),
    ]:
        with pytest.raises(SystemExit) as exc:
            opbench.parse_args(spec, argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        opbench.parse_args(tiny["attention"].SPEC, ["--batch", "0"])
    assert exc.value.code == 2 and "give 'auto' (fills the GPU) or a positive integer" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert opbench.run(spec, []) == 0 and "no GPU visible to torch" in capsys.readouterr().out


@pytest.mark.parametrize("op", OPS)
def test_help_lists_the_common_and_the_ops_own_flags(tiny, op, capsys):
    with pytest.raises(SystemExit) as exc:
        opbench.parse_args(tiny[op].SPEC, ["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and tiny[op].SPEC.doc.splitlines()[0] in out
    assert all(flag in out for flag in ["--dtypes", "--modes", "--backward", "--backends", "--device", "--no-save"])
    assert all(flag in out for flag in TINY[op] if flag.startswith("--"))


def test_run_writes_json_and_csv_with_the_environment_record(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_utils, "RESULTS_DIR", str(tmp_path))
    spec = tiny["soft_split"].SPEC
    assert opbench.run(spec, [*TINY["soft_split"], "--device", "cpu", "--dtypes", "fp32", "--backends", "torch",
                              "--csv"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("soft_split_cpu_*.json")
    assert f"wrote {path} and {str(path)[: -len('.json')]}.csv" in out
    data = json.loads(path.read_text())
    assert data["benchmark"] == "soft_split" and data["op"] == "soft_split" and data["modes"] == ["fwd"]
    assert set(data["environment"]) == set(report.environment(torch.device("cpu"), "c"))
    assert data["environment"]["device"] == "cpu" and data["environment"]["command"].startswith("python ")
    assert [(r["batch"], r["provider"], r["status"]) for r in data["rows"]] == [
        (2, "torch", "ok"),
        (2, "fastvit_torch", "ok"),
    ]
    assert "| stage | batch | norm | dtype | mode | provider | ms | cold_ms | GB/s | vs_baseline |" in out
    with open(path.with_suffix(".csv"), newline="") as f:
        lines = list(csv.DictReader(f))
    assert [r["provider"] for r in lines] == ["torch", "fastvit_torch"] and float(lines[1]["vs_baseline"]) > 0


@pytest.mark.parametrize("op, unit", [("layer_norm", "GB/s"), ("attention", "TFLOP/s")])
def test_the_specs_ceiling_is_the_fraction_of_the_matching_metric(tiny, monkeypatch, op, unit):
    """The GPU-only ceiling (copy GB/s, matmul TFLOP/s) stood in for by a fixed value: of_ceiling is that metric's."""
    spec = tiny[op].SPEC
    monkeypatch.setattr(opbench, "_ceiling", lambda kind, dtype, device: (f"probe {kind}", unit, 1e-6))
    args = opbench.parse_args(spec, [*TINY[op], *CPU, "--backends", "torch", "--modes", "fwd"])
    rows, record = opbench.measure(spec, args)
    assert record["ceilings"] == {"float32": {"name": f"probe {spec.ceiling}", "unit": unit, "value": 1e-6}}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["ceiling"] == f"probe {spec.ceiling} {unit}" for r in ok)
    assert all(r["of_ceiling"] == pytest.approx(r[unit] / 1e-6) for r in ok)

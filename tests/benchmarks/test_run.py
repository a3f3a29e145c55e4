"""benchmarks/run.py and its helpers (benchmarks/_harness): parsing, cells, writers, --compare, a tiny run.

Everything here runs on the CPU in well under two minutes: the end-to-end runs use a reduced ViT
(one block, 32x32 images) through the real command-line entry point, writing into a tmp folder.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _harness import measure, providers, report, rows  # benchmarks/ is on sys.path: pyproject.toml [tool.pytest]
from _harness.measure import Settings, run_cell
from published import PUBLISHED, published_for

from fastvit._timing import time_calls

ROOT = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("fastvit_benchmarks_run", ROOT / "benchmarks" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

TINY = rows.ModelRow(
    "vit_tiny_patch16_224",
    "tiny ViT (test)",
    "classification",
    32,
    4,
    2,
    timm_name="vit_tiny_patch16_224",
    num_classes=10,
    model_kwargs={"img_size": 32, "depth": 1},
)
CPU = torch.device("cpu")


def _provider(key: str) -> providers.Provider:
    return providers.provider_by_key(key)


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> rows.ModelRow:
    """Make the reduced ViT selectable with --models like any table row."""
    monkeypatch.setattr(rows, "ROWS", rows.ROWS + (TINY,))
    return TINY


# --- argument parsing -------------------------------------------------------------------------------


def test_no_arguments_without_gpu_picks_the_cpu_quick_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = run.parse_args([])
    # Every row is listed (params and GMACs for all); only the quick set is timed.
    assert [r.key for r in args.rows] == [r.key for r in rows.ROWS]
    assert args.timed == set(rows.CPU_QUICK_MODELS)
    assert args.dtype is None and args.batch is None and args.compare is None
    assert run.parse_args(["--models", "deit_small_patch16_224"]).timed is None


def test_suite_and_model_selection() -> None:
    seg = run.parse_args(["--suite", "segmentation"]).rows
    assert {r.suite for r in seg} == {"segmentation"} and len(seg) == 9
    picked = run.parse_args(["--models", "vit_base_patch*,DeiT-S*", "--models", "t2t_vit_t_14"]).rows
    assert [r.key for r in picked] == [
        "vit_base_patch16_224",
        "vit_base_patch16_384",
        "vit_base_patch32_224",
        "vit_base_patch32_384",
        "deit_small_patch16_224",
        "t2t_vit_t_14",
    ]
    assert len(run.parse_args(["--suite", "all"]).rows) == len(rows.ROWS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "resnet50"], "matches no model"),
        (["--suite", "classification", "--models", "dpt_vit_b16_512"], "matches no model"),
        (["--iters", "5"], ">= 20 timed calls"),
        (["--providers", "onnxruntime"], "unknown provider"),
        (["--metrics", "flops"], "unknown metrics"),
        (["--dtype", "int8"], "invalid choice"),
        (["--batch", "0"], "a batch must be >= 1"),
        (["--budget-min", "0"], "finite number of minutes > 0"),
        (["--budget-min", "-5"], "finite number of minutes > 0"),
        (["--budget-min", "nan"], "finite number of minutes > 0"),
        (["--budget-min", "ten"], "'ten' is not a number of minutes"),
        (["--max-warmup-s", "-1"], "finite number of seconds >= 0"),
        (["--compare", "/nonexistent/old.json"], "--compare: no such file"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no usage dump


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "not a benchmarks/run.py results file"),
        ('{"schema": "fastvit-benchmarks-run/1"}', "lacks meta.date"),
        (
            '{"schema": "fastvit-benchmarks-run/1", "meta": {"date": "d", "gpu": null, "fastvit_git_sha": null},'
            ' "settings": {"dtype": "fp32"}, "cells": [{"row": "x"}]}',
            "no list of cells with row, provider, metric",
        ),
    ],
)
def test_compare_file_is_checked_before_measuring(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "old.json"
    bad.write_text(content)
    monkeypatch.setattr(run, "_run", lambda *a: pytest.fail("measured before checking --compare"))
    with pytest.raises(SystemExit) as exc:
        run.main(["--compare", str(bad), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results").write_text("")
    with pytest.raises(SystemExit):
        run.parse_args(["--out", str(tmp_path / "results")])
    assert "is a file; it must be a folder" in capsys.readouterr().err


def test_unexpected_failure_is_one_line_and_debug_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> int:
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "run.json"))

    monkeypatch.setattr(run, "_run", broken)
    assert run.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "run.json" in err
    with pytest.raises(OSError, match="No space left"):
        run.main(["--out", str(tmp_path / "out"), "--debug"])


# --- cells that cannot run say why --------------------------------------------------------------------


def _settings(**kw: Any) -> Settings:
    return Settings(device=CPU, dtype=torch.float32, iters=20, infer_batch=2, warmup=1, **kw)


@pytest.mark.parametrize(
    "row_key, provider, status, text",
    [
        ("t2t_vit_t_14", "timm_eager", "n/a", "timm has no T2T-ViT"),
        ("upernet_deit_s16_512", "timm_compile", "n/a", "timm has no UPerNet/DPT segmentor"),
        ("deit_tiny_patch16_224", "fastvit_graph", "n/a", "CUDA graph replay needs a GPU"),
        ("deit_tiny_patch16_224", "fastvit_cuda", "not available", "the 'cuda' backend needs CUDA tensors"),
    ],
)
def test_inapplicable_providers_give_reasons_not_numbers(row_key: str, provider: str, status: str, text: str) -> None:
    row = next(r for r in rows.ROWS if r.key == row_key)
    results = run_cell(row, _provider(provider), ("latency",), _settings())
    assert set(results) == {"latency"}
    for r in results.values():
        assert r["status"] == status and text in r["reason"] and "values" not in r


def test_missing_fastvit_model_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastvit

    monkeypatch.setattr(fastvit, "list_models", lambda pattern="*": [])
    results = run_cell(TINY, _provider("fastvit_auto"), ("infer",), _settings())
    assert results["infer"]["status"] == "not available"
    assert "fastvit has no model 'vit_tiny_patch16_224'" in results["infer"]["reason"]


def test_graph_provider_serves_only_batch1_latency() -> None:
    graph = _provider("fastvit_graph")
    assert graph.serves("latency") is None
    assert "batch-1 latency only" in graph.serves("infer")


# --- measurement paths ---------------------------------------------------------------------------------


def test_out_of_memory_skips_that_metric_and_keeps_going(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args: Any) -> dict[str, Any]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(measure.MEASURE, "infer", oom)
    seen: list[str] = []
    results = run_cell(TINY, _provider("timm_eager"), ("infer", "latency"), _settings(), lambda m, r: seen.append(m))
    assert seen == ["infer", "latency"]
    assert results["infer"]["status"] == "oom" and "out of memory at batch 2" in results["infer"]["reason"]
    assert results["latency"]["status"] == "ok" and results["latency"]["values"]["ms"] > 0


def test_an_out_of_memory_wrapped_by_the_compiler_is_still_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrapped(*args: Any) -> dict[str, Any]:
        raise RuntimeError("backend='inductor' raised:\nOutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setitem(measure.MEASURE, "infer", wrapped)
    results = run_cell(TINY, _provider("timm_eager"), ("infer",), _settings())
    assert results["infer"]["status"] == "oom" and "Tried to allocate" in results["infer"]["detail"]


def test_an_exception_becomes_an_error_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> dict[str, Any]:
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(measure.MEASURE, "latency", broken)
    results = run_cell(TINY, _provider("timm_eager"), ("latency",), _settings())
    assert results["latency"]["status"] == "error"
    assert results["latency"]["reason"] == "RuntimeError: kernel exploded"
    assert "kernel exploded" in results["latency"]["traceback"]


def test_cpu_training_step_measures_img_s() -> None:
    results = run_cell(TINY, _provider("timm_eager"), ("train",), _settings(train_batch=2))
    r = results["train"]
    assert r["status"] == "ok" and r["batch"] == 2 and r["values"]["img_s"] > 0
    assert "peak_mem_gib" not in r["values"]  # no CUDA allocator on a CPU: absent, not zero


def test_time_calls_rotates_buffers_and_rejects_too_few_iterations() -> None:
    seen: list[int] = []
    bufs = [torch.full((1,), float(i)) for i in range(3)]
    t = time_calls(lambda x: seen.append(int(x.item())), bufs, iters=20, warmup=2)
    assert t.iters == 20 and t.warmup_calls == 2 and t.clock == "host clock"
    assert seen[:5] == [0, 1, 2, 0, 1] and len(seen) == 22
    assert t.p10_ms <= t.median_ms <= t.p90_ms
    with pytest.raises(ValueError, match="minimum of 20"):
        time_calls(lambda x: None, bufs, iters=19)
    with pytest.raises(ValueError, match="inputs is empty"):
        time_calls(lambda x: None, [])


# --- params and GMACs against reference/mission.md ------------------------------------------------------


@pytest.mark.parametrize("row", [r for r in rows.ROWS if r.suite == "classification"], ids=lambda r: r.key)
def test_params_column_matches_the_reference(row: rows.ModelRow) -> None:
    builder = _provider("timm_eager") if row.timm_name else _provider("fastvit_auto")
    if row.timm_name is None and providers.unavailable_reason(builder, row, CPU):
        pytest.skip(f"{row.key}: {providers.unavailable_reason(builder, row, CPU)}")
    expected = published_for(row.key, "params")[0].value
    counted = providers.count_params(builder, row)
    assert counted == {"value": expected, "source": f"trainable parameters of the {builder.library} model"}


GMACS_CHECKS = [
    # (row, convention, published, tolerance): mmpretrain prints 2 decimals; timm's CSV adds GELU and softmax.
    ("t2t_vit_t_14", "linear_norm", 4.34, 0.005),
    ("t2t_vit_t_19", "linear_norm", 7.80, 0.005),
    ("t2t_vit_t_24", "linear_norm", 12.69, 0.005),
    ("t2t_vit_t_14", "full", 6.1, 0.05),
    ("vit_base_patch16_224", "full", 17.58, 0.02),
    ("vit_large_patch16_384", "full", 191.21, 0.3),
]


@pytest.mark.parametrize("key, convention, value, tol", GMACS_CHECKS, ids=[f"{c[0]}-{c[1]}" for c in GMACS_CHECKS])
def test_gmacs_column_matches_the_reference(key: str, convention: str, value: float, tol: float) -> None:
    row = next(r for r in rows.ROWS if r.key == key)
    fastvit_auto = _provider("fastvit_auto")
    reason = providers.unavailable_reason(fastvit_auto, row, CPU)
    if reason:
        pytest.skip(f"{key}: {reason}")
    assert any(p.metric == f"gmacs_{convention}" and p.value == value for p in PUBLISHED[key])
    gmacs = providers.count_gmacs(fastvit_auto, row)
    assert convention in gmacs, f"the GMACs column of {key} has no number: {gmacs.get('reason')}"
    assert abs(gmacs[convention] - value) <= tol, gmacs


def test_every_published_value_names_its_source_and_gpu() -> None:
    assert set(PUBLISHED) == {r.key for r in rows.ROWS}
    for key, values in PUBLISHED.items():
        for p in values:
            assert p.source and p.setting, (key, p)
            hardware_free = p.metric in ("params", "gmacs_full", "gmacs_linear_norm")
            assert (p.gpu is None) == hardware_free, (key, p)


# --- writers, table and --compare on synthetic results ----------------------------------------------------


def _synthetic(img_s: float, *, gpu: str = "NVIDIA H100 80GB HBM3") -> dict[str, Any]:
    cells = [
        {
            "row": "vit_base_patch16_224",
            "provider": "timm_eager",
            "metric": "infer",
            "status": "ok",
            "batch": 256,
            "dtype": "bf16",
            "values": {"img_s": 3000.0, "ms": 256e3 / 3000.0, "peak_mem_gib": 2.5},
            "timing": {"first_call_s": 1.5, "iters": 30, "clock": "cuda events"},
        },
        {
            "row": "vit_base_patch16_224",
            "provider": "fastvit_auto",
            "metric": "infer",
            "status": "ok",
            "batch": 256,
            "dtype": "bf16",
            "values": {"img_s": img_s, "ms": 256e3 / img_s, "peak_mem_gib": 2.0},
            "timing": {"first_call_s": 4.0, "iters": 30, "clock": "cuda events"},
        },
        {
            "row": "t2t_vit_t_14",
            "provider": "timm_eager",
            "metric": "infer",
            "status": "n/a",
            "reason": "timm has no T2T-ViT",
        },
        {
            "row": "t2t_vit_t_14",
            "provider": "fastvit_auto",
            "metric": "infer",
            "status": "oom",
            "reason": "out of memory at batch 256; cell skipped",
        },
    ]
    meta = {
        "date": "2026-11-21T10:00:00Z",
        "command": "python benchmarks/run.py",
        "device": "cuda",
        "gpu": gpu,
        "driver": "580.1",
        "torch": "2.15.0",
        "cuda": "13.2",
        "triton": "3.9.0",
        "timm": "1.0.31",
        "fastvit": "0.1.0",
        "fastvit_git_sha": "abcdef1234567",
        "git_dirty": False,
        "cpu_threads": 16,
    }
    row_base = {"suite": "classification", "img_size": 224, "batch": {"infer": 256, "train": 128}}
    return {
        "schema": report.SCHEMA,
        "meta": meta,
        "settings": {"dtype": "bf16", "iters": 30},
        "providers": [
            {"key": "timm_eager", "label": "timm eager (SDPA)"},
            {"key": "fastvit_auto", "label": "fastvit (auto)"},
        ],
        "rows": [
            {
                **row_base,
                "key": "vit_base_patch16_224",
                "label": "ViT-B/16 @224",
                "params": {"value": 86_567_656},
                "gmacs": {"full": 17.57, "linear_norm": 17.46},
                "published": [p.as_dict() for p in published_for("vit_base_patch16_224")],
            },
            {
                **row_base,
                "key": "t2t_vit_t_14",
                "label": "T2T-ViT-t-14 @224",
                "params": {"value": 21_465_422},
                "gmacs": {"reason": "n/a: no counter"},
                "published": [],
            },
        ],
        "cells": cells,
        "interrupted": False,
    }


def test_ratios_table_json_and_csv(tmp_path: Path) -> None:
    results = _synthetic(4500.0)
    report.with_ratios(results["cells"])
    fast = results["cells"][1]
    assert fast["vs_timm_eager"]["img_s"] == pytest.approx(1.5)
    assert fast["vs_timm_eager"]["ms"] == pytest.approx(1.5)  # speed-up: timm's ms / ours
    assert fast["vs_timm_eager"]["peak_mem_gib"] == pytest.approx(0.8)
    assert "vs_timm_eager" not in results["cells"][0]

    table = report.markdown(results)
    assert "256/128" not in table  # no training metric planned: one batch column
    assert "| ViT-B/16 @224 | timm eager (SDPA) | 86.57 | 17.6 full / 17.5 lin+LN | 256 | 3,000 |" in table
    assert "| 4,500 | 1.50x |" in table
    assert "2,787 (RTX 4090)" in table
    assert "n/a [" in table and "timm has no T2T-ViT" in table and "oom [" in table
    assert "need a GPU" not in table  # a GPU run
    seg_row = {
        **results["rows"][0],
        "key": "upernet_deit_s16_512",
        "label": "UPerNet DeiT-S",
        "suite": "segmentation",
        "published": [p.as_dict() for p in published_for("upernet_deit_s16_512")],
    }
    seg = {
        **results,
        "rows": [seg_row],
        "cells": [
            {
                "row": "upernet_deit_s16_512",
                "provider": "timm_eager",
                "metric": "latency",
                "status": "n/a",
                "reason": "no timm",
            },
            {
                "row": "upernet_deit_s16_512",
                "provider": "fastvit_auto",
                "metric": "latency",
                "status": "ok",
                "values": {"ms": 12.5},
                "timing": {"first_call_s": 2.0},
            },
        ],
    }
    seg_table = report.markdown(seg).split("### segmentation")[1]
    assert "vs timm" not in seg_table  # no timm segmentor: no ratio column
    assert "| 4.68 (V100) | 29.85 / 29.19 (V100, verify) |" in seg_table  # as published, both schedules

    path = report.write_json(results, tmp_path / "r.json")
    assert report.load_results(path) == json.loads(path.read_text())
    lines = list(csv.DictReader(open(report.write_csv(results, tmp_path / "r.csv"))))
    assert tuple(lines[0]) == report.CSV_FIELDS
    assert len(lines) == 3 + 3 + 1 + 1  # three numbers per measured cell, one line per cell without numbers
    fast_img = next(r for r in lines if r["provider"] == "fastvit_auto" and r["quantity"] == "img_s")
    assert float(fast_img["value"]) == 4500.0 and float(fast_img["vs_timm_eager"]) == pytest.approx(1.5)
    assert fast_img["unit"] == "img/s" and fast_img["gpu"] == "NVIDIA H100 80GB HBM3"
    assert "RTX 4090" in fast_img["published"]
    oom = next(r for r in lines if r["status"] == "oom")
    assert oom["value"] == "" and "batch 256" in oom["reason"]


def test_compare_two_results_files(tmp_path: Path) -> None:
    old = report.load_results(report.write_json(_synthetic(4000.0, gpu="NVIDIA H200"), tmp_path / "old.json"))
    new = _synthetic(5000.0)
    text = report.compare(new, old)
    assert "| vit_base_patch16_224 | fastvit_auto | infer | img_s (img/s) | 4,000 | 5,000 | 1.250 |" in text
    assert "| vit_base_patch16_224 | timm_eager | infer | img_s (img/s) | 3,000 | 3,000 | 1.000 |" in text
    assert "GPU or dtype differ" in text
    assert "t2t_vit_t_14" not in text  # no number in either run


@pytest.mark.parametrize(
    "content, message", [("not json", "is not JSON"), ('{"schema": "other"}', "not a benchmarks/run.py")]
)
def test_compare_rejects_foreign_files(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=message):
        report.load_results(bad)
    with pytest.raises(ValueError, match="no such file"):
        report.load_results(tmp_path / "missing.json")


# --- end to end through the command line ---------------------------------------------------------------------


def _only(path: Path, suffix: str) -> Path:
    found = sorted(path.glob(f"run-*{suffix}"))
    assert len(found) == 1, found
    return found[0]


def test_tiny_cpu_run_end_to_end(
    tiny_registry: rows.ModelRow, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    earlier = report.write_json(copy.deepcopy(_synthetic(4000.0)), tmp_path / "earlier.json")
    code = run.main(
        [
            "--models",
            tiny_registry.key,
            "--batch",
            "2",
            "--iters",
            "20",
            "--out",
            str(tmp_path / "out"),
            "--compare",
            str(earlier),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "need a GPU" in out and "| tiny ViT (test) | timm eager (SDPA) |" in out
    assert "## compare" in out and "(no number measured in both runs)" in out
    data = report.load_results(_only(tmp_path / "out", ".json"))
    assert data["meta"]["command"].endswith(f"--compare {earlier}")
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["gpu"] is None
    assert data["meta"]["fastvit_git_sha"] and "ops" in data["meta"]["fastvit_info"]
    assert data["settings"]["providers"] == ["timm_eager", "fastvit_torch"]
    assert data["chart"].startswith(("skipped: matplotlib", "written"))
    (row,) = data["rows"]
    with torch.device("meta"):
        import timm

        expected = sum(p.numel() for p in timm.create_model(TINY.timm_name, **TINY.create_kwargs()).parameters())
    assert row["params"]["value"] == expected
    cells = {(c["provider"], c["metric"]): c for c in data["cells"]}
    assert set(cells) == {(p, m) for p in ("timm_eager", "fastvit_torch") for m in ("infer", "latency")}
    timm_infer = cells[("timm_eager", "infer")]
    assert timm_infer["status"] == "ok" and timm_infer["batch"] == 2 and timm_infer["timing"]["iters"] == 20
    assert math.isfinite(timm_infer["values"]["img_s"]) and timm_infer["values"]["img_s"] > 0
    fastvit_infer = cells[("fastvit_torch", "infer")]
    if fastvit_infer["status"] == "ok":
        assert fastvit_infer["vs_timm_eager"]["img_s"] > 0
    else:
        assert fastvit_infer["status"] == "not available", fastvit_infer
    assert _only(tmp_path / "out", ".csv").read_text().startswith(",".join(report.CSV_FIELDS))
    assert "tiny ViT (test)" in _only(tmp_path / "out", ".md").read_text()
    log = _only(tmp_path / "out", ".log").read_text().splitlines()
    assert log[0].startswith("# python benchmarks/run.py --models") and len(log) == 2 + 4
    assert " vit_tiny_patch16_224 timm_eager infer ok batch=2 fp32 img_s=" in log[2]


def test_interrupt_still_writes_what_was_measured(
    tiny_registry: rows.ModelRow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def ctrl_c(*args: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setitem(measure.MEASURE, "latency", ctrl_c)
    code = run.main(
        [
            "--models",
            tiny_registry.key,
            "--providers",
            "timm_eager,fastvit_torch",
            "--batch",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 130
    data = json.loads(_only(tmp_path, ".json").read_text())
    assert data["interrupted"] is True
    statuses = {(c["provider"], c["metric"]): c["status"] for c in data["cells"]}
    assert statuses[("timm_eager", "infer")] == "ok"
    assert statuses[("timm_eager", "latency")] == "interrupted"
    assert statuses[("fastvit_torch", "infer")] == "interrupted"
    assert "Interrupted" in capsys.readouterr().out


# --- the segmentation protocol on a stand-in segmentor (the real ones are too slow for CPU tests) -----------


class _TinySegmentor(torch.nn.Module):
    """fastvit's segmentor contract in miniature: forward(x) -> logits at 1/4, forward(x, seg_label) ->
    mmseg-style losses with their sum under "loss", predict(x) -> logits at the input size."""

    num_classes = 5

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, self.num_classes, 4, stride=4)
        self.loss_keys_used: list[str] = []

    def forward(self, x: torch.Tensor, seg_label: Any = None) -> Any:
        logits = self.conv(x)
        if seg_label is None:
            return logits
        up = torch.nn.functional.interpolate(logits.float(), size=seg_label.shape[-2:], mode="bilinear")
        ce = torch.nn.functional.cross_entropy(up, seg_label, ignore_index=255)
        return {"decode.loss_ce": ce, "aux.loss_ce": 0.4 * ce, "decode.acc_seg": ce.detach() * 0, "loss": 1.4 * ce}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self(x), size=x.shape[-2:], mode="bilinear")


SEG = rows.ModelRow(
    "tiny_segmentor",
    "tiny segmentor (test)",
    "segmentation",
    32,
    2,
    2,
    timm_missing="timm has no UPerNet/DPT segmentor",
    num_classes=None,
)


@pytest.fixture
def tiny_segmentor(monkeypatch: pytest.MonkeyPatch) -> rows.ModelRow:
    real_create, real_has = providers._create, providers._fastvit_has_model
    monkeypatch.setattr(providers, "_create", lambda p, row: _TinySegmentor() if row is SEG else real_create(p, row))
    monkeypatch.setattr(providers, "_fastvit_has_model", lambda name: None if name == SEG.key else real_has(name))
    monkeypatch.setattr(measure, "PAPER_ITERS", 20)  # the protocol's 200 calls are for real runs
    return SEG


def test_segmentation_cell_runs_the_paper_protocol(tiny_segmentor: rows.ModelRow) -> None:
    assert measure.plan_for(SEG, CPU) == ("infer", "latency")
    assert measure.plan_for(SEG, torch.device("cuda")) == measure.METRICS
    results = run_cell(SEG, _provider("fastvit_torch"), measure.METRICS, _settings(train_batch=2))
    assert results["train"]["status"] == "ok" and "forward(x, seg_label)" in results["train"]["notes"][0]
    assert results["paper_mem"]["status"] == "n/a" and "needs the CUDA allocator" in results["paper_mem"]["reason"]
    fps = results["paper_fps"]
    assert fps["status"] == "ok" and fps["dtype"] == "fp32" and fps["batch"] == 1
    assert fps["timing"]["warmup_calls"] == measure.PAPER_WARMUP and fps["timing"]["iters"] == 20
    assert fps["values"]["fps"] == pytest.approx(1e3 / fps["timing"]["mean_ms"])
    assert "model.predict" in fps["notes"][0]
    assert results["infer"]["status"] == "ok" and results["latency"]["status"] == "ok"
    timm = run_cell(SEG, _provider("timm_eager"), ("paper_fps",), _settings())
    assert timm["paper_fps"]["status"] == "n/a"
    compiled = run_cell(SEG, _provider("fastvit_compile"), ("paper_mem", "paper_fps"), _settings())
    assert {r["status"] for r in compiled.values()} == {"n/a"}  # the paper protocol is eager


def test_segmentation_loss_is_the_models_total() -> None:
    model = _TinySegmentor()
    loss_fn, note = measure._loss_fn(model, model, SEG)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    assert torch.equal(loss_fn(x, y), model(x, y)["loss"])  # not the sum of every "*loss*" entry
    assert "decode + auxiliary" in note


def test_chart_is_drawn(tmp_path: Path) -> None:
    """matplotlib is a dependency of fastvit, so a run always writes its PNG chart."""
    note = report.chart(_synthetic(4500.0), tmp_path / "c.png")
    assert note == "written to c.png" and (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- on a GPU: every provider and the paper protocol for real ---------------------------------------------------


@pytest.mark.gpu
def test_every_provider_on_the_gpu() -> None:
    cuda = Settings(device=torch.device("cuda"), dtype=torch.bfloat16, iters=20, max_warmup_s=60.0)
    for prov in providers.PROVIDERS:
        results = run_cell(TINY, prov, ("train", "infer", "latency"), cuda)
        for metric, r in results.items():
            if prov.graph and metric != "latency":
                assert r["status"] == "n/a"
                continue
            assert r["status"] in ("ok", "not available"), (prov.key, metric, r)
            if r["status"] == "ok":
                assert r["timing"]["clock"] == "cuda events" and r["timing"]["iters"] == 20
                assert all(math.isfinite(v) and v > 0 for v in r["values"].values()), (prov.key, metric, r)
                if metric != "latency":
                    assert r["values"]["peak_mem_gib"] > 0


@pytest.mark.gpu
def test_paper_memory_on_the_gpu(tiny_segmentor: rows.ModelRow) -> None:
    cuda = Settings(device=torch.device("cuda"), dtype=torch.bfloat16, iters=20)
    r = run_cell(SEG, _provider("fastvit_auto"), ("paper_mem", "paper_fps"), cuda)
    assert r["paper_mem"]["status"] == "ok" and r["paper_mem"]["dtype"] == "fp32" and r["paper_mem"]["batch"] == 2
    assert 0 < r["paper_mem"]["values"]["mem_gib"] < 1
    assert r["paper_fps"]["status"] == "ok" and r["paper_fps"]["timing"]["clock"] == "cuda events"


def test_time_budget_stops_cleanly(tiny_registry: rows.ModelRow, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        code = run.main(
            ["--models", tiny_registry.key, "--batch", "2", "--budget-min", "0.0001", "--out", str(tmp_path)]
        )
    assert code == 130
    data = json.loads(_only(tmp_path, ".json").read_text())
    first, *rest = data["cells"]
    assert first["status"] == "ok" and rest
    assert all(c["status"] == "interrupted" and "--budget-min 0.0001 deadline" in c["reason"] for c in rest)

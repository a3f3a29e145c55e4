"""benchmarks/tune_models.py, the measured-dispatch tables of whole models (issue #14 item 5): on the CPU the
script runs end to end and records, per op, that nothing is measured there and why; the summary counts wins and
speedups from GPU-shaped entries; bad arguments are refused."""

from __future__ import annotations

import json

import pytest
import tune_models


def test_cpu_run_records_every_op_unmeasured_with_the_reason(tmp_path, capsys):
    out = tmp_path / "tune.json"
    rc = tune_models.main(["--device", "cpu", "--models", "vit_tiny_patch16_224", "--batches", "1",
                           "--dtype", "fp32", "--img-size", "32", "--json", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["environment"]["device"] == "cpu"
    rows = data["rows"]
    assert [(r["model"], r["batch"], r["mode"]) for r in rows] == [
        ("vit_tiny_patch16_224", 1, "inference"), ("vit_tiny_patch16_224", 1, "training")]  # fmt: skip
    for row in rows:
        ops = {key.split("|")[0] for key in row["table"]}
        assert {"patch_embed", "layer_norm", "linear", "attention_qkvpacked"} <= ops, ops
        assert all(e["measured"] is False and e["backend"] == "torch" and e["why"] for e in row["table"].values())
    # training runs the backward too, so its keys are the fwd+bwd ones
    assert all(k.endswith("|fwd+bwd") for k in rows[1]["table"]) and all(k.endswith("|fwd") for k in rows[0]["table"])
    assert "| linear | inference | - | - | CPU tensors" in capsys.readouterr().out


def test_summary_counts_wins_and_the_speedup_over_torch():
    def entry(backend, **times):
        return {"backend": backend, "times_ms": times, "refused": {}}

    rows = [
        {"mode": "inference", "table": {
            "linear|NVIDIA H200 sm_90|bfloat16|M=50432 N=2304|fwd": entry("triton", torch=2.0, triton=1.0),
            "linear|NVIDIA H200 sm_90|bfloat16|M=50432 N=768|fwd": entry("torch", torch=1.0, triton=1.5),
            "linear|NVIDIA H200 sm_90|bfloat16|M=197 N=768|fwd": entry("cuda", torch=3.0, cuda=1.0, triton=2.0),
        }},
        {"mode": "training", "table": {
            "layer_norm|cpu|float32|rows~256|fwd+bwd": {"backend": "torch", "measured": False, "why": "CPU tensors"},
        }},
    ]  # fmt: skip
    lines = tune_models.summary(rows).splitlines()
    assert "| linear | inference | triton: 1, torch: 1, cuda: 1 | 2.00x | - |" in lines, lines
    assert "| layer_norm | training | - | - | CPU tensors |" in lines, lines


def test_bad_batch_is_refused(capsys):
    with pytest.raises(SystemExit):
        tune_models.main(["--device", "cpu", "--batches", "0"])
    assert "--batches must be positive integers" in capsys.readouterr().err

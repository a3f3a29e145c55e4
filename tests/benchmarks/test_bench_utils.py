"""benchmarks/bench_utils.py: the bench_<op>.py results files carry the one environment record (the harness's)."""

import csv
import json

import bench_utils
import torch
from _harness import report


def test_write_results_records_the_harness_environment_in_json_and_csv(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_utils, "RESULTS_DIR", str(tmp_path))
    rows = [{"shape": "a", "ms": 1.5}, {"shape": "b", "note": "not run: x"}]
    path = bench_utils.write_results("op", rows, {"ceiling": 2.0}, csv_too=True)
    data = json.loads(open(path).read())
    assert data["rows"] == rows and data["ceiling"] == 2.0 and data["benchmark"] == "op"
    env = data["environment"]
    assert set(env) == set(report.environment(torch.device("cpu"), "c"))
    assert env["fastvit_info"]["git_sha"] == data["git_sha"]
    with open(path[: -len(".json")] + ".csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [r["shape"] for r in lines] == ["a", "b"] and lines[1]["note"] == "not run: x"
    assert all(r["torch"] == env["torch"] and "gpu" in r for r in lines)

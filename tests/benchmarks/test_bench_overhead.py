"""benchmarks/bench_overhead.py runs on the CPU: every op row checks fastvit against the torch ops it replaces."""

import json

import bench_overhead
import pytest


def test_op_rows_compare_every_op_with_the_torch_ops_it_replaces(tmp_path):
    out = tmp_path / "overhead.json"
    rows = bench_overhead.main(["--only", "op", "--rounds", "1", "--calls", "1", "--json", str(out)])
    names = {r["what"] for r in rows}
    assert {"layer_norm", "linear + gelu", "attention_qkvpacked", "patch_embed", "soft_split"} <= names
    assert {r["mode"] for r in rows} == {"no grad", "grad"}
    assert all(
        r["us"] > 0 and r["torch_us"] > 0 and r["vs_torch"] == pytest.approx(r["us"] / r["torch_us"]) for r in rows
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))

"""Backend choice: explicit > FASTVIT_BACKEND > auto, one error listing every reason, recorded fallbacks."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastvit
from fastvit import _ext, info, ops
from fastvit.ops import dispatch


@pytest.fixture
def toy_op(monkeypatch):
    """A throwaway op whose triton backend refuses wide rows; the GPU is faked as an sm_90 device."""
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(dispatch._ext, "device_problem", lambda: None)  # ... that fastvit._C can use
    op = dispatch.OpDispatcher(
        name="toy",
        reasons={
            "torch": lambda x: [],
            "triton": lambda x: [f"width {x.shape[-1]} > 16"] if x.shape[-1] > 16 else [],
            "cuda": lambda x: ["the toy has no CUDA kernel", "and a second reason"],
        },
        preference=("triton", "cuda", "torch"),
    )
    yield op
    dispatch.registered_ops().pop("toy")


def test_static_mode_walks_the_preference_order_and_records_fallbacks(toy_op, monkeypatch):
    monkeypatch.setattr(dispatch._ext, "available", lambda: True)
    cuda = torch.device("cuda", 0)
    with dispatch.dispatch_mode("static"):
        assert toy_op.select(None, cuda, x=torch.empty(2, 8, device="meta")) == "triton"
        assert toy_op.select(None, cuda, x=torch.empty(2, 32, device="meta")) == "torch"
    log = dispatch.fallback_log()
    assert log[("toy", "triton")] == ["width 32 > 16"]
    assert log[("toy", "cuda")] == ["the toy has no CUDA kernel", "and a second reason"]


def test_cpu_tensors_go_to_torch_under_auto(toy_op):
    assert toy_op.select(None, torch.device("cpu"), x=torch.empty(2, 8)) == "torch"


def test_explicit_backend_error_lists_every_reason_with_a_hint(toy_op, monkeypatch):
    monkeypatch.setattr(dispatch._ext, "available", lambda: True)
    with pytest.raises(ops.BackendNotSupported) as info:
        toy_op.select("cuda", torch.device("cuda", 0), x=torch.empty(2, 32, device="meta"))
    msg = str(info.value)
    assert "fastvit.ops.toy: backend backend='cuda' cannot run these inputs" in msg
    assert "x: float32[2, 32] on meta" in msg
    assert "  - the toy has no CUDA kernel\n  - and a second reason" in msg
    assert "Hint: use backend='torch'" in msg


def test_environment_variable_selects_and_is_named_in_errors(toy_op, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendNotSupported, match=r"FASTVIT_BACKEND='cuda'(.|\n)*unset FASTVIT_BACKEND"):
        toy_op.select(None, torch.device("cpu"), x=torch.empty(2, 8))
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert toy_op.select(None, torch.device("cpu"), x=torch.empty(2, 8)) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert toy_op.select(None, torch.device("cpu"), x=torch.empty(2, 8)) == "torch"
    # An explicit argument wins over the environment.
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert toy_op.select("torch", torch.device("cpu"), x=torch.empty(2, 8)) == "torch"


def test_unknown_backend_names(toy_op, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend backend='cudnn'; expected one of torch, triton, cuda"):
        toy_op.select("cudnn", torch.device("cpu"), x=torch.empty(1))
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown backend FASTVIT_BACKEND='fast'"):
        toy_op.select(None, torch.device("cpu"), x=torch.empty(1))
    with pytest.raises(ValueError, match="unknown backends"):
        dispatch.OpDispatcher(name="bad", reasons={"cudnn": lambda: []}, preference=())


def test_old_gpus_are_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "_capability", lambda index: (7, 5))
    reasons = dispatch.environment_reasons("triton", torch.device("cuda", 0))
    assert any("compute capability 7.5 is below 8.0" in r for r in reasons)


@pytest.fixture
def fake_device_problem(monkeypatch):
    """Fakes fastvit._C's device_problem() with a counting stub; the per-process cache is reset around it."""
    calls = []
    answer = {"value": ""}

    def device_problem():
        calls.append(1)
        if isinstance(answer["value"], Exception):
            raise answer["value"]
        return answer["value"]

    monkeypatch.setattr(_ext, "_module", type("FakeC", (), {"device_problem": staticmethod(device_problem)}))
    monkeypatch.setattr(_ext, "available", lambda: True)
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    _ext.device_problem.cache_clear()
    yield answer, calls
    _ext.device_problem.cache_clear()


def test_cuda_backend_is_refused_where_the_extension_cannot_use_the_gpu(fake_device_problem):
    answer, calls = fake_device_problem
    answer["value"] = "the NVIDIA driver supports CUDA up to 12.4, older than the CUDA 13.0 runtime"
    cuda = torch.device("cuda", 0)
    for _ in range(3):
        reasons = dispatch.environment_reasons("cuda", cuda)
        assert reasons == [f"fastvit._C cannot use the GPU: {answer['value']}"]
    assert len(calls) == 1, "the extension must be asked once per process"
    assert dispatch.environment_reasons("triton", cuda) == []  # only the cuda backend depends on it


def test_usable_extension_adds_no_reason_and_cpu_tensors_never_ask(fake_device_problem):
    answer, calls = fake_device_problem
    assert dispatch.environment_reasons("cuda", torch.device("cpu")) == [
        "tensors are on cpu, the 'cuda' backend needs CUDA tensors"
    ]
    assert calls == [], "CPU calls must not query the CUDA runtime"
    assert dispatch.environment_reasons("cuda", torch.device("cuda", 0)) == []
    assert len(calls) == 1


def test_a_failing_device_query_is_a_reason_not_an_exception(fake_device_problem):
    answer, _ = fake_device_problem
    answer["value"] = RuntimeError("boom")
    (reason,) = dispatch.environment_reasons("cuda", torch.device("cuda", 0))
    assert "fastvit._C.device_problem() failed: RuntimeError: boom" in reason


def test_every_op_is_registered_with_a_torch_backend():
    assert "layer_norm" in dispatch.registered_ops()
    for name, op in dispatch.registered_ops().items():
        assert "torch" in op.reasons, f"{name} has no torch backend: CPU users could not run it"


def test_info_command_reports_versions_extension_and_backends(monkeypatch):
    out = subprocess.run([sys.executable, "-m", "fastvit.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("torch ", "triton ", "timm ", "fastvit._C", "cuBLASLt    ", "layer_norm", "auto order"):
        assert needle in text, f"{needle!r} missing from `python -m fastvit.info`:\n{text}"
    assert ("GPU     none visible" in text) == (not torch.cuda.is_available())
    status = info.collect()["extension"]["cublaslt"]
    assert status.startswith(("loaded ", "cuBLASLt is not usable")) if _ext.available() else "not loaded" in status
    monkeypatch.setattr(_ext, "available", lambda: False)  # as where the extension is missing: no raise
    assert info.collect()["extension"]["cublaslt"] == "not checked (fastvit._C is not loaded)"


# ------------------------------------------------------------------- measured dispatch (injected timer)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A toy op on a faked sm_90 GPU (meta tensors), a cache file under tmp_path and a timer that returns
    the configured ms per backend (and counts how often each backend was timed)."""
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: "Fake H100")
    monkeypatch.setattr(dispatch, "_index", lambda device: 0)
    monkeypatch.setattr(dispatch._ext, "available", lambda: True)
    monkeypatch.setattr(dispatch._ext, "device_problem", lambda: None)
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    monkeypatch.delenv(dispatch.MODE_ENV, raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.reset()
    state = {"ms": {"torch": 2.0, "triton": 1.0, "cuda": 3.0}, "timed": [], "raise": {}}

    def run(backend, x):
        if backend in state["raise"]:
            raise state["raise"][backend]
        state["last"] = backend
        return x

    def timer(fn, device):
        fn()
        state["timed"].append(state["last"])
        return state["ms"][state["last"]]

    previous = dispatch.set_timer(timer)
    op = dispatch.OpDispatcher(
        name="toy_measured",
        reasons={"torch": lambda x: [], "triton": lambda x: [], "cuda": lambda x: []},
        preference=("triton", "cuda", "torch"),
    )
    state.update(op=op, run=run, path=tmp_path / "dispatch.json", cuda=torch.device("cuda", 0))
    yield state
    dispatch.set_timer(previous)
    dispatch.registered_ops().pop("toy_measured")
    dispatch.reset()


def _select(state, shape=(2, 8)):
    return state["op"].select(None, state["cuda"], _run=state["run"], x=torch.empty(*shape, device="meta"))


def test_measured_picks_the_fastest_backend_torch_included_and_keeps_it(measured):
    assert _select(measured) == "triton"
    assert sorted(measured["timed"]) == ["cuda", "torch", "triton"]
    measured["ms"].update(torch=0.5)  # a faster torch later does not change a made choice
    assert _select(measured) == "triton"
    assert len(measured["timed"]) == 3, "a key is timed once per process"
    assert _select(measured, (4, 8)) == "torch"  # a new key is measured: torch's composition can win
    (entry,) = [e for k, e in dispatch.measured_table().items() if "(4, 8)" in k]
    assert entry["times_ms"] == {"triton": 1.0, "cuda": 3.0, "torch": 0.5} and entry["refused"] == {}


def test_measured_choice_persists_across_processes_and_keys_name_gpu_dtype_and_grad(measured):
    assert _select(measured) == "triton"
    data = json.loads(measured["path"].read_text())
    assert data["format"] == dispatch.CACHE_FORMAT and data["versions"] == dispatch.cache_versions()
    (key,) = data["entries"]
    assert key.startswith("toy_measured|Fake H100 sm_90|float32|") and key.endswith("|fwd")
    dispatch.reset()  # as a new process: the file answers, nothing is timed
    measured["timed"].clear()
    measured["ms"].update(torch=0.1)
    assert _select(measured) == "triton" and measured["timed"] == []


def test_a_version_change_invalidates_the_cache_with_one_warning(measured, monkeypatch):
    assert _select(measured) == "triton"
    versions = dict(dispatch.cache_versions(), fastvit="9.9.9")
    monkeypatch.setattr(dispatch, "cache_versions", lambda: versions)
    dispatch.reset()
    measured["ms"].update(torch=0.1)
    with pytest.warns(RuntimeWarning, match="written for other versions"):
        assert _select(measured) == "torch"  # re-measured under the new versions
    data = json.loads(measured["path"].read_text())
    assert data["versions"]["fastvit"] == "9.9.9" and len(data["entries"]) == 1


def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning_and_rewritten(measured):
    for content in ("{not json", json.dumps({"format": "someone-else", "entries": {}})):
        dispatch.reset()
        measured["path"].write_text(content)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _select(measured) == "triton"
            assert _select(measured, (3, 8)) == "triton"
        assert len([w for w in caught if "dispatch cache" in str(w.message)]) == 1, [str(w.message) for w in caught]
        assert len(json.loads(measured["path"].read_text())["entries"]) == 2


def test_an_unwritable_cache_means_memory_only_with_one_warning(measured, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(dispatch.CACHE_ENV, str(blocker / "dispatch.json"))  # its folder is a file
    dispatch.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _select(measured) == "triton"
        assert _select(measured, (3, 8)) == "triton"
    assert [str(w.message) for w in caught if "cannot be written" in str(w.message)].__len__() == 1
    assert len(measured["timed"]) == 6 and len(dispatch.measured_table()) == 2  # kept in memory


def test_a_backend_that_raises_while_timed_is_recorded_as_refused(measured):
    measured["raise"]["triton"] = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert _select(measured) == "torch"
    (entry,) = dispatch.measured_table().values()
    assert entry["refused"] == {"triton": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert set(entry["times_ms"]) == {"torch", "cuda"}
    assert "triton refused" in "\n".join(dispatch.format_cache(dispatch.describe_cache()))


def test_nothing_is_timed_inside_capture_or_tracing_cached_choice_else_static(measured, monkeypatch):
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    measured["ms"].update(torch=0.1)
    assert _select(measured) == "triton" and measured["timed"] == []  # static order, nothing timed
    assert dispatch.measured_table() == {}
    monkeypatch.setattr(dispatch, "_capturing", lambda device: False)
    assert _select(measured) == "torch"  # the first eager call measures
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    timed = len(measured["timed"])
    assert _select(measured) == "torch" and _select(measured, (5, 8)) == "triton"
    assert len(measured["timed"]) == timed
    monkeypatch.setattr(dispatch, "_capturing", lambda device: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as inside torch.compile tracing
    assert _select(measured) == "torch" and _select(measured, (6, 8)) == "triton"
    assert len(measured["timed"]) == timed


def test_modes_static_by_environment_or_argument_and_explicit_backends(measured, monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "static")
    assert _select(measured) == "triton" and measured["timed"] == []
    monkeypatch.setenv(dispatch.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="unknown FASTVIT_DISPATCH='fastest'; expected one of measured, static"):
        _select(measured)
    monkeypatch.delenv(dispatch.MODE_ENV)
    with dispatch.dispatch_mode("static"):
        assert _select(measured) == "triton" and measured["timed"] == []
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert _select(measured) == "cuda" and measured["timed"] == []
    monkeypatch.delenv(dispatch.ENV_VAR)
    measured["ms"].update(triton=9.0)
    assert _select(measured) == "torch" and len(measured["timed"]) == 3


def _write_entries(path: str, rank: int, count: int) -> None:
    os.environ[dispatch.CACHE_ENV] = path
    dispatch.reset()
    for i in range(count):
        dispatch._persist(f"rank{rank}|key{i}", {"backend": "torch", "times_ms": {"torch": 1.0}, "refused": {}})
    os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX) to start writers cheaply")
def test_concurrent_writer_processes_lose_no_entry_and_never_corrupt_the_file(tmp_path):
    path = str(tmp_path / "shared.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_entries, args=(path, rank, 15)) for rank in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(open(path).read())["entries"]
    assert sorted(entries) == sorted(f"rank{r}|key{i}" for r in range(4) for i in range(15))
    assert not [f for f in os.listdir(tmp_path) if f not in ("shared.json", "shared.json.lock")], "temp files left"


def test_the_real_timer_chooses_between_torch_and_the_triton_interpreter(monkeypatch, tmp_path):
    """End to end on a tiny LayerNorm: the wall-clock timer times torch and the Triton interpreter (the
    interpreter is orders of magnitude slower, so torch must win) and both times are recorded. One intra-op
    thread: on a loaded 2-core machine torch's second OpenMP thread, descheduled, made a 2x3x16 LayerNorm
    take 8-16 ms, longer than the interpreter (measured while other jobs ran)."""
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dispatch.reset()
    row = dispatch.registered_ops()["layer_norm"]
    x, w, b = torch.randn(2, 3, 16), torch.randn(16), torch.randn(16)
    inputs = {"x": x, "weight": w, "bias": b, "residual": None}

    def run(backend, x, weight, bias, residual):
        return ops.layer_norm(x, weight, bias, 1e-6, residual=residual, backend=backend)

    key = row.measured_key(x.device, inputs)
    try:
        entry = row._measure(key, ["triton", "torch"], x.device, run, inputs)
    finally:
        torch.set_num_threads(threads)
    assert entry["backend"] == "torch" and entry["refused"] == {}
    assert entry["times_ms"]["triton"] > entry["times_ms"]["torch"] > 0
    assert json.loads((tmp_path / "dispatch.json").read_text())["entries"][key]["backend"] == "torch"
    dispatch.reset()


def test_tune_lists_every_op_call_of_a_model(monkeypatch, tmp_path):
    from fastvit.models.vit import VisionTransformer

    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1, num_classes=3).eval()
    table = fastvit.tune(model, torch.randn(1, 3, 32, 32))
    assert {k.split("|")[0] for k in table} == {"patch_embed", "layer_norm", "linear", "attention_qkvpacked"}
    assert all(
        e == {"backend": "torch", "measured": False, "why": "CPU tensors: auto runs torch"} for e in table.values()
    )
    assert all(k.endswith("|fwd") for k in table)  # eval model: no backward


# ------------------------------------------------------------------------------------ the op table


def test_every_row_of_the_op_table_is_complete():
    for name, row in dispatch.registered_ops().items():
        if name.startswith("toy"):
            continue
        assert callable(row.reference) and callable(row.check), name
        assert set(row.launchers) == set(row.reasons), f"{name}: a launcher per backend"
        assert row.forward_op is not None and hasattr(row.forward_op, "register_fake"), name
        assert row.autocast in ("lower", "keep") and row.static_source.startswith("unmeasured"), name


def test_dispatch_choice_and_checks_are_cached_per_signature(monkeypatch):
    row = dispatch.registered_ops()["layer_norm"]
    calls = []
    real = row.select
    monkeypatch.setattr(row, "select", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b = torch.randn(2, 4, 8), torch.randn(8), torch.randn(8)
    for _ in range(3):
        ops.layer_norm(x, w, b)
    assert len(calls) <= 1, "the second call of a signature must not select again"
    ops.layer_norm(torch.randn(3, 4, 8), w, b)
    assert len(calls) == 2 - (len(calls) == 0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.layer_norm(x.double(), w, b)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.layer_norm([1.0], w, b)


def test_soft_split_checks_and_choice_are_cached_per_signature(monkeypatch):
    row = dispatch.registered_ops()["soft_split"]
    calls = []
    real = row.select
    monkeypatch.setattr(row, "select", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = torch.randn(1, 64, 8)
    first = ops.soft_split(tok, kernel_size=3, stride=2, padding=1, hw=(8, 8))
    for _ in range(2):
        again = ops.soft_split(tok, kernel_size=3, stride=2, padding=1, hw=(8, 8))
    assert len(calls) == 1, "a repeated signature must neither check nor select again"
    assert torch.equal(first, again)
    ops.soft_split(tok, kernel_size=3, stride=1, padding=1, hw=(8, 8))  # another geometry: a new signature
    assert len(calls) == 2
    # values equal to a cached call's but of the wrong type never share its key: the checks still refuse them
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        ops.soft_split(tok, kernel_size=True, stride=2, padding=1, hw=(8, 8))
    with pytest.raises(ValueError, match="hw must be a pair of positive ints"):
        ops.soft_split(tok, kernel_size=3, stride=2, padding=1, hw=(8.0, 8))
    with pytest.raises(ValueError, match="L = H \\* W"):
        ops.soft_split(torch.randn(1, 63, 8), kernel_size=3, stride=2, padding=1, hw=(8, 8))
    # list geometry is valid, just not memoised
    assert torch.equal(ops.soft_split(tok, kernel_size=[3, 3], stride=2, padding=1, hw=[8, 8]), first)


# ------------------------------------------------------------------------------------ lean eager path


def _lean_cases():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, r, w, b = t(2, 3, 16), t(2, 3, 16), t(16), t(16)
    w1, b1 = t(32, 16), t(32)
    qkv = t(1, 4, 48)
    q, k, v = t(1, 2, 4, 16), t(1, 2, 4, 16), t(1, 2, 4, 16)
    return [
        ("layer_norm", lambda: ops.layer_norm(x, w, b, residual=r, backend="triton"), (x, w, b, r)),
        ("linear", lambda: ops.linear(x, w1, b1, activation="gelu", backend="triton"), (x, w1, b1)),
        ("attention_qkvpacked", lambda: ops.attention_qkvpacked(qkv, 1, backend="triton"), (qkv,)),
        ("attention", lambda: ops.attention(q, k, v, backend="triton"), (q, k, v)),
    ]


def _node_names(node, seen=None) -> str:
    """Every autograd node name reachable from ``node``, joined (which path built the graph)."""
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return ""
    seen.add(node)
    return " ".join([node.name(), *(_node_names(n, seen) for n, _ in node.next_functions)])


@pytest.mark.interpreter
@pytest.mark.parametrize("case", range(4))
def test_lean_eager_path_equals_the_registered_op_in_values_and_gradients(case):
    from fastvit.ops._library import registered_path

    name, call, leaves = _lean_cases()[case]

    def run():
        out = call()
        outs = out if isinstance(out, tuple) else (out,)
        seed = torch.Generator().manual_seed(1)
        douts = [torch.randn(o.shape, generator=seed) for o in outs]
        grads = torch.autograd.grad(outs, leaves, douts)
        return outs, grads, _node_names(outs[0].grad_fn)

    lean_outs, lean_grads, lean_node = run()
    with registered_path():
        reg_outs, reg_grads, reg_node = run()
    assert "eager" in lean_node and "eager" not in reg_node and "fastvit" in reg_node, (lean_node, reg_node)
    for a, b in zip((*lean_outs, *lean_grads), (*reg_outs, *reg_grads)):
        assert torch.equal(a, b), name  # ... giving bit-identical values and gradients
    with torch.no_grad():  # without grad the lean path calls the implementation, no autograd node
        assert (call()[0] if name == "layer_norm" else call()).grad_fn is None


@pytest.mark.interpreter
def test_compile_fullgraph_with_the_environment_switch_and_memoised_signatures(monkeypatch):
    """FASTVIT_BACKEND is read outside the traced region; a signature memoised in eager is not traced."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    x = torch.randn(2, 3, 16, requires_grad=True)
    w, b, w1, b1 = torch.randn(16), torch.randn(16), torch.randn(32, 16), torch.randn(32)

    def f(x):
        y, z = ops.layer_norm(x, w, b, residual=x)
        return ops.linear(y, w1, b1, activation="gelu"), z

    eager = f(x)  # memoises both signatures
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c, a)
    compiled[0].sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ------------------------------------------------------------------------------ the memo's keys (hot path)


def _count_selects(monkeypatch, name):
    row = dispatch.registered_ops()[name]
    calls = []
    real = row.select
    monkeypatch.setattr(row, "select", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_every_op_checks_and_selects_once_per_signature(monkeypatch):
    x, w, b = torch.randn(1, 5, 16), torch.randn(16), torch.randn(16)
    w1, b1, qkv = torch.randn(48, 16), torch.randn(48), torch.randn(1, 5, 48)
    q = k = v = torch.randn(1, 2, 5, 8)
    img, wp = torch.randn(1, 3, 32, 32), torch.randn(16, 3, 16, 16)
    cls, pos = torch.randn(1, 1, 16), torch.randn(1, 5, 16)
    cases = {
        "layer_norm": lambda: ops.layer_norm(x, w, b, 1e-6, residual=x),
        "linear": lambda: ops.linear(x, w1, b1, residual=qkv),
        "attention": lambda: ops.attention(q, k, v, scale=0.5),
        "attention_qkvpacked": lambda: ops.attention_qkvpacked(qkv, 2),
        "patch_embed": lambda: ops.patch_embed(img, wp, b, patch_size=16, pos_embed=pos, prefix_tokens=cls),
    }
    for name, call in cases.items():
        calls = _count_selects(monkeypatch, name)
        first = call()
        for _ in range(2):
            again = call()
        assert len(calls) == 1, f"{name}: a repeated signature must neither check nor select again"
        pairs = zip(*(out if isinstance(out, tuple) else (out,) for out in (first, again)))
        assert all(torch.equal(a, c) for a, c in pairs), name


def test_bools_never_share_a_valid_calls_key():
    """hash(True) == hash(1) and True == 1.0: a memoised valid call must not let the bool through."""
    qkv, x, w, b = torch.randn(1, 5, 48), torch.randn(1, 5, 16), torch.randn(16), torch.randn(16)
    ops.attention_qkvpacked(qkv, 1)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got True"):
        ops.attention_qkvpacked(qkv, True)
    ops.layer_norm(x, w, b, 1.0)
    with pytest.raises(TypeError, match="eps must be a float, got bool True"):
        ops.layer_norm(x, w, b, True)
    img, wp = torch.randn(1, 3, 2, 2), torch.randn(4, 3, 1, 1)
    ops.patch_embed(img, wp, None, patch_size=1)
    with pytest.raises(TypeError, match="patch_size must be a positive int"):
        ops.patch_embed(img, wp, None, patch_size=True)


def test_the_environment_switch_is_read_on_every_call_after_a_memo_hit(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x, w, b = torch.randn(2, 16), torch.randn(16), torch.randn(16)
    for _ in range(2):
        ops.layer_norm(x, w, b)  # memoised under auto
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendNotSupported, match="FASTVIT_BACKEND='cuda'"):
        ops.layer_norm(x, w, b)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    torch.testing.assert_close(ops.layer_norm(x, w, b), torch.nn.functional.layer_norm(x, (16,), w, b, 1e-6))


def test_a_signature_valid_only_under_autocast_is_refused_outside_it():
    """linear's mixed dtypes pass its checks under autocast only; the memo key has no autocast state, so
    the entry is tagged and answers only under autocast."""
    x, w = torch.randn(2, 8), torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            assert ops.linear(x, w).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 must equal x's dtype torch.float32"):
        ops.linear(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear(x, w).dtype == torch.bfloat16  # still served


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["cls_pos_all", "pos_patches_only", "prefix_2d_no_pos", "no_prefix"])
def test_patch_embed_torch_path_is_bit_identical_to_the_reference(batch, layout):
    from fastvit.ops.patch_embed import patch_embed_ref

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    img, wp, bp = t(batch, 3, 8, 8), t(16, 3, 4, 4), t(16)
    prefix = {"cls_pos_all": t(1, 2, 16), "pos_patches_only": t(1, 1, 16), "prefix_2d_no_pos": t(2, 16)}.get(layout)
    pos = {"cls_pos_all": t(1, 6, 16), "pos_patches_only": t(4, 16), "no_prefix": t(1, 4, 16)}.get(layout)
    leaves = [a for a in (img, wp, bp, prefix, pos) if a is not None]
    outs = []
    for fn in (ops.patch_embed, patch_embed_ref):
        y = fn(img, wp, bp, patch_size=4, pos_embed=pos, prefix_tokens=prefix)
        outs.append((y, *torch.autograd.grad(y, leaves, torch.ones_like(y))))
    for a, c in zip(*outs):
        assert torch.equal(a, c), layout

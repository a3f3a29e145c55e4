"""Backend choice: explicit > FASTVIT_BACKEND > auto, one error listing every reason, recorded fallbacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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

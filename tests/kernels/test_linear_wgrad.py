"""fastvit.kernels.linear: the fused wgrad kernel (dW = dy^T @ x with dbias = sum_rows(dy) from the same
pass over dy), its measured choice against torch.matmul + dy.sum(0), and (gpu) csrc's BGRADB entry point.

Numerics run under the interpreter in fp16 / fp32 at small ragged shapes against fp64 (bf16 is not run
there: the interpreter's dot multiplies bf16 bit patterns, see test_linear_tma.py), with and without splits
of the M reduction, on non-contiguous dy. The choice runs on the CPU with a faked GPU and an injected timer
(as tests/kernels/test_linear_tma.py does for the TMA GEMM).
"""

from __future__ import annotations

import pytest
import torch

from fastvit.kernels import INTERPRET, linear
from fastvit.ops import dispatch
from fastvit.testing import assert_close, assert_three_way
from tests._fake_gpu import fake_sm90

interpreter = pytest.mark.skipif(
    not INTERPRET, reason="runs the kernel on the CPU under TRITON_INTERPRET=1 (the gpu tests cover a GPU)"
)


def _ref(dy, x):
    return dy.double().t() @ x.double(), dy.double().sum(0)


def _check_wgrad(dy, x, dw, db):
    """Three-way against fp64, torch's own dW / column sum in dy's dtype as the low-precision comparison."""
    ref_w, ref_b = _ref(dy, x)
    assert dw.dtype == dy.dtype and dw.shape == ref_w.shape
    assert_three_way(dw.double(), ref_w, (dy.t() @ x).double(), factor=3.0, name="dweight")
    assert db.dtype == torch.float32 and db.shape == ref_b.shape
    assert_three_way(db.double(), ref_b, dy.sum(0, dtype=torch.float32).double(), factor=3.0, name="dbias")


# ------------------------------------------------------------------------------------- numerics


@interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "M, N, K, splits",
    [(37, 20, 33, 1), (64, 32, 32, 1), (600, 24, 40, 3), (300, 40, 17, 2), (5, 48, 64, None)],
)
def test_matches_fp64(M, N, K, splits, dtype):
    torch.manual_seed(M + N + K)
    dy, x = torch.randn(M, N, dtype=dtype), torch.randn(M, K, dtype=dtype)
    dw, db = linear.linear_wgrad(dy, x, True, splits=splits)
    _check_wgrad(dy, x, dw, db)


@interpreter
@pytest.mark.interpreter
def test_non_contiguous_dy_and_x_and_no_dbias():
    torch.manual_seed(1)
    dy = torch.randn(40, 70, dtype=torch.float16).t()  # (70, 40), unit stride along M
    x = torch.randn(70, 48, dtype=torch.float16)[:, 8:40]  # row stride 48
    dw, db = linear.linear_wgrad(dy, x, True, splits=2)
    _check_wgrad(dy, x, dw, db)
    dw2, none = linear.linear_wgrad(dy, x, False, splits=2)
    assert none is None and torch.equal(dw2, dw)


@interpreter
@pytest.mark.interpreter
def test_splits_are_deterministic_and_zero_rows():
    torch.manual_seed(2)
    dy, x = torch.randn(530, 24, dtype=torch.float32), torch.randn(530, 40, dtype=torch.float32)
    a = linear.linear_wgrad(dy, x, True, splits=3)
    b = linear.linear_wgrad(dy, x, True, splits=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dw, db = linear.linear_wgrad(dy[:0], x[:0], True)
    assert torch.equal(dw, torch.zeros(24, 40)) and torch.equal(db, torch.zeros(24))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="share M"):
        linear.linear_wgrad(torch.randn(4, 3), torch.randn(5, 2), True)
    with pytest.raises(TypeError, match="share one of"):
        linear.linear_wgrad(torch.randn(4, 3), torch.randn(4, 2, dtype=torch.float16), True)
    with pytest.raises(ValueError, match="splits"):
        linear.linear_wgrad(torch.randn(4, 3), torch.randn(4, 2), True, splits=0)


def test_splits_heuristic_at_the_vit_shapes():
    """Two programs per SM of 128 x 128 dW tiles (132 SMs), at most 16 splits, >= 2048 rows each."""
    M = 256 * 197
    assert linear._wgrad_splits(M, 2304, 768, 132) == 3  # qkv: 108 tiles
    assert linear._wgrad_splits(M, 768, 768, 132) == 8  # proj: 36 tiles
    assert linear._wgrad_splits(M, 768, 3072, 132) == 2  # fc2: 144 tiles
    assert linear._wgrad_splits(197, 768, 768, 132) == 1  # batch 1: too few rows to split


# ------------------------------------------------------------------------------ measured choice

KEY = "linear_wgrad|Fake H100 sm_90|float16|M=40|N=48|K=32|dbias=True"


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A faked sm_90 GPU (the CPU tensor passed off as a CUDA one), the cache under tmp_path, both candidates
    replaced by recorders and a timer answering the configured ms for whichever ran."""
    fake_sm90(monkeypatch, tmp_path, linear, "_wgrad_device", linear.WGRAD_ENV_SWITCH)
    state = {"ms": {"torch": 2.0, "fused": 1.0}, "timed": [], "raise": {}, "ran": []}

    def recorder(name):
        def run(dy, x, need_dbias, *args):
            if name in state["raise"]:
                raise state["raise"][name]
            state["last"] = name
            state["ran"].append(name)
            return torch.full((dy.shape[1], x.shape[1]), float(len(name)), dtype=dy.dtype), torch.zeros(dy.shape[1])

        return run

    monkeypatch.setattr(linear, "linear_wgrad", recorder("fused"))
    monkeypatch.setattr(linear, "_torch_wgrad", recorder("torch"))

    def timer(fn, device):
        assert device == torch.device("cuda", 0)
        state.pop("last", None)
        fn()
        state["timed"].append(state["last"])
        return state["ms"][state["last"]]

    previous = dispatch.set_timer(timer)
    yield state
    dispatch.set_timer(previous)
    dispatch.reset()


def _call():
    return linear.linear_wgrad_dispatch(torch.randn(40, 48, dtype=torch.float16), torch.randn(40, 32,
                                        dtype=torch.float16), True)  # fmt: skip


@pytest.mark.parametrize(
    "torch_ms, fused_ms, expected", [(2.0, 1.0, "fused"), (1.0, 2.0, "torch"), (1.0, 1.0, "torch")]
)
def test_fused_only_where_timed_faster(fake_gpu, torch_ms, fused_ms, expected):
    state = fake_gpu
    state["ms"].update(torch=torch_ms, fused=fused_ms)
    _call()
    assert state["timed"] == ["torch", "fused"]  # each timed once, the torch pair first (ties keep it)
    assert state["ran"][-1] == expected
    entry = dispatch.measured_table()[KEY]
    assert entry["backend"] == expected and entry["refused"] == {}
    assert entry["times_ms"] == {"torch": torch_ms, "fused": fused_ms}
    state["ms"].update(torch=9.0, fused=0.1)  # later speeds change nothing
    _call()
    assert len(state["timed"]) == 2 and state["ran"][-1] == expected


def test_a_raising_fused_kernel_is_refused_with_the_reason(fake_gpu):
    state = fake_gpu
    state["raise"]["fused"] = RuntimeError("out of resources: shared memory")
    _call()
    entry = dispatch.measured_table()[KEY]
    assert entry["backend"] == "torch" and "out of resources" in entry["refused"]["fused"]
    assert state["ran"][-1] == "torch"


def test_static_mode_switch_off_and_cpu_never_time(fake_gpu, monkeypatch):
    state = fake_gpu
    monkeypatch.setenv(dispatch.MODE_ENV, "static")
    _call()
    monkeypatch.delenv(dispatch.MODE_ENV)
    monkeypatch.setenv(linear.WGRAD_ENV_SWITCH, "0")
    _call()
    monkeypatch.delenv(linear.WGRAD_ENV_SWITCH)
    monkeypatch.setattr(linear, "_wgrad_device", lambda t: None)  # a CPU tensor, no GPU faked
    _call()
    assert state["timed"] == [] and state["ran"] == ["torch"] * 3


def test_env_switch_values(monkeypatch):
    for value, on in [("0", False), ("false", False), ("OFF", False), ("no", False), ("1", True), ("", True)]:
        monkeypatch.setenv(linear.WGRAD_ENV_SWITCH, value)
        assert linear.wgrad_enabled() is on
    monkeypatch.delenv(linear.WGRAD_ENV_SWITCH)
    assert linear.wgrad_enabled()


# ------------------------------------------------------------------------------------------- GPU

GPU_CASES = [(50432 // 64, 2304, 768), (4100, 768, 3072), (197, 768, 768), (33, 40, 24), (1, 96, 64), (577, 72, 40)]


@pytest.mark.gpu
@pytest.mark.parametrize("M, N, K", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("contiguous", [True, False])
def test_gpu_fused_triton_and_cublaslt_bgradb(M, N, K, dtype, contiguous):
    """Both fused paths against torch.matmul(dy.t(), x) and dy.sum(0): the Triton kernel and csrc's
    linear_wgrad (cuBLASLt BGRADB; None only where cuBLASLt has no algorithm: then it must say so by
    returning None, never a wrong answer)."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    from fastvit import _ext
    from fastvit.ops import _cuda_backends

    cuda = torch.device("cuda")
    x = torch.randn(M, K, device=cuda).to(dtype)
    dy = torch.randn(M, N, device=cuda).to(dtype) if contiguous else torch.randn(N, M, device=cuda).to(dtype).t()
    ref_w, ref_b = _ref(dy, x)
    low_w, low_b = torch.matmul(dy.t(), x).double(), dy.sum(0).double()
    dw, db = linear.linear_wgrad(dy, x, True)
    assert_three_way(dw.double(), ref_w, low_w, factor=3.0, name="triton dweight")
    assert_three_way(db.double(), ref_b, low_b, factor=3.0, name="triton dbias")
    if _ext.available() and not _cuda_backends.cublaslt_reasons():
        out = _cuda_backends.linear_wgrad(dy, x, True)
        if dtype != torch.float32:
            assert out is not None, "cuBLASLt should have a BGRADB algorithm for 16-bit operands"
        if out is None:  # fp32 may be refused; then the reason is recorded
            assert any(key[:4] == (M, N, K, dtype) for key in _cuda_backends.BGRADB_REFUSED)
        else:
            assert out[0].dtype == dtype and out[1].dtype == dtype
            assert_three_way(out[0].double(), ref_w, low_w, factor=3.0, name="bgradb dweight")
            assert_close(out[1].float(), ref_b.float(), dtype, scale=max(1.0, M**0.5 / 8), name="bgradb dbias")


@pytest.mark.gpu
def test_gpu_dispatch_measures_and_runs_the_winner():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    dispatch.reset()
    dy = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    dw, db = linear.linear_wgrad_dispatch(dy, x, True)
    entry = [v for k, v in dispatch.measured_table().items() if k.startswith(linear.WGRAD_FAMILY + "|")]
    assert entry and set(entry[0]["times_ms"]) | set(entry[0]["refused"]) == {"torch", "fused"}
    assert_three_way(dw.double(), _ref(dy, x)[0], torch.matmul(dy.t(), x).double(), factor=3.0)


def test_info_lists_the_cached_wgrad_choices(fake_gpu, capsys):
    from fastvit import info

    _call()  # fused timed faster (the fixture's 1.0 ms against 2.0 ms)
    dispatch.reset()  # listed from the file
    info.main()
    out = capsys.readouterr().out
    assert f"  {KEY} -> fused  (fused 1.0000 ms, torch 2.0000 ms; " in out
    assert "linear fused wgrad (dW + dbias): on; measured choices 1 (fused 1, torch 0" in out
    assert info.collect()["linear_wgrad"]["choices"] == {KEY: "fused"}

"""fastvit.kernels.linear_tma: the persistent TMA GEMM, its reasons and the measured choice against the pointer GEMM.

Numerics run under the interpreter (Triton 3.9's interpreter emulates ``tl.make_tensor_descriptor``) in fp16
at small ragged shapes, every epilogue, against ``linear_ref`` within fastvit.testing's tolerances. bf16 is
not run there: the interpreter's ``create_dot`` multiplies bf16 operands as their raw uint16 bit patterns
(numpy has no bf16), wrong for any Triton dot, so bf16 rests on the compile report (sm_90a, wgmma + TMA, no
spills) and the ``gpu`` test. The choice logic runs on the CPU with an injected timer.
"""

from __future__ import annotations

import pytest
import torch

from fastvit.kernels import INTERPRET, linear, linear_tma
from fastvit.kernels._common import compile_target
from fastvit.ops.linear import linear_ref
from fastvit.testing import assert_close

interpreter = pytest.mark.skipif(
    not INTERPRET or not linear_tma.HAS_API,
    reason="runs the kernel on the CPU under TRITON_INTERPRET=1 (the gpu tests cover a GPU), with a Triton that has "
    "tl.make_tensor_descriptor (3.4+; on older ones test_missing_api_is_a_reason checks the refusal)",
)


def _inputs(m, n, k, dtype, bias, residual, device="cpu"):
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = (torch.randn(n, k, dtype=dtype, device=device) * k**-0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    r = torch.randn(m, n, dtype=dtype, device=device) if residual else None
    return x, w, b, r


@pytest.fixture(autouse=True)
def _fresh_choices():
    linear_tma.CHOICES.clear()
    linear_tma.MEASUREMENTS.clear()
    yield
    linear_tma.CHOICES.clear()
    linear_tma.MEASUREMENTS.clear()


# ------------------------------------------------------------------------------------- numerics


@interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True), (False, False)])
def test_matches_reference_every_epilogue(activation, bias, residual):
    # M, N, K ragged against the 32 x 32 x 32 interpreter tile: TMA's zero fill past M, N and K.
    x, w, b, r = _inputs(37, 45, 40, torch.float16, bias, residual)
    y = torch.empty(37, 45, dtype=torch.float16)
    linear_tma.linear_tma_fwd(x, w, b, r, activation, y)
    assert_close(y, linear_ref(x, w, b, activation, r, upcast=True), torch.float16)


@interpreter
@pytest.mark.interpreter
def test_persistent_programs_loop_over_several_tiles(monkeypatch):
    """Two programs for 3 x 3 tiles: each program computes several tiles (the persistent loop)."""
    monkeypatch.setattr(linear_tma, "_sm_count", lambda t: 2)
    launches = []
    original = linear_tma._tma_fixed.run

    def spy(*args, grid, **kwargs):
        launches.append(grid(kwargs) if callable(grid) else grid)
        return original(*args, grid=grid, **kwargs)

    monkeypatch.setattr(linear_tma._tma_fixed, "run", spy)
    x, w, b, r = _inputs(70, 90, 64, torch.float16, True, True)
    y = torch.empty(70, 90, dtype=torch.float16)
    linear_tma.linear_tma_fwd(x, w, b, r, "gelu", y)
    assert launches == [(2,)]
    assert_close(y, linear_ref(x, w, b, "gelu", r, upcast=True), torch.float16)


@interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("block_m,block_n,splits", [(64, 64, 2), (64, 128, 4)])
def test_epilogue_sub_tiles(block_m, block_n, splits, monkeypatch):
    """The column-split epilogue (tl.split halves / quarters, as the pointer kernel's) at one warp."""
    config = linear_tma._config(block_m, block_n, 32, 1, 1, group_m=2)
    args = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 1}
    assert linear._epilogue_split({**args, "ACT_GRAD": False}) == splits
    monkeypatch.setattr(linear_tma, "_INTERPRET_CONFIG", config)
    kernel, seen = linear_tma._tma_fixed.fn, []
    original = kernel.run

    def spy(*a, **kw):
        seen.append(kw.get("EPILOGUE_SPLIT"))
        return original(*a, **kw)

    monkeypatch.setattr(kernel, "run", spy)
    x, w, b, r = _inputs(block_m + 3, block_n + 5, 48, torch.float16, True, True)
    y = torch.empty(block_m + 3, block_n + 5, dtype=torch.float16)
    linear_tma.linear_tma_fwd(x, w, b, r, "gelu_tanh", y)
    assert seen == [splits]  # the launch took the split path asked for
    assert_close(y, linear_ref(x, w, b, "gelu_tanh", r, upcast=True), torch.float16)


@interpreter
@pytest.mark.interpreter
def test_strided_views_and_the_pointer_kernel_agree():
    """x a row-strided (aligned) slice of a wider buffer, a transposed residual, y a slice too: the same
    result as the pointer kernel's forward."""
    wide = torch.randn(33, 64, dtype=torch.float16)
    x = wide[:, :40]  # row stride 128 bytes: TMA-legal
    w = torch.randn(24, 40, dtype=torch.float16) * 0.2
    b = torch.randn(24, dtype=torch.float16)
    r = torch.randn(24, 33, dtype=torch.float16).t()
    out_wide = torch.zeros(33, 32, dtype=torch.float16)
    y = out_wide[:, :24]
    assert not linear_tma.reasons(x, w, b, r, y)
    linear_tma.linear_tma_fwd(x, w, b, r, "quick_gelu", y)
    ref = torch.empty(33, 24, dtype=torch.float16)
    linear._launch(x, w, b, r, ref, None, "quick_gelu", act_grad=False)
    assert_close(y, ref, torch.float16)
    assert (out_wide[:, 24:] == 0).all(), "the store wrote past N into the row's padding"


# -------------------------------------------------------------------------------------- reasons


def test_reasons_name_each_problem():
    x, w = torch.randn(8, 32, dtype=torch.float16), torch.randn(16, 32, dtype=torch.float16)
    assert "float16 / bfloat16" in " ".join(linear_tma.reasons(x.float(), w.float()))
    assert "cast them to one dtype" in " ".join(linear_tma.reasons(x, w.to(torch.bfloat16)))
    assert "last stride" in " ".join(linear_tma.reasons(torch.randn(32, 8, dtype=torch.float16).t(), w))
    odd = torch.randn(8, 33, dtype=torch.float16)[:, :32]  # row stride 66 bytes
    assert "multiple of 16" in " ".join(linear_tma.reasons(odd, w))
    shifted = torch.randn(8, 40, dtype=torch.float16)[:, 1:33]  # row stride 80 bytes, pointer + 2 bytes
    assert "16-byte aligned" in " ".join(linear_tma.reasons(shifted, w))
    assert "features" in " ".join(linear_tma.reasons(x, torch.randn(16, 24, dtype=torch.float16)))
    empty = torch.randn(8, 0, dtype=torch.float16)
    assert "K is 0" in " ".join(linear_tma.reasons(empty, torch.randn(16, 0, dtype=torch.float16)))
    if linear_tma.HAS_API:
        assert (linear_tma.reasons(x, w) == []) is INTERPRET  # a CPU tensor runs only under the interpreter


def test_missing_api_is_a_reason(monkeypatch):
    monkeypatch.setattr(linear_tma, "HAS_API", False)
    x, w = torch.randn(8, 32, dtype=torch.float16), torch.randn(16, 32, dtype=torch.float16)
    assert any("no tl.make_tensor_descriptor" in m for m in linear_tma.reasons(x, w))
    with pytest.raises(ValueError, match="no tl.make_tensor_descriptor"):
        linear_tma.linear_tma_fwd(x, w, None, None, None, torch.empty(8, 16, dtype=torch.float16))


@pytest.mark.skipif(not linear_tma.HAS_API, reason="this Triton has no tensor descriptors (a reason on every target)")
def test_reasons_by_target_on_meta_tensors():
    x = torch.empty(50432, 768, dtype=torch.bfloat16, device="meta")
    w = torch.empty(2304, 768, dtype=torch.bfloat16, device="meta")
    with compile_target(90):
        assert linear_tma.reasons(x, w) == []
    with compile_target(80):
        assert any("sm_80 has no TMA" in m for m in linear_tma.reasons(x, w))


def test_launcher_refuses_with_the_reasons():
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    with pytest.raises(ValueError, match="x is torch.float32; the TMA kernel takes float16"):
        linear_tma.linear_tma_fwd(x, w, None, None, None, torch.empty(8, 16))
    x, w = x.half(), w.half()
    with pytest.raises(ValueError, match="activation 'relu'"):
        linear_tma.linear_tma_fwd(x, w, None, None, "relu", torch.empty(8, 16, dtype=torch.float16))


# ------------------------------------------------------------------------------ measured choice


def _fake_timer(times):
    calls = []

    def timer(fn):
        calls.append(fn)
        fn()
        return times[len(calls) - 1]

    return timer, calls


@pytest.mark.parametrize(
    "pointer_ms,tma_ms,expected", [(2.0, 1.0, "tma"), (1.0, 2.0, "pointer"), (1.0, 1.0, "pointer")]
)
def test_choose_keeps_the_faster_and_remembers_it(pointer_ms, tma_ms, expected):
    launched = []
    candidates = {"pointer": lambda: launched.append("pointer"), "tma": lambda: launched.append("tma")}
    timer, calls = _fake_timer([pointer_ms, tma_ms])
    assert linear_tma.choose(("k",), candidates, timer) == expected
    # Each candidate launched once (its autotune) before either is timed, then timed once.
    assert launched == ["pointer", "tma", "pointer", "tma"] and len(calls) == 2
    assert linear_tma.MEASUREMENTS == [(("k",), {"pointer": pointer_ms, "tma": tma_ms})]
    assert linear_tma.choose(("k",), candidates, timer) == expected  # remembered: nothing launched or timed
    assert len(launched) == 4 and len(calls) == 2


def _dispatch_inputs():
    x, w, b, r = _inputs(40, 48, 32, torch.float16, True, True)
    return x, w, b, r, torch.empty(40, 48, dtype=torch.float16)


def _pointer_for(x, w, b, r, activation):
    def pointer(out):
        linear._launch(x, w, b, r, out, None, activation, act_grad=False)

    return pointer


@interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("tma_faster", [True, False])
def test_dispatch_measures_once_and_runs_the_winner(tma_faster, monkeypatch):
    """The dispatch end to end under the interpreter (the CPU tensor passed off as a GPU one): both kernels
    timed into a scratch output, y written once by the winner, the key remembered."""
    monkeypatch.setattr(linear_tma, "_on_gpu", lambda t: True)
    x, w, b, r, y = _dispatch_inputs()
    timer, calls = _fake_timer([2.0, 1.0] if tma_faster else [1.0, 2.0])
    used = linear_tma.linear_fwd_dispatch(x, w, b, r, "gelu", y, _pointer_for(x, w, b, r, "gelu"), timer)
    assert used is tma_faster and len(calls) == 2
    key = (x.device.index, 40, 48, 32, torch.float16, "gelu", True, True)
    assert linear_tma.CHOICES == {key: "tma" if tma_faster else "pointer"}
    if tma_faster:
        assert_close(y, linear_ref(x, w, b, "gelu", r, upcast=True), torch.float16)
    assert linear_tma.linear_fwd_dispatch(x, w, b, r, "gelu", y, _pointer_for(x, w, b, r, "gelu"), timer) is tma_faster
    assert len(calls) == 2  # no second measurement


@pytest.mark.parametrize("blocker", ["capture", "compile", "switch", "reasons", "cpu"])
def test_dispatch_falls_back_without_measuring(blocker, monkeypatch):
    monkeypatch.setattr(linear_tma, "_on_gpu", lambda t: blocker != "cpu")
    if blocker == "capture":
        monkeypatch.setattr(linear_tma, "graph_capturing", lambda t: True)
    elif blocker == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif blocker == "switch":
        monkeypatch.setenv(linear_tma.ENV_SWITCH, "0")
    x, w, b, r, y = _dispatch_inputs()
    if blocker == "reasons":
        x = torch.randn(40, 33, dtype=torch.float16)[:, :32]  # row stride 66 bytes
    timer, calls = _fake_timer([1.0, 1.0])
    assert linear_tma.linear_fwd_dispatch(x, w, b, r, None, y, lambda out: None, timer) is False
    assert calls == [] and linear_tma.CHOICES == {}


def test_env_switch_values(monkeypatch):
    for value, on in [("0", False), ("off", False), ("false", False), ("1", True), ("", True)]:
        monkeypatch.setenv(linear_tma.ENV_SWITCH, value)
        assert linear_tma.enabled() is on, value


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tma_kernel_and_dispatch(dtype):
    if not torch.cuda.is_available():  # the gpu marker skips it first; here for direct runs
        pytest.skip("needs an NVIDIA GPU")
    x, w, b, r = _inputs(1000, 768, 768, dtype, True, True, device="cuda")
    expected = linear_ref(x, w, b, "gelu", r, upcast=True)
    if torch.cuda.get_device_capability() < (9, 0):
        assert linear_tma.reasons(x, w, b, r)  # sm_80: the pointer kernel serves it
    else:
        y = torch.empty(1000, 768, dtype=dtype, device="cuda")
        linear_tma.linear_tma_fwd(x, w, b, r, "gelu", y)
        assert_close(y, expected, dtype)
    y = torch.empty(1000, 768, dtype=dtype, device="cuda")
    linear.linear_fwd(x, w, b, r, "gelu", y)  # measured dispatch, then the winner
    assert_close(y, expected, dtype)

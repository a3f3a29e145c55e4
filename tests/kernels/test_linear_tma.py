"""fastvit.kernels.linear_tma: the persistent TMA GEMM, its reasons and the measured choice against the pointer GEMM.

Numerics run under the interpreter (Triton 3.9's interpreter emulates ``tl.make_tensor_descriptor``) in fp16
at small ragged shapes, every epilogue, against ``linear_ref`` within fastvit.testing's tolerances. bf16 is
not run there: the interpreter's ``create_dot`` multiplies bf16 operands as their raw uint16 bit patterns
(numpy has no bf16), wrong for any Triton dot, so bf16 rests on the compile report (sm_90a, wgmma + TMA, no
spills) and the ``gpu`` test. The choice (measured dispatch, its cache file) runs on the CPU with a faked GPU
and an injected timer.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastvit import info
from fastvit.kernels import INTERPRET, linear, linear_tma
from fastvit.kernels._common import compile_target
from fastvit.ops import dispatch
from fastvit.ops.linear import linear_ref
from fastvit.testing import assert_close
from tests._fake_gpu import fake_sm90

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
    yield
    linear_tma.CHOICES.clear()


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
#
# The choice goes through fastvit.ops.dispatch's measured dispatch: a GPU faked as test_dispatch.py fakes
# one ("Fake H100", sm_90; the CPU tensor passed off as a CUDA one by linear_tma._gpu_device), the cache
# file under tmp_path, and a timer injected with dispatch.set_timer that runs the candidate and answers
# the configured ms for whichever kernel ran.

KEY = "linear_tma|Fake H100 sm_90|float16|M=40|N=48|K=32|act=gelu|bias=True|residual=True"


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    fake_sm90(monkeypatch, tmp_path, linear_tma, "_gpu_device", linear_tma.ENV_SWITCH)
    state = {"ms": {"pointer": 2.0, "tma": 1.0}, "timed": [], "raise": {}, "writes": []}
    state["path"] = tmp_path / "dispatch.json"

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


@pytest.fixture
def fake_kernels(fake_gpu, monkeypatch):
    """Both kernels replaced by recorders (which kernel wrote which tensor): the choice logic without the
    interpreter. linear_tma.reasons() answers as on an sm_90 GPU with aligned fp16 operands."""
    state = fake_gpu

    def launch(kernel, out):
        if kernel in state["raise"]:
            raise state["raise"][kernel]
        state["last"] = kernel
        state["writes"].append((kernel, out))

    monkeypatch.setattr(linear_tma, "reasons", lambda *a, **k: [])
    monkeypatch.setattr(linear_tma, "linear_tma_fwd", lambda x, w, b, r, act, out, checked=False: launch("tma", out))
    state["pointer"] = lambda out: launch("pointer", out)
    return state


def _call(state, inputs=None, activation="gelu"):
    x, w, b, r, y = inputs or _dispatch_inputs()
    used = linear_tma.linear_fwd_dispatch(x, w, b, r, activation, y, state["pointer"])
    return used, y


def _dispatch_inputs():
    x, w, b, r = _inputs(40, 48, 32, torch.float16, True, True)
    return x, w, b, r, torch.empty(40, 48, dtype=torch.float16)


@pytest.mark.parametrize(
    "pointer_ms,tma_ms,expected", [(2.0, 1.0, "tma"), (1.0, 2.0, "pointer"), (1.0, 1.0, "pointer")]
)
def test_measured_choice_keeps_the_faster_and_never_changes(fake_kernels, pointer_ms, tma_ms, expected):
    state = fake_kernels
    state["ms"].update(pointer=pointer_ms, tma=tma_ms)
    used, y = _call(state)
    assert used is (expected == "tma")
    assert state["timed"] == ["pointer", "tma"]  # both timed once, the pointer kernel first (ties keep it)
    assert all(out is not y for _, out in state["writes"][:2]), "a trial wrote the caller's output"
    assert state["writes"][2:] == ([("tma", y)] if expected == "tma" else [])  # the winner writes y once
    entry = dispatch.measured_table()[KEY]
    assert entry["backend"] == expected and entry["refused"] == {}
    assert entry["times_ms"] == {"pointer": pointer_ms, "tma": tma_ms}
    assert linear_tma.CHOICES == {(0, 40, 48, 32, torch.float16, "gelu", True, True): expected}
    state["ms"].update(pointer=9.0, tma=9.0 if expected == "tma" else 0.1)  # later speeds change nothing
    assert _call(state)[0] is (expected == "tma") and len(state["timed"]) == 2
    # Another epilogue is another key: measured on its own.
    _call(state, activation=None)
    assert len(state["timed"]) == 4 and KEY.replace("act=gelu", "act=None") in dispatch.measured_table()


def test_choice_persists_across_reset_read_back_from_the_file(fake_kernels):
    state = fake_kernels
    assert _call(state)[0] is True
    data = json.loads(state["path"].read_text())
    assert data["format"] == dispatch.CACHE_FORMAT and data["versions"] == dispatch.cache_versions()
    assert data["entries"][KEY]["backend"] == "tma" and data["entries"][KEY]["times_ms"] == {"pointer": 2.0, "tma": 1.0}
    dispatch.reset()  # as a new process: nothing in memory, the file answers
    assert linear_tma.CHOICES == {} and dispatch.measured_table() == {KEY: data["entries"][KEY]}
    state["ms"].update(pointer=0.1)
    state["timed"].clear()
    assert _call(state)[0] is True and state["timed"] == []
    # A corrupt entry (a choice that is neither kernel) is measured again, not trusted.
    data["entries"][KEY]["backend"] = "cublas"
    state["path"].write_text(json.dumps(data))
    dispatch.reset()
    assert _call(state)[0] is False and state["timed"] == ["pointer", "tma"]
    assert json.loads(state["path"].read_text())["entries"][KEY]["backend"] == "pointer"


def test_cache_is_shared_with_the_ops_measured_entries(fake_kernels):
    """The TMA entries are merged into the one file beside the ops' (merge under the lock, not overwrite)."""
    state = fake_kernels
    dispatch._persist("layer_norm|Fake H100 sm_90|float16|x|fwd", {"backend": "triton", "times_ms": {}, "refused": {}})
    assert _call(state)[0] is True
    entries = json.loads(state["path"].read_text())["entries"]
    assert sorted(entries) == sorted([KEY, "layer_norm|Fake H100 sm_90|float16|x|fwd"])


def test_static_mode_never_times_and_runs_the_pointer_kernel(fake_kernels, monkeypatch):
    state = fake_kernels
    monkeypatch.setenv(dispatch.MODE_ENV, "static")
    assert _call(state)[0] is False
    assert state["timed"] == [] and state["writes"] == [] and dispatch.measured_table() == {}
    monkeypatch.delenv(dispatch.MODE_ENV)
    assert _call(state)[0] is True  # measured: TMA wins
    with dispatch.dispatch_mode("static"):  # static wins over a made (and cached) choice
        assert _call(state)[0] is False
    assert len(state["timed"]) == 2
    monkeypatch.setenv(dispatch.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="unknown FASTVIT_DISPATCH='fastest'"):
        _call(state)


def test_a_kernel_that_raises_while_timed_is_refused_with_the_reason(fake_kernels):
    state = fake_kernels
    state["raise"]["tma"] = RuntimeError("Triton Error [CUDA]: an illegal memory access\nsecond line")
    assert _call(state)[0] is False
    entry = dispatch.measured_table()[KEY]
    assert entry["backend"] == "pointer" and entry["times_ms"] == {"pointer": 2.0}
    assert entry["refused"] == {"tma": "RuntimeError: Triton Error [CUDA]: an illegal memory access"}
    assert json.loads(state["path"].read_text())["entries"][KEY] == entry  # persisted, refusal included
    assert "tma refused: RuntimeError" in "\n".join(dispatch.format_cache(dispatch.describe_cache()))
    state["raise"].clear()
    assert _call(state)[0] is False and state["timed"] == ["pointer"]  # stable: not re-timed


def test_both_kernels_raising_leaves_the_pointer_kernel_to_raise_for_real(fake_kernels):
    state = fake_kernels
    state["raise"].update(tma=RuntimeError("tma broke"), pointer=RuntimeError("pointer broke"))
    assert _call(state)[0] is False  # linear_fwd then launches the pointer kernel, which raises its own error
    assert dispatch.measured_table()[KEY]["refused"] == {"pointer": "RuntimeError: pointer broke",
                                                         "tma": "RuntimeError: tma broke"}  # fmt: skip
    assert not state["path"].exists(), "nothing was timed: nothing is written"


def test_measured_entry_needs_candidates(fake_gpu):
    with pytest.raises(ValueError, match="no candidates"):
        dispatch.measured_entry("linear_tma", "sig", {}, torch.device("cuda", 0))


def test_switch_off_never_times_nor_runs_tma_even_when_cached(fake_kernels, monkeypatch):
    state = fake_kernels
    monkeypatch.setenv(linear_tma.ENV_SWITCH, "0")
    assert _call(state)[0] is False and state["timed"] == [] and dispatch.measured_table() == {}
    monkeypatch.delenv(linear_tma.ENV_SWITCH)
    assert _call(state)[0] is True  # measured and cached: TMA
    monkeypatch.setenv(linear_tma.ENV_SWITCH, "off")  # read at each call
    assert _call(state)[0] is False and len(state["writes"]) == 3  # two trials and one real TMA launch


def test_capture_uses_the_cached_choice_and_never_times(fake_kernels, monkeypatch):
    state = fake_kernels
    monkeypatch.setattr(linear_tma, "graph_capturing", lambda t: True)
    assert _call(state)[0] is False and state["timed"] == [] and linear_tma.CHOICES == {}
    monkeypatch.setattr(linear_tma, "graph_capturing", lambda t: False)
    assert _call(state)[0] is True
    dispatch.reset()  # a new process that captures first: the file's choice, no trial launch
    monkeypatch.setattr(linear_tma, "graph_capturing", lambda t: True)
    state["writes"].clear()
    x, w, b, r, y = _dispatch_inputs()
    assert linear_tma.linear_fwd_dispatch(x, w, b, r, "gelu", y, state["pointer"]) is True
    assert len(state["timed"]) == 2 and state["writes"] == [("tma", y)]


def test_info_lists_the_cached_tma_choices(fake_kernels, capsys):
    state = fake_kernels
    assert _call(state)[0] is True
    dispatch.reset()  # listed from the file
    info.main()
    out = capsys.readouterr().out
    assert f"  {KEY} -> tma  (pointer 2.0000 ms, tma 1.0000 ms; " in out
    assert "linear TMA GEMM: API " in out and "measured choices 1 (tma 1, pointer 0" in out
    assert info.collect()["linear_tma"]["choices"] == {KEY: "tma"}


def _pointer_for(x, w, b, r, activation):
    def pointer(out):
        linear._launch(x, w, b, r, out, None, activation, act_grad=False)

    return pointer


@interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("tma_faster", [True, False])
def test_dispatch_end_to_end_runs_the_winner(fake_gpu, tma_faster, monkeypatch):
    """Both real kernels under the interpreter (the CPU tensor passed off as a GPU one): each timed into a
    scratch output by the injected timer, y written by the winner, the key remembered."""
    state = fake_gpu
    original = linear_tma.linear_tma_fwd

    def tma_launch(*args, **kwargs):
        state["last"] = "tma"
        return original(*args, **kwargs)

    monkeypatch.setattr(linear_tma, "linear_tma_fwd", tma_launch)
    state["ms"].update(pointer=2.0 if tma_faster else 1.0, tma=1.0 if tma_faster else 2.0)
    x, w, b, r, y = _dispatch_inputs()
    y.fill_(float("nan"))
    pointer = _pointer_for(x, w, b, r, "gelu")

    def timed_pointer(out):
        state["last"] = "pointer"
        pointer(out)

    used = linear_tma.linear_fwd_dispatch(x, w, b, r, "gelu", y, timed_pointer)
    assert used is tma_faster and state["timed"] == ["pointer", "tma"]
    if tma_faster:
        assert_close(y, linear_ref(x, w, b, "gelu", r, upcast=True), torch.float16)
    else:
        assert torch.isnan(y).all(), "the trials wrote y; the caller launches the pointer kernel into it"
    assert dispatch.measured_table()[KEY]["backend"] == ("tma" if tma_faster else "pointer")


@pytest.mark.parametrize("blocker", ["capture", "compile", "switch", "reasons", "cpu", "static"])
def test_dispatch_falls_back_without_measuring(fake_gpu, blocker, monkeypatch):
    state = fake_gpu
    if blocker == "cpu":
        monkeypatch.setattr(linear_tma, "_gpu_device", lambda t: None)
    elif blocker == "capture":
        monkeypatch.setattr(linear_tma, "graph_capturing", lambda t: True)
    elif blocker == "compile":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif blocker == "switch":
        monkeypatch.setenv(linear_tma.ENV_SWITCH, "0")
    elif blocker == "static":
        monkeypatch.setenv(dispatch.MODE_ENV, "static")
    x, w, b, r, y = _dispatch_inputs()
    if blocker == "reasons":
        x = torch.randn(40, 33, dtype=torch.float16)[:, :32]  # row stride 66 bytes
    launched = []
    assert linear_tma.linear_fwd_dispatch(x, w, b, r, None, y, launched.append) is False
    assert launched == [] and state["timed"] == [] and linear_tma.CHOICES == {}
    assert dispatch.measured_table() == {} and not state["path"].exists()


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

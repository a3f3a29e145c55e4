"""fastvit._C's soft_split, patch_embed and linear kernels (csrc/) and their launchers
(fastvit/ops/_cuda_backends.py).

Without a GPU: the module carries the entry points, argument errors are ValueErrors raised before any
device check, a call with valid arguments is a RuntimeError saying there is no usable CUDA device, and
cuBLASLt is loaded with dlopen (from the nvidia wheel torch installs) or refused with an error naming
every place searched. With a GPU (marked ``gpu``): every launcher against the op's reference (three-way
rule for the GEMMs, the tolerance table for the gather + LayerNorm), outputs and gradients, on ragged
shapes, layouts and all three dtypes, plus one compute-sanitizer memcheck run of each kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastvit import _ext
from fastvit.ops import _cuda_backends as cuda
from fastvit.ops._library import new_output
from fastvit.ops.linear import _activate, linear_ref
from fastvit.ops.patch_embed import patch_embed_ref
from fastvit.ops.soft_split import _geometry, soft_split_ref
from fastvit.testing import GRAD_TOLERANCE_SCALE, assert_close, assert_three_way, poisoned_outputs
from tests.conftest import HAS_GPU

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_ENTRY_POINTS = (
    "soft_split_fwd", "soft_split_bwd", "patch_embed_fwd", "patch_embed_bwd", "linear_fwd",
    "linear_act_grad", "load_cublaslt", "cublaslt_status", "set_cublaslt_search_dirs",
)  # fmt: skip


def _extension():
    if not _ext.available():
        pytest.skip(f"fastvit._C is not built here: {_ext.load_error()}")
    return _ext.module()


def _has_cublaslt_header() -> bool:
    return "not found" not in _ext.build_info().get("cublaslt_header", "not found")


# ------------------------------------------------------------------------------ valid dummy arguments
# Non-null fake pointers: the calls below must fail on validation or on the device check, never launch.


def _soft_split_fwd_args(**overrides):
    args = dict(x=1, norm_weight=0, norm_bias=0, y=1, mean=0, rstd=0, shape=(1, 3, 8, 8), strides=(192, 64, 8, 1),
                kernel=(2, 2, 2, 2, 0, 0), eps=1e-5, x_dtype=0, w_dtype=0, stream=0)  # fmt: skip
    args.update(overrides)
    return args


def _soft_split_bwd_args(**overrides):
    args = dict(dy=1, x=1, norm_weight=0, mean=0, rstd=0, row_coefs=0, dx=1, dweight_partial=0, dbias_partial=0,
                shape=(1, 3, 8, 8), strides=(192, 64, 8, 1), kernel=(2, 2, 2, 2, 0, 0), dx_strides=(192, 64, 8, 1),
                num_partials=1, x_dtype=0, w_dtype=0, stream=0)  # fmt: skip
    args.update(overrides)
    return args


def _patch_embed_fwd_args(**overrides):
    args = dict(x=1, weight=1, bias=0, pos_embed=0, prefix=0, cols=1, out=1, shape=(2, 3, 32, 32),
                strides=(3072, 1024, 32, 1), patch=16, embed_dim=64, num_prefix=0, pos_rows=0, dtype=1,
                allow_tf32=False, workspace=1, workspace_bytes=1 << 20, stream=0)  # fmt: skip
    args.update(overrides)
    return args


def _patch_embed_bwd_args(**overrides):
    args = dict(dout=1, x=1, weight=1, cols=1, dx=1, dweight=1, shape=(2, 3, 32, 32), strides=(3072, 1024, 32, 1),
                dx_strides=(3072, 1024, 32, 1), patch=16, embed_dim=64, dout_stride=64, dtype=1, allow_tf32=False,
                workspace=1, workspace_bytes=1 << 20, stream=0)  # fmt: skip
    args.update(overrides)
    return args


def _linear_fwd_args(**overrides):
    args = dict(x=1, weight=1, bias=1, residual=0, y=1, m=4, n=8, k=16, x_stride=16, weight_stride=16,
                residual_stride=0, y_stride=8, activation=1, dtype=1, allow_tf32=False, workspace=1,
                workspace_bytes=1 << 20, stream=0)  # fmt: skip
    args.update(overrides)
    return args


def _linear_grad_args(**overrides):
    args = dict(dy=1, x=1, weight=1, bias=1, g=1, dbias_partial=1, m=4, n=8, k=16, dy_stride=8, x_stride=16,
                weight_stride=16, g_stride=8, num_partials=2, activation=1, dtype=1, allow_tf32=False, workspace=1,
                workspace_bytes=1 << 20, stream=0)  # fmt: skip
    args.update(overrides)
    return args


CALLS = {
    "soft_split_fwd": _soft_split_fwd_args,
    "soft_split_bwd": _soft_split_bwd_args,
    "patch_embed_fwd": _patch_embed_fwd_args,
    "patch_embed_bwd": _patch_embed_bwd_args,
    "linear_fwd": _linear_fwd_args,
    "linear_act_grad": _linear_grad_args,
}


# ---------------------------------------------------------------------------------------------- CPU


def test_module_has_the_kernels():
    C = _extension()
    missing = [name for name in KERNEL_ENTRY_POINTS if not hasattr(C, name)]
    assert not missing, f"fastvit._C lacks {missing}; rebuild with `pip install -e .`"
    assert "cublaslt_header" in _ext.build_info(), "the build record must say where cublasLt.h came from"


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error path; this machine has a GPU")
@pytest.mark.parametrize("name", sorted(CALLS))
def test_call_without_gpu_is_a_clear_error(name):
    C = _extension()
    with pytest.raises(RuntimeError, match=rf"fastvit\._C\.{name}: no usable CUDA device.*use backend='torch'"):
        getattr(C, name)(**CALLS[name]())


VALIDATION_CASES = [
    ("soft_split_fwd", dict(x_dtype=5), "x dtype: unsupported dtype code 5"),
    ("soft_split_fwd", dict(norm_weight=1, w_dtype=1), r"norm weight dtype float16 must be the input dtype"),
    ("soft_split_fwd", dict(kernel=(9, 9, 1, 1, 0, 0)), "kernel is larger than the padded input"),
    ("soft_split_fwd", dict(kernel=(3, 3, 0, 1, 1, 1)), "kernel and stride must be > 0"),
    ("soft_split_fwd", dict(shape=(1, 300, 8, 8), kernel=(7, 7, 1, 1, 3, 3)), "14700 features exceeds"),
    ("soft_split_fwd", dict(norm_weight=1), "a LayerNorm needs mean and rstd buffers"),
    ("soft_split_fwd", dict(y=0), "x and y must be non-null"),
    ("soft_split_bwd", dict(norm_weight=1), "a LayerNorm needs mean, rstd and row_coefs"),
    ("soft_split_bwd", dict(dweight_partial=1), "partials need a LayerNorm"),
    ("patch_embed_fwd", dict(pos_embed=1, pos_rows=5), r"pos_rows must be N = 4 or P \+ N = 4"),
    ("patch_embed_fwd", dict(num_prefix=1), "num_prefix must be > 0 exactly when a prefix pointer is given"),
    ("patch_embed_fwd", dict(shape=(2, 3, 0, 32)), "C, H, W > 0"),
    ("patch_embed_fwd", dict(dtype=3), "dtype: unsupported dtype code 3"),
    ("patch_embed_bwd", dict(dout_stride=32), "dout_stride must be >= embed_dim"),
    ("patch_embed_bwd", dict(cols=0), "must be non-null device pointers"),
    ("linear_fwd", dict(activation=7), "unknown activation code 7"),
    ("linear_fwd", dict(k=0), "K > 0"),
    ("linear_fwd", dict(x_stride=8), "row strides of x and weight must be >= K"),
    ("linear_fwd", dict(m=1 << 31), "32-bit matrix sizes"),
    ("linear_act_grad", dict(activation=0), "needs an activation"),
    ("linear_act_grad", dict(num_partials=0), "num_partials must be > 0"),
]


@pytest.mark.parametrize("name,overrides,message", VALIDATION_CASES)
def test_arguments_are_validated_before_the_device_check(name, overrides, message):
    C = _extension()
    with pytest.raises(ValueError, match=message):
        getattr(C, name)(**CALLS[name](**overrides))


def test_cublaslt_loads_without_a_gpu():
    """dlopen + dlsym of the library the build's header belongs to; no GPU is needed to load it."""
    C = _extension()
    if not _has_cublaslt_header():
        with pytest.raises(RuntimeError, match="has no cuBLASLt support: cublasLt.h was not found"):
            C.load_cublaslt()
        return
    major = _ext.build_info()["cublaslt_header"].split("libcublasLt.so.")[1].split()[0]
    candidates = [d for d in cuda.cublaslt_search_dirs() if os.path.exists(os.path.join(d, f"libcublasLt.so.{major}"))]
    if not candidates:
        pytest.skip(f"no libcublasLt.so.{major} in {cuda.cublaslt_search_dirs()} on this machine")
    assert cuda.cublaslt_reasons() == []
    status = C.cublaslt_status()
    assert status.startswith("loaded ") and f"libcublasLt.so.{major}" in status, status


def test_cublaslt_missing_is_a_clear_error_and_the_module_still_imports(tmp_path):
    """A process without torch (so no copy of cuBLASLt already loaded) that cannot find the library:
    fastvit._C imports, its other entry points work, and loading cuBLASLt names every place it looked."""
    _extension()
    if not _has_cublaslt_header():
        pytest.skip("this build has no cuBLASLt support to load (cublasLt.h was not found at build time)")
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_C", {_ext.module().__file__!r})
        C = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(C)
        assert "torch" not in sys.modules
        print("device:", C.device_status())
        C.set_cublaslt_search_dirs([{str(tmp_path)!r}])
        try:
            print("loaded:", C.load_cublaslt())
        except RuntimeError as exc:
            print("error:", exc)
            print("status:", C.cublaslt_status())
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH")}
    env["CUDA_HOME"] = str(tmp_path / "no-cuda")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    if "loaded:" in out.stdout:
        pytest.skip(f"libcublasLt is on this machine's loader path ({out.stdout.strip()}): cannot make it missing")
    assert "device:" in out.stdout
    error = out.stdout.split("error:", 1)[1]
    assert "could not load libcublasLt.so." in error and str(tmp_path) in error, error
    assert "no-cuda/lib64" in error and "/usr/local/cuda/lib64" in error and "use backend='triton'" in error, error
    assert "status: load failed" in out.stdout


def test_search_dirs_setter_puts_user_dirs_first(tmp_path):
    before = cuda.cublaslt_search_dirs()
    try:
        cuda.set_cublaslt_search_dirs([tmp_path])
        assert cuda.cublaslt_search_dirs()[0] == str(tmp_path)
        assert cuda.cublaslt_search_dirs()[1:] == before
    finally:
        cuda.set_cublaslt_search_dirs([])
    assert cuda.cublaslt_search_dirs() == before
    assert before[-1].endswith(os.path.join("torch", "lib"))


def test_launcher_reasons():
    assert cuda.soft_split_reasons(channels=64, window=9) == []
    (reason,) = cuda.soft_split_reasons(channels=300, window=49)
    assert "14700 features exceeds" in reason
    x64 = torch.randn(2, 8, dtype=torch.float64)
    w64 = torch.randn(4, 8, dtype=torch.float64)
    assert any("float64 is not supported" in r for r in cuda.linear_reasons(x64, w64))
    if _ext.available():
        assert cuda.ACTIVATION_CODES == {None: 0, "": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}


def test_codes_are_read_from_the_extension():
    """fastvit._ext.DTYPE_CODES and _cuda_backends.ACTIVATION_CODES come from fastvit._C's own tables: a
    stand-in extension with other codes changes them (no Python copy of the C++ enums is left)."""
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('fastvit._C')\n"
        "fake.DTYPE_CODES = {'float32': 10, 'float16': 11, 'bfloat16': 12}\n"
        "fake.ACTIVATION_CODES = {'none': 20, 'gelu': 21, 'gelu_tanh': 22, 'quick_gelu': 23}\n"
        "sys.modules['fastvit._C'] = fake\n"
        "import torch\n"
        "from fastvit import _ext\n"
        "from fastvit.ops import _cuda_backends as cuda\n"
        "assert _ext.DTYPE_CODES == {torch.float32: 10, torch.float16: 11, torch.bfloat16: 12}, _ext.DTYPE_CODES\n"
        "assert _ext.dtype_code(torch.ones(1, dtype=torch.bfloat16)) == 12\n"
        "want = {None: 20, '': 20, 'gelu': 21, 'gelu_tanh': 22, 'quick_gelu': 23}\n"
        "assert cuda.ACTIVATION_CODES == want, cuda.ACTIVATION_CODES\n"
        "del fake.DTYPE_CODES\n"
        "import importlib\n"
        "importlib.reload(_ext)\n"
        "assert not _ext.available() and 'predates the DTYPE_CODES table' in _ext.load_error(), _ext.load_error()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for path in ("fastvit/_ext.py", "fastvit/ops/_cuda_backends.py"):
        with open(os.path.join(REPO, path)) as f:
            assert "must match" not in f.read().lower(), f"{path} still keeps a copy of a C++ code table"


_BY_NAME_CASES = {
    "in order": ("", None),
    "two strides swapped": (".y_stride = 8, .x_stride = 8", "designator order"),
    "a field missing": ("", "missing initializer"),
}


@pytest.mark.parametrize("case", sorted(_BY_NAME_CASES))
def test_args_structs_are_bound_by_name(case, tmp_path):
    """csrc/bindings.cpp builds every Args struct with designated initializers, compiled as C++20 with
    -Werror=missing-field-initializers (CMakeLists.txt): swapped or missing fields do not compile."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH to compile the by-name check with")
    with open(os.path.join(REPO, "csrc", "bindings.cpp")) as f:
        bindings = f.read()
    structs = re.findall(r"(\w+Args) a\{(.)", bindings)
    assert len(structs) == 8 and all(first == "." for _, first in structs), structs
    strides = {
        "in order": ".x_stride = 8, .residual_stride = 0, .y_stride = 8",
        "two strides swapped": ".y_stride = 8, .residual_stride = 0, .x_stride = 8",
        "a field missing": ".x_stride = 8, .y_stride = 8",
    }[case]
    src = tmp_path / "by_name.cpp"
    src.write_text(
        '#include "layer_norm.h"\n'
        "fastvit::LayerNormFwdArgs make() {\n"
        "  return {.x = 1, .residual = 0, .weight = 1, .bias = 0, .y = 1, .residual_out = 0, .mean = 1, .rstd = 1,\n"
        f"          .rows = 4, .cols = 8, {strides}, .residual_out_stride = 0, .eps = 1e-6,\n"
        "          .x_dtype = 0, .w_dtype = 0, .stream = 0};\n"
        "}\n"
    )
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Werror=missing-field-initializers", "-I", os.path.join(REPO, "csrc")]
    out = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=120)
    expected = _BY_NAME_CASES[case][1]
    if expected is None:
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode != 0, f"{case} compiled"
        assert expected in out.stderr, out.stderr


def _marshalling_calls():
    """Every launcher on CPU tensors shaped like the GPU cases below."""
    h = torch.float16
    tokens = torch.randn(2, 49, 8, dtype=h)
    geometry, strides = _geometry(tokens, [7, 7])
    kernel = (3, 3, 2, 2, 1, 1)
    nw, nb = torch.ones(72), torch.zeros(72)  # fp32 LayerNorm parameters beside fp16 activations
    y, mean, rstd = torch.empty(32, 72, dtype=h), torch.empty(32), torch.empty(32)
    dx = torch.empty_like(tokens)
    img = torch.randn(2, 3, 30, 27, dtype=h).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, 3, 8, 8, dtype=h), torch.randn(64, dtype=h)
    cls, pos = torch.randn(1, 64, dtype=h), torch.randn(17, 64, dtype=h)  # 4 x 4 padded grid + 1 prefix
    x = torch.randn(33, 72, dtype=h)[:, 4:68]  # a row stride the launcher passes through
    lw, lb, res = torch.randn(96, 64, dtype=h), torch.randn(96, dtype=h), torch.randn(33, 96, dtype=h)
    return {
        "soft_split_fwd": lambda: cuda.soft_split_fwd(tokens, strides, geometry, kernel, nw, nb, 1e-5, y, mean, rstd),
        "soft_split_bwd": lambda: cuda.soft_split_bwd(
            y, tokens, strides, geometry, kernel, nw, mean, rstd, True, True, dx, _geometry(dx, [7, 7])[1]
        ),
        "patch_embed_fwd": lambda: cuda.patch_embed_fwd(img, w, b, pos, cls, torch.empty(2, 17, 64, dtype=h)),
        "patch_embed_bwd": lambda: cuda.patch_embed_bwd(torch.randn(2, 17, 64, dtype=h), img, w, 1, True, True),
        "linear_fwd": lambda: cuda.linear_fwd(x, lw, lb, res, "gelu", torch.empty(33, 96, dtype=h)),
        "linear_act_grad": lambda: cuda.linear_act_grad(res, x, lw, lb, "quick_gelu", torch.empty_like(res), True),
        "layer_norm_fwd": lambda: cuda.layer_norm_fwd(
            x, lw[0, :64], None, x, 1e-5, torch.empty(33, 64, dtype=h), torch.empty(33, 64, dtype=h), mean, rstd
        ),
        "layer_norm_bwd": lambda: cuda.layer_norm_bwd(
            x,
            None,
            torch.empty(33, 64, dtype=h),
            lw[0, :64],
            torch.empty(33),
            torch.empty(33),
            torch.empty(33, 64, dtype=h),
            True,
        ),
    }


LAUNCHERS = sorted([*CALLS, "layer_norm_fwd", "layer_norm_bwd"])


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error path; this machine has a GPU")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_pass_the_extension_checks(name, monkeypatch):
    """The launchers' keyword arguments match the bindings and their values pass every C++ check: each
    call gets as far as the device check (the stream handle is the only thing a CPU cannot give)."""
    _extension()
    if name.startswith(("patch_embed", "linear")) and cuda.cublaslt_reasons():
        pytest.skip(f"cuBLASLt cannot be loaded here: {cuda.cublaslt_reasons()}")
    monkeypatch.setattr(_ext, "stream_handle", lambda device: 0)
    with pytest.raises(RuntimeError, match=rf"fastvit\._C\.{name}: no usable CUDA device"):
        _marshalling_calls()[name]()


# ---------------------------------------------------------------------------------------------- GPU
# The launchers are called directly (the ops files wire them in as backend="cuda"); references are the
# ops' own <op>_ref functions.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _soft_split_run(x, hw, kernel, norm_weight, norm_bias, eps, dy):
    """Forward and backward through the cuda launchers; returns y (B, L, F), dx, dweight, dbias."""
    geometry, strides = _geometry(x, hw)
    kh, kw, sh, sw, ph, pw = kernel
    B, C, H, W = geometry
    L = ((H + 2 * ph - kh) // sh + 1) * ((W + 2 * pw - kw) // sw + 1)
    rows, features = B * L, C * kh * kw
    has_ln = norm_weight is not None
    y = new_output((rows, features), x)
    mean = new_output((rows,), x, torch.float32) if has_ln else None
    rstd = new_output((rows,), x, torch.float32) if has_ln else None
    cuda.soft_split_fwd(x, strides, geometry, kernel, norm_weight, norm_bias, eps, y, mean, rstd)
    dx = new_output(x.shape, x)
    _, dx_strides = _geometry(dx, hw)
    dweight, dbias = cuda.soft_split_bwd(
        dy.reshape(rows, features).contiguous(), x, strides, geometry, kernel, norm_weight, mean, rstd,
        norm_bias is not None, True, dx, dx_strides,
    )  # fmt: skip
    return y.view(B, L, features), dx, dweight, dbias


SOFT_SPLIT_CASES = [
    # (input shape, hw, kernel (kh, kw, sh, sw, ph, pw), layout)
    ((2, 3, 224, 224), None, (7, 7, 4, 4, 2, 2), "nchw"),  # T2T stage 0
    ((2, 3136, 64), (56, 56), (3, 3, 2, 2, 1, 1), "tokens"),  # T2T stage 1
    ((3, 784, 64), (28, 28), (3, 3, 2, 2, 1, 1), "tokens"),  # T2T stage 2
    ((1, 5, 13, 11), None, (3, 2, 2, 3, 1, 0), "channels_last"),  # ragged, rectangular window
    ((3, 4, 9, 10), None, (2, 2, 3, 3, 0, 0), "nchw"),  # stride > kernel: unread pixels get 0
    ((2, 35, 6), (5, 7), (4, 4, 1, 1, 2, 2), "strided_tokens"),  # tokens sliced from a wider buffer
]


def _soft_split_input(shape, layout, dtype):
    if layout == "channels_last":
        return torch.randn(shape, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    if layout == "strided_tokens":
        return torch.randn((*shape[:-1], shape[-1] * 2), device="cuda").to(dtype)[..., 1::2]
    return torch.randn(shape, device="cuda").to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["none", "ln", "ln_fp32_weight"])
@pytest.mark.parametrize("shape,hw,kernel,layout", SOFT_SPLIT_CASES)
def test_gpu_soft_split_matches_reference(shape, hw, kernel, layout, norm, dtype):
    x = _soft_split_input(shape, layout, dtype)
    C = shape[2] if hw else shape[1]
    features = C * kernel[0] * kernel[1]
    w_dtype = torch.float32 if norm == "ln_fp32_weight" else dtype
    nw = (1 + 0.5 * torch.randn(features, device="cuda")).to(w_dtype) if norm != "none" else None
    nb = (0.5 * torch.randn(features, device="cuda")).to(w_dtype) if norm != "none" else None
    geo = dict(kernel_size=kernel[:2], stride=kernel[2:4], padding=kernel[4:], hw=hw)
    # The oracle: fp32 leaves, so its gradients are not rounded back to the kernel's dtype.
    leaves = [t.detach().float().requires_grad_() for t in (x, nw, nb) if t is not None]
    x32, nw32, nb32 = leaves + [None] * (3 - len(leaves))
    ref = soft_split_ref(x32, norm_weight=nw32, norm_bias=nb32, norm_eps=1e-5, **geo)
    dy = torch.randn_like(ref).to(dtype)
    grads_ref = torch.autograd.grad(ref, leaves, dy.float())
    with poisoned_outputs(), torch.no_grad():
        y, dx, dweight, dbias = _soft_split_run(x, hw, kernel, nw, nb, 1e-5, dy)
    if nw is None:
        assert torch.equal(y, soft_split_ref(x, **geo)), "the gather without LayerNorm must be exact"
    else:
        assert_close(y, ref, dtype, name="y")
    assert_close(dx, grads_ref[0], dtype, name="dx")
    if nw is not None:
        assert_close(dweight, grads_ref[1], dtype, scale=GRAD_TOLERANCE_SCALE, name="dnorm_weight")
        assert_close(dbias, grads_ref[2], dtype, scale=GRAD_TOLERANCE_SCALE, name="dnorm_bias")


def _patch_inputs(B, C, H, W, D, patch, P, pos, dtype, layout):
    x = torch.randn(B, C, H, W, device="cuda").to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = (torch.randn(D, C, patch, patch, device="cuda") / (C * patch * patch) ** 0.5).to(dtype)
    bias = torch.randn(D, device="cuda").to(dtype)
    prefix = torch.randn(P, D, device="cuda").to(dtype) if P else None
    N = -(-H // patch) * -(-W // patch)
    rows = {"none": 0, "patches": N, "all": N + P}[pos]
    pos_embed = torch.randn(rows, D, device="cuda").to(dtype) if rows else None
    return x, weight, bias, pos_embed, prefix


PATCH_CASES = [
    # (B, C, H, W, D, patch, P, pos, layout)
    (2, 3, 32, 32, 64, 16, 0, "none", "nchw"),
    (3, 3, 48, 32, 96, 16, 1, "all", "nchw"),  # ViT class token, pos over cls + patches
    (1, 3, 32, 32, 80, 8, 2, "patches", "channels_last"),  # distilled DeiT, no_embed_class
    (5, 4, 30, 27, 64, 8, 1, "patches", "nchw"),  # ragged: zero-padded right / bottom
    (2, 3, 224, 224, 768, 16, 1, "all", "nchw"),  # ViT-B/16
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,D,patch,P,pos,layout", PATCH_CASES)
def test_gpu_patch_embed_matches_reference(B, C, H, W, D, patch, P, pos, layout, dtype):
    x, weight, bias, pos_embed, prefix = _patch_inputs(B, C, H, W, D, patch, P, pos, dtype, layout)
    kw = dict(patch_size=patch, pad=True)

    def reference(*tensors, dt):
        xx, ww, bb, pp, pre = (t.to(dt) if t is not None else None for t in tensors)
        return patch_embed_ref(xx, ww, bb, pos_embed=pp, prefix_tokens=pre, **kw)

    leaves = [t.detach().double().requires_grad_() for t in (x, weight)]
    ref = reference(leaves[0], leaves[1], bias, pos_embed, prefix, dt=torch.float64)
    low_leaves = [t.detach().requires_grad_() for t in (x, weight)]
    low = reference(low_leaves[0], low_leaves[1], bias, pos_embed, prefix, dt=dtype)
    dout = torch.randn_like(low)
    dref = torch.autograd.grad(ref, leaves, dout.double())
    dlow = torch.autograd.grad(low, low_leaves, dout)
    with poisoned_outputs():
        out = new_output(low.shape, x)
        cuda.patch_embed_fwd(x, weight, bias, pos_embed, prefix, out)
        dx, dweight = cuda.patch_embed_bwd(dout.contiguous(), x, weight, P, True, True)
    assert_three_way(out, ref, low, name="out")
    assert_three_way(dx, dref[0], dlow[0], factor=3.0, name="dx")
    assert_three_way(dweight, dref[1], dlow[1], factor=3.0, name="dweight")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_patch_embed_pos_gemm_cache_is_reused(dtype):
    # The pos-embed GEMM has a stride-0 addend that cuBLASLt may reject (NOT_SUPPORTED / no result): then
    # patch_embed_fwd adds the pos-embed in its own kernel. Either answer is cached per problem, so the
    # second call takes the cached path and must give the same result as the first.
    x, weight, bias, pos_embed, prefix = _patch_inputs(2, 3, 32, 32, 64, 16, 1, "all", dtype, "nchw")
    ref = patch_embed_ref(
        x.float(),
        weight.float(),
        bias.float(),
        pos_embed=pos_embed.float(),
        prefix_tokens=prefix.float(),
        patch_size=16,
        pad=True,
    )
    outs = []
    for _ in range(2):
        with poisoned_outputs():
            out = new_output(ref.shape, x)
            cuda.patch_embed_fwd(x, weight, bias, pos_embed, prefix, out)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert_close(outs[0], ref, dtype, name="out")


LINEAR_CASES = [
    # (M, K, N, activation, residual, bias)
    (197, 64, 256, "gelu", False, True),
    (197, 256, 64, None, True, True),
    (577, 96, 384, "gelu_tanh", False, True),
    (577, 96, 384, "gelu_tanh", True, False),
    (50, 80, 320, "quick_gelu", True, True),
    (1, 64, 96, "gelu", True, True),
    (3136, 64, 256, "gelu", False, True),
    (4100, 768, 3072, "gelu", False, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,activation,residual,has_bias", LINEAR_CASES)
def test_gpu_linear_matches_reference(M, K, N, activation, residual, has_bias, dtype):
    # x as a column slice of a wider buffer: a row stride the launcher must honour without a copy.
    x = torch.randn(M, K + 8, device="cuda").to(dtype)[:, 4 : 4 + K]
    weight = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype) if has_bias else None
    res = torch.randn(M, N, device="cuda").to(dtype) if residual else None
    ref = linear_ref(x, weight, bias, activation, res, upcast=True).double()
    low = linear_ref(x, weight, bias, activation, res)
    with poisoned_outputs():
        y = new_output((M, N), x)
        cuda.linear_fwd(x, weight, bias, res, activation, y)
    assert_three_way(y, ref, low, name="y")
    if activation is None:
        return
    dy = torch.randn(M, N, device="cuda").to(dtype)

    def act_grad(dt):
        h = F.linear(x.to(dt), weight.to(dt), bias.to(dt) if bias is not None else None).detach().requires_grad_()
        (g,) = torch.autograd.grad(_activate(h, activation), h, dy.to(dt))
        return g

    g_ref, g_low = act_grad(torch.float64), act_grad(dtype)
    with poisoned_outputs():
        g = new_output((M, N), dy)
        dbias = cuda.linear_act_grad(dy, x, weight, bias, activation, g, has_bias)
    assert_three_way(g, g_ref, g_low, factor=3.0, name="g")
    if has_bias:
        assert_three_way(dbias, g_ref.sum(0), g_low.float().sum(0), factor=3.0, name="dbias")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_gpu_linear_fp32_follows_torch_matmul_precision(precision):
    x, weight = torch.randn(256, 512, device="cuda"), torch.randn(384, 512, device="cuda") / 512**0.5
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        y = new_output((256, 384), x)
        cuda.linear_fwd(x, weight, None, None, None, y)
        low = F.linear(x, weight)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_three_way(y, F.linear(x.double(), weight.double()), low, name=f"y ({precision})")


_SANITIZER_SCRIPT = """
import torch
from fastvit.ops import _cuda_backends as cuda
from fastvit.ops._library import new_output
from fastvit.ops.soft_split import _geometry
torch.manual_seed(0)
x = torch.randn(2, 49, 8, device="cuda", dtype=torch.float16)
geometry, strides = _geometry(x, [7, 7])
nw, nb = torch.ones(72, device="cuda", dtype=torch.float16), torch.zeros(72, device="cuda", dtype=torch.float16)
y = new_output((32, 72), x); mean = new_output((32,), x, torch.float32); rstd = new_output((32,), x, torch.float32)
cuda.soft_split_fwd(x, strides, geometry, (3, 3, 2, 2, 1, 1), nw, nb, 1e-5, y, mean, rstd)
dx = new_output(x.shape, x)
cuda.soft_split_bwd(torch.randn_like(y), x, strides, geometry, (3, 3, 2, 2, 1, 1), nw, mean, rstd, True, True, dx,
                    _geometry(dx, [7, 7])[1])
img = torch.randn(2, 3, 30, 27, device="cuda", dtype=torch.bfloat16)
w = torch.randn(64, 3, 8, 8, device="cuda", dtype=torch.bfloat16)
b, cls, pos = (torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in ((64,), (1, 64), (17, 64)))
out = new_output((2, 17, 64), img)
cuda.patch_embed_fwd(img, w, b, pos, cls, out)
cuda.patch_embed_bwd(torch.randn_like(out), img, w, 1, True, True)
a = torch.randn(33, 64, device="cuda", dtype=torch.float16)
lw, lb = torch.randn(96, 64, device="cuda", dtype=torch.float16), torch.randn(96, device="cuda", dtype=torch.float16)
res = torch.randn(33, 96, device="cuda", dtype=torch.float16)
for act in (None, "gelu", "gelu_tanh", "quick_gelu"):
    cuda.linear_fwd(a, lw, lb, res, act, new_output((33, 96), a))
    if act:
        cuda.linear_act_grad(res, a, lw, lb, act, new_output((33, 96), a), True)
torch.cuda.synchronize()
print("ran every kernel")
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_compute_sanitizer_memcheck_is_clean():
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None
    )
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed (it ships with the CUDA toolkit)")
    out = subprocess.run(
        [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", _SANITIZER_SCRIPT],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert out.returncode == 0 and "ran every kernel" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out.stdout + out.stderr

"""fastvit._C's soft_split, patch_embed and linear kernels (csrc/) and their launchers
(fastvit/ops/_cuda_backends.py): the extension itself, on any machine.

The module carries the entry points, argument errors are ValueErrors raised before any device check,
a call with valid arguments on a machine without a GPU is a RuntimeError saying there is no usable
CUDA device, cuBLASLt is loaded with dlopen (from the nvidia wheel torch installs) or refused with an
error naming every place searched, the code tables come from the extension, the Args structs are bound
by name, and every launcher's arguments pass the C++ checks. The kernels' results (against each op's
reference, on ragged shapes, layouts and all three dtypes) and their compute-sanitizer runs are tested
with the other backends in tests/ops/test_<op>.py, parametrised by backend.
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

from fastvit import _ext
from fastvit.ops import _cuda_backends as cuda
from fastvit.ops.soft_split import _geometry
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
    assert len(structs) == 9 and all(first == "." for _, first in structs), structs  # 9: LinearWgradArgs (#15)
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
    """Every launcher on CPU tensors shaped like the compute-sanitizer cases in tests/ops/test_<op>.py."""
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

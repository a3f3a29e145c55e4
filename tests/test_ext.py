"""fastvit._C: loads when it was built, reports why when it was not, and fails cleanly without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastvit import _ext
from tests.conftest import HAS_GPU


def test_import_fastvit_needs_neither_extension_nor_gpu():
    """A fresh interpreter with the extension hidden still imports fastvit and runs an op."""
    code = (
        "import sys; sys.modules['fastvit._C'] = None\n"
        "import torch, fastvit\n"
        "from fastvit import _ext, ops\n"
        "assert not _ext.available() and 'fastvit._C' in _ext.load_error()\n"
        "y = ops.layer_norm(torch.randn(2, 8), torch.ones(8), None)\n"
        "print('ok', tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok (2, 8)" in out.stdout


def test_build_record_matches_what_loaded():
    info = _ext.build_info()
    if info.get("built"):
        assert _ext.available(), f"the build record says fastvit._C was built, but it did not load: {_ext.load_error()}"
        assert info["cuda_archs"] and info["nvcc_version"]
    else:
        assert not _ext.available()
        assert _ext.load_error(), "an unbuilt extension must say why"


def _require_extension():
    if not _ext.available():
        pytest.skip(f"fastvit._C is not built here: {_ext.load_error()}")
    return _ext.module()


def _ln_args(**overrides):
    args = dict(
        x=1,
        residual=0,
        weight=1,
        bias=0,
        y=1,
        residual_out=0,
        mean=1,
        rstd=1,
        rows=4,
        cols=8,
        x_stride=8,
        residual_stride=0,
        y_stride=8,
        residual_out_stride=0,
        eps=1e-6,
        x_dtype=0,
        w_dtype=0,
        stream=0,
    )
    args.update(overrides)
    return args


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error path; this machine has a GPU")
def test_kernel_call_without_gpu_is_a_clear_error():
    C = _require_extension()
    with pytest.raises(RuntimeError, match="no usable CUDA device.*use backend='torch'"):
        C.layer_norm_fwd(**_ln_args())
    assert "no usable CUDA device" in C.device_status()
    assert "no usable CUDA device" in C.device_problem()


@pytest.mark.gpu
def test_gpu_extension_can_use_the_device():
    # Fails where the driver is older than the runtime fastvit._C was built with: the message says so.
    _require_extension()
    assert _ext.device_problem() is None, _ext.device_problem()


def test_extension_validates_arguments_before_touching_the_gpu():
    C = _require_extension()
    with pytest.raises(ValueError, match="normalised dimension must be > 0"):
        C.layer_norm_fwd(**_ln_args(cols=0))
    with pytest.raises(ValueError, match="must be non-null device pointers"):
        C.layer_norm_fwd(**_ln_args(x=0))
    with pytest.raises(ValueError, match=r"weight dtype float16 must be the input dtype \(float32\) or float32"):
        C.layer_norm_fwd(**_ln_args(w_dtype=1))
    with pytest.raises(ValueError, match="unsupported dtype code 7"):
        C.layer_norm_bwd(
            dy=1,
            dresidual_out=0,
            z=1,
            weight=1,
            mean=1,
            rstd=1,
            dz=1,
            dweight_partial=1,
            dbias_partial=0,
            rows=4,
            cols=8,
            dy_stride=8,
            dresidual_out_stride=0,
            z_stride=8,
            dz_stride=8,
            num_partials=1,
            x_dtype=7,
            w_dtype=0,
            stream=0,
        )


def test_dtype_codes_match_the_extension():
    _require_extension()  # the table is read from fastvit._C (empty without it)
    assert _ext.DTYPE_CODES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

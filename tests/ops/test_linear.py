"""ops.linear: output and every gradient by the three-way rule, on each backend available.

The kernel's error against the fp64 reference (``linear_ref`` on fp64 copies) must be at most 2x
(output) / 3x (gradients) the error of the same torch computation in the kernel's dtype, plus the
dtype's rounding floor (fastvit.testing.assert_three_way). Without a GPU the Triton kernels run under
the interpreter on small shapes in fp32 and fp16; bf16, TF32, ViT-sized GEMMs, the cuda backend
(csrc/) on every case of the GPU matrices and its compute-sanitizer run are marked ``gpu``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvit import ops
from fastvit.ops.linear import ACTIVATIONS, _linear_act_grad, _linear_fwd, _linear_wgrad, linear_ref
from fastvit.testing import assert_three_way, poisoned_outputs
from tests._fake_gpu import fake_sm90
from tests.ops.backends import kernel_backends, run_under_memcheck

ACTS = [None, *ACTIVATIONS]
GRAD_NAMES = ("dx", "dweight", "dbias", "dresidual")


def _inputs(x_shape, out_features, dtype, device, *, bias=True, residual=True, scale=1.0):
    """Fresh random leaves; weights scaled by 1/sqrt(in_features) so h has unit-size values (times scale)."""
    in_features = x_shape[-1]
    x = (torch.randn(x_shape, device=device) * scale).to(dtype).requires_grad_()
    w = (torch.randn(out_features, in_features, device=device) * in_features**-0.5).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(out_features, device=device)).to(dtype).requires_grad_() if bias else None
    r = torch.randn((*x_shape[:-1], out_features), device=device).to(dtype).requires_grad_() if residual else None
    return x, w, b, r


def _run(fn, leaves, dy, cast=None):
    """fn(*leaves) and the gradients of <fn, dy> for every leaf that is not None (leaves cast first if asked)."""
    leaves = [t if t is None else (t.detach().to(cast) if cast else t.detach()).requires_grad_() for t in leaves]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, dy.to(y.dtype))
    return y, grads


@contextlib.contextmanager
def _float32_matmul_precision(precision):
    """Both the kernel and torch read this setting for fp32 GEMMs ("high": TF32 on the GPU)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _check(backend, x, w, b, r, activation):
    """Three-way check of y and every gradient: kernel vs fp64 reference vs torch in x's dtype."""
    leaves = (x, w, b, r)
    names = [n for n, t in zip(GRAD_NAMES, (x, w, b, r)) if t is not None]
    dy = torch.randn((*x.shape[:-1], w.shape[0]), device=x.device)

    def kernel(x, w, b, r):
        return ops.linear(x, w, b, activation=activation, residual=r, backend=backend)

    def reference(x, w, b, r):
        return linear_ref(x, w, b, activation, r)

    with poisoned_outputs():
        y, grads = _run(kernel, leaves, dy)
    y_ref, grads_ref = _run(reference, leaves, dy, cast=torch.float64)
    y_lp, grads_lp = _run(reference, leaves, dy)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert_three_way(y, y_ref, y_lp, factor=2.0, name=f"y ({activation})")
    for name, g, g_ref, g_lp, leaf in zip(names, grads, grads_ref, grads_lp, [t for t in leaves if t is not None]):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{name}: {g.dtype}{list(g.shape)}"
        assert_three_way(g, g_ref, g_lp, factor=3.0, name=f"{name} ({activation})")


# ------------------------------------------------------------------------------ interpreter / GPU


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(activation, dtype, device):
    """Odd sizes: M = 7, K = 40 (not a multiple of BLOCK_K), N = 24 (a partial column tile)."""
    x, w, b, r = _inputs((7, 40), 24, dtype, device)
    _check("triton", x, w, b, r, activation)


@pytest.mark.interpreter
@pytest.mark.parametrize("block_m, block_n, splits", [(32, 64, (1, 2)), (64, 64, (2, 4))])
def test_epilogue_sub_tiles(block_m, block_n, splits, monkeypatch, device):
    """The epilogue split into 2 and 4 column sub-tiles (tl.split of the accumulator), forward and the GELU
    backward with its dbias partials, on a ragged M and N (one warp: the split follows values per thread)."""
    from fastvit.kernels import linear as kernels

    config = kernels._config(block_m, block_n, 32, 1, 1, group_m=4)
    fwd_args, grad_args = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 1, "ACT_GRAD": False}, None
    grad_args = dict(fwd_args, ACT_GRAD=True)
    assert (kernels._epilogue_split(fwd_args), kernels._epilogue_split(grad_args)) == splits
    monkeypatch.setattr(kernels, "_INTERPRET_CONFIG", config)
    monkeypatch.setattr(kernels, "_MIN_BLOCK_M", block_m)
    x, w, b, r = _inputs((70, 40), 100, torch.float32, device)
    _check("triton", x, w, b, r, "gelu")
    _check("triton", x, w, b, None, "gelu")


@pytest.mark.interpreter
def test_gelu_matches_nn_gelu_in_fp32_tolerance(device):
    """The kernels' GELU (A&S 26.2.17 normal tail) over fp32 inputs in [-12, 12]: within testing.py's fp32
    tolerance of nn.GELU(), and its worst absolute error below 4e-7 of the fp64 GELU."""
    from fastvit.testing import assert_close

    h = torch.linspace(-12, 12, 3 * 1024 + 7, device=device)
    x = h[:, None].contiguous()
    w = torch.ones(1, 1, device=device)
    y = ops.linear(x, w, None, activation="gelu", backend="triton")[:, 0]
    assert_close(y, nn.GELU()(h), torch.float32, name="gelu")
    err = (y.double() - F.gelu(h.double())).abs().max().item()
    assert err < 4e-7, f"GELU max abs error {err:.3g} vs fp64"


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_tokens(dtype, device):
    """(batch, 197 tokens, C): M = 394 is not a multiple of any row tile."""
    x, w, b, r = _inputs((2, 197, 32), 48, dtype, device)
    _check("triton", x, w, b, None, "gelu")
    _check("triton", x, w, b, r, None)


@pytest.mark.interpreter
@pytest.mark.parametrize("bias, residual", [(False, False), (False, True), (True, False)])
def test_optional_bias_and_residual(bias, residual, device):
    x, w, b, r = _inputs((5, 3, 40), 36, torch.float32, device, bias=bias, residual=residual)
    _check("triton", x, w, b, r, "gelu_tanh")


@pytest.mark.interpreter
def test_frozen_bias(device):
    """A bias that needs no gradient: the backward skips the fused dbias partials, dx and dweight unchanged."""
    x, w, b, _ = _inputs((70, 40), 24, torch.float16, device, residual=False)
    b.requires_grad_(False)
    dy = torch.randn(70, 24, device=device).half()
    with poisoned_outputs():
        y = ops.linear(x, w, b, activation="gelu", backend="triton")
        got = torch.autograd.grad(y, (x, w), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
    want = torch.autograd.grad(linear_ref(*leaves64, b.double(), "gelu"), leaves64, dy.double())
    leaves16 = [t.detach().requires_grad_() for t in (x, w)]
    lowp = torch.autograd.grad(linear_ref(*leaves16, b, "gelu"), leaves16, dy)
    for name, g, e, lp in zip(("dx", "dweight"), got, want, lowp):
        assert_three_way(g, e, lp, factor=3.0, name=name)


@pytest.mark.interpreter
# numpy (the interpreter) warns when exp overflows to inf inside sigmoid; 1 / (1 + inf) = 0 is the intended value.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_tails(activation, device):
    """Pre-activations out to |h| ~ 20: the erf / sigmoid tails of each activation and its derivative."""
    x, w, b, r = _inputs((6, 32), 40, torch.float32, device, scale=12.0)
    _check("triton", x, w, b, r, activation)


@pytest.mark.interpreter
def test_non_contiguous_views(device):
    """x a column slice of a wider buffer, weight transposed storage, residual column-major, 3-D token views."""
    wide = torch.randn(9, 100, device=device)
    x = wide[:, 10:50].requires_grad_()  # leaf view, row stride 100
    w = (torch.randn(40, 24, device=device) * 0.15).t().requires_grad_()  # (24, 40) with strides (1, 24)
    b = torch.randn(24, device=device, requires_grad=True)
    r = torch.randn(24, 9, device=device).t().requires_grad_()  # (9, 24) column-major
    assert x.stride() == (100, 1) and w.stride() == (1, 24) and r.stride() == (1, 9)
    _check("triton", x, w, b, r, "quick_gelu")
    # (B=3, N=7, C=32) from a (N, B, C) buffer: not viewable as 2-D
    tokens = torch.randn(7, 3, 32, device=device).transpose(0, 1).requires_grad_()
    _, w3, b3, r3 = _inputs((3, 7, 32), 20, torch.float32, device)
    _check("triton", tokens, w3, b3, r3, "gelu")


@pytest.mark.interpreter
def test_backward_saves_no_pre_activation(device):
    """The memory choice: autograd keeps x, weight and bias only; h is recomputed in the backward.
    (torch's composition also keeps the (M, N) pre-activation for F.gelu's backward.)"""
    x, w, b, _ = _inputs((64, 32), 128, torch.float32, device, residual=False)

    def saved_bytes(backend):
        seen = {}

        def pack(t):
            seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ops.linear(x, w, b, activation="gelu", backend=backend)
        return sum(seen.values())

    x_bytes, w_bytes, b_bytes, h_bytes = 64 * 32 * 4, 128 * 32 * 4, 128 * 4, 64 * 128 * 4
    assert saved_bytes("triton") == x_bytes + w_bytes + b_bytes
    assert saved_bytes("torch") >= x_bytes + w_bytes + h_bytes


@pytest.mark.interpreter
def test_zero_rows(device):
    x, w, b, r = _inputs((0, 16), 24, torch.float32, device)
    y = ops.linear(x, w, b, activation="gelu", residual=r, backend="triton")
    assert y.shape == (0, 24)
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == (0, 16) and (dw == 0).all() and (db == 0).all()


@pytest.mark.interpreter
def test_autocast_lowers_like_f_linear(device):
    """fp32 inputs under autocast(float16) run in fp16 and return fp16, as F.linear does."""
    x, w, b, r = (t.detach() for t in _inputs((6, 40), 24, torch.float32, device))
    with torch.autocast(device.type, dtype=torch.float16):
        y = ops.linear(x, w, b, activation="gelu", residual=r, backend="triton")
        assert F.linear(x, w, b).dtype == torch.float16
    assert y.dtype == torch.float16
    lowered = [t.half() for t in (x, w, b, r)]
    y_ref = linear_ref(*[t.double() for t in lowered[:3]], "gelu", lowered[3].double())
    assert_three_way(y, y_ref, linear_ref(*lowered[:3], "gelu", lowered[3]), name="y under autocast")


def test_activation_definitions_match_torch_modules():
    """The spec's activations are nn.GELU(), nn.GELU(approximate="tanh") and x * sigmoid(1.702 x)."""
    x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    h = F.linear(x, w, b)
    torch.testing.assert_close(linear_ref(x, w, b, "gelu"), nn.GELU()(h), rtol=0, atol=0)
    torch.testing.assert_close(linear_ref(x, w, b, "gelu_tanh"), nn.GELU(approximate="tanh")(h), rtol=0, atol=0)
    torch.testing.assert_close(linear_ref(x, w, b, "quick_gelu"), h * torch.sigmoid(1.702 * h), rtol=0, atol=0)


def test_torch_backend_is_the_reference():
    x, w, b, r = (t.detach() for t in _inputs((2, 5, 16), 12, torch.float32, "cpu"))
    for activation in ACTS:
        got = ops.linear(x, w, b, activation=activation, residual=r, backend="torch")
        assert torch.equal(got, linear_ref(x, w, b, activation, r))


def test_auto_on_cpu_uses_torch():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


def test_torch_backend_serves_float64():
    x, w, b = (torch.randn(s, dtype=torch.float64) for s in ((3, 8), (4, 8), (4,)))
    assert ops.linear(x, w, b, activation="gelu").dtype == torch.float64


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "activation, bias, residual", [("gelu", True, True), ("", False, False), ("quick_gelu", False, True)]
)
def test_opcheck(activation, bias, residual, device):
    x, w, b, r = _inputs((5, 40), 24, torch.float32, device, bias=bias, residual=residual)
    torch.library.opcheck(_linear_fwd, (x, w, b, r, activation, "triton"))
    dy = torch.randn(5, 24, device=device)
    if activation:
        b_ = b.detach() if b is not None else None
        torch.library.opcheck(_linear_act_grad, (dy, x.detach(), w.detach(), b_, activation, bias, "triton"))
    else:
        torch.library.opcheck(_linear_wgrad, (dy, x.detach(), "triton"))


@pytest.mark.interpreter
def test_compile_fullgraph(device):
    """One opaque node for Dynamo, forward and backward: no graph break, same values as eager."""
    x, w, b, r = _inputs((2, 5, 32), 24, torch.float32, device)

    def f(x, w, b, r):
        return ops.linear(x, w, b, activation="gelu", residual=r, backend="triton") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, got_grads = _run(compiled, (x, w, b, r), torch.ones(2, 5, 24, device=device))
    want, want_grads = _run(f, (x, w, b, r), torch.ones(2, 5, 24, device=device))
    torch.testing.assert_close(got, want)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (
            lambda: (torch.randn(2, 8), torch.randn(4, 7), None),
            {},
            ValueError,
            r"weight must have shape \(out_features, 8\)",
        ),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8, device="meta"), None), {}, ValueError, "different devices"),
        (
            lambda: (torch.arange(16).view(2, 8), torch.randn(4, 8), None),
            {},
            TypeError,
            "x must be float32, float16 or bfloat16",
        ),
        (
            lambda: (torch.randn(2, 8), torch.randint(0, 3, (4, 8)), None),
            {},
            TypeError,
            "weight must be float32, float16 or bfloat16",
        ),
        (
            lambda: (torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float16), None),
            {},
            TypeError,
            "weight dtype torch.float16 must equal x's dtype",
        ),
        (
            lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)),
            {},
            ValueError,
            r"bias must have shape \(4,\)",
        ),
        (
            lambda: (torch.randn(2, 8), torch.randn(4, 8), None),
            {"activation": "relu"},
            ValueError,
            "unknown activation 'relu'; expected None or one of 'gelu', 'gelu_tanh', 'quick_gelu'",
        ),
        (
            lambda: (torch.randn(2, 8), torch.randn(4, 8), None),
            {"residual": torch.randn(2, 8)},
            ValueError,
            r"residual shape \(2, 8\) must equal the output's shape \(2, 4\)",
        ),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8), None), {"backend": "tpu"}, ValueError, "unknown backend"),
    ],
)
def test_bad_inputs(make, kwargs, error, match):
    x, w, b = make()
    with pytest.raises(error, match=match):
        ops.linear(x, w, b, **kwargs)


@pytest.mark.interpreter
def test_triton_refuses_float64_with_reasons():
    x, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ops.BackendNotSupported) as info:
        ops.linear(x, w, backend="triton")
    msg = str(info.value)
    assert "backend='triton' cannot run these inputs" in msg
    assert "dtype torch.float64 is not supported by the Triton GEMM" in msg
    assert "Hint: use backend='torch'" in msg


def test_cuda_backend_refuses_cpu_tensors():
    """The cuda backend's kernels (csrc/) are tested by the GPU matrices below; the extension itself
    (entry points, argument checks, launchers' marshalling) in tests/test_ext_kernels.py."""
    with pytest.raises(ops.BackendNotSupported, match="the 'cuda' backend needs CUDA tensors"):
        ops.linear(torch.randn(2, 8), torch.randn(4, 8), backend="cuda")


# ------------------------------------------------------------------------------------ GPU matrix

# (in_features, out_features, activation, residual): fc1 (+GELU) and fc2 (+residual) of DeiT-S, ViT-B,
# ViT-L and ViT-H (MLP ratio 4), an MLP ratio 3 pair, the attention projection and T2T's 147 / 576 widths.
GPU_SHAPES = [
    (384, 1536, "gelu", False), (1536, 384, None, True),
    (768, 3072, "gelu", False), (3072, 768, None, True),
    (1024, 4096, "gelu", False), (4096, 1024, None, True),
    (1280, 5120, "gelu", False), (5120, 1280, None, True),
    (768, 2304, "gelu", False), (2304, 768, None, True),
    (768, 768, None, True), (147, 64, "gelu", False), (576, 64, "gelu_tanh", False), (64, 576, "quick_gelu", True),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("in_features, out_features, activation, residual", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [(1, 197), (3, 197), (2, 577)])
@pytest.mark.parametrize("backend", kernel_backends("linear"))
def test_gpu_matrix(in_features, out_features, activation, residual, dtype, tokens, backend):
    x, w, b, r = _inputs((*tokens, in_features), out_features, dtype, torch.device("cuda"), residual=residual)
    _check(backend, x, w, b, r, activation)


# Ragged row counts, a strided x (a column slice of a wider buffer: its row stride is K + 8, honoured
# without a copy), with and without bias / residual: (M, K, N, activation, residual, bias).
GPU_RAGGED_CASES = [
    (197, 64, 256, "gelu", False, True),
    (197, 256, 64, None, True, True),
    (577, 96, 384, "gelu_tanh", False, True),
    (577, 96, 384, "gelu_tanh", True, False),
    (50, 80, 320, "quick_gelu", True, True),
    (1, 64, 96, "gelu", True, True),
    (3136, 64, 256, "gelu", False, True),
    (4100, 768, 3072, "gelu", False, True),
    (33, 40, 24, None, False, False),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("M, K, N, activation, residual, bias", GPU_RAGGED_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", kernel_backends("linear"))
def test_gpu_ragged_rows_and_strided_x(M, K, N, activation, residual, bias, dtype, backend):
    cuda = torch.device("cuda")
    _, w, b, r = _inputs((M, K), N, dtype, cuda, bias=bias, residual=residual)
    x = torch.randn(M, K + 8, device=cuda).to(dtype)[:, 4 : 4 + K].requires_grad_()
    assert x.stride() == (K + 8, 1)
    _check(backend, x, w, b, r, activation)


# (x shape, out_features, bias and residual, activation): a ViT-B fc1 and a plain 512 -> 384 product.
PRECISION_CASES = [((2, 197, 768), 3072, True, "gelu"), ((256, 512), 384, False, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("x_shape, out_features, extras, activation", PRECISION_CASES)
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("backend", kernel_backends("linear"))
def test_gpu_fp32_follows_torch_matmul_precision(x_shape, out_features, extras, activation, precision, backend):
    """fp32 inputs: exact products under "highest" (torch's default), TF32 under "high", like F.linear."""
    x, w, b, r = _inputs(x_shape, out_features, torch.float32, torch.device("cuda"), bias=extras, residual=extras)
    with _float32_matmul_precision(precision):
        _check(backend, x, w, b, r, activation)
        y = ops.linear(x, w, b, backend=backend).double()
    error = (y - linear_ref(x.double(), w.double(), b.double() if b is not None else None)).abs().max().item()
    if precision == "highest":
        assert error < 1e-4, f"fp32 products under 'highest' should be exact, max error {error:.3g}"
    else:
        assert error > 1e-4, f"'high' should run TF32 products (expected error ~1e-3), max error {error:.3g}"


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_cuda_kernels_pass_memcheck():
    """The cuda backend's cuBLASLt GEMM + epilogue forward and its activation-gradient kernel, for every
    activation, under compute-sanitizer (fp16, ragged 33 rows)."""
    run_under_memcheck(
        """
h = torch.float16
x = torch.randn(33, 64, device="cuda", dtype=h, requires_grad=True)
w = torch.randn(96, 64, device="cuda", dtype=h, requires_grad=True)
b = torch.randn(96, device="cuda", dtype=h, requires_grad=True)
r = torch.randn(33, 96, device="cuda", dtype=h, requires_grad=True)
for act in (None, "gelu", "gelu_tanh", "quick_gelu"):
    y = ops.linear(x, w, b, activation=act, residual=r, backend="cuda")
    torch.autograd.grad(y, (x, w, b, r), torch.randn_like(y))
"""
    )


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTS)
def test_gpu_large_batch_bf16(activation):
    x, w, b, r = _inputs((64, 197, 768), 3072, torch.bfloat16, torch.device("cuda"))
    _check("triton", x, w, b, r, activation)


@pytest.mark.gpu
def test_gpu_deterministic():
    x, w, b, r = _inputs((32, 197, 768), 3072, torch.bfloat16, torch.device("cuda"))
    runs = []
    for _ in range(2):
        y = ops.linear(x, w, b, activation="gelu", residual=r, backend="triton")
        runs.append((y, *torch.autograd.grad(y, (x, w, b, r), torch.ones_like(y))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """A tuned key replays its config inside a capture; an untuned key gets the default config instead of
    autotuning (which would record the trial launches into the graph)."""
    from fastvit.kernels import linear as kernels_linear

    cuda = torch.device("cuda")
    _, w, b, _ = (t.detach() for t in _inputs((1, 768), 3072, torch.float16, cuda))
    # Eager warm-up at 5 x 197 rows: tunes that row bucket and compiles every config, the default included.
    for tokens in (5 * 197, 7 * 197):
        x, _, _, r = (t.detach() for t in _inputs((tokens, 768), 3072, torch.float16, cuda))
        if tokens == 7 * 197:
            tuned_before = len(kernels_linear._BEST)
        else:
            ops.linear(x, w, b, activation="gelu", residual=r, backend="triton")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = ops.linear(x, w, b, activation="gelu", residual=r, backend="triton")
        g.replay()
        torch.cuda.synchronize()
        expected = linear_ref(x.double(), w.double(), b.double(), "gelu", r.double())
        assert_three_way(y, expected, linear_ref(x, w, b, "gelu", r), name=f"captured y ({tokens} rows)")
    assert len(kernels_linear._BEST) == tuned_before, "an untuned key was autotuned inside a CUDA-graph capture"


# ------------------------------------------------------------------- save_preact (training path)


def _grads(backend, leaves, activation, dy, save):
    x, w, b, r = [t if t is None else t.detach().requires_grad_() for t in leaves]
    y = ops.linear(x, w, b, activation=activation, residual=r, backend=backend, save_preact=save)
    return y, torch.autograd.grad(y, [t for t in (x, w, b, r) if t is not None], dy.to(y.dtype))


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_preact_matches_reference(activation, dtype, device):
    """save_preact=True (through the context manager): y and every gradient by the three-way rule, on a
    ragged M = 70 that spans several programs of the saved-h kernel (32 rows each under the interpreter)."""
    from fastvit.ops.linear import save_preact

    x, w, b, r = _inputs((70, 40), 24, dtype, device)
    with save_preact(True):
        _check("triton", x, w, b, r, activation)
        _check("triton", x, w, b, None, activation)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_save_preact_equals_recompute_fp32(activation, device):
    """In fp32 the saved h is the forward's accumulator + bias exactly, and the recompute GEMM runs the same
    tiles, so saving and recomputing give bit-identical y and gradients (dbias partials: different row
    groupings, so equal within fp32 rounding of the column sums)."""
    x, w, b, r = _inputs((70, 3, 16), 36, torch.float32, device)
    dy = torch.randn(70, 3, 36, device=device)
    y0, g0 = _grads("triton", (x, w, b, r), activation, dy, save=False)
    y1, g1 = _grads("triton", (x, w, b, r), activation, dy, save=True)
    assert torch.equal(y0, y1)
    for name, a, c in zip(GRAD_NAMES, g0, g1):
        if name == "dbias":
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, c), name


@pytest.mark.interpreter
def test_save_preact_frozen_bias_and_no_bias(device):
    """The saved-h backward without dbias partials: a bias that needs no gradient, and no bias at all."""
    x, w, b, _ = _inputs((40, 24), 20, torch.float16, device, residual=False)
    b.requires_grad_(False)
    dy = torch.randn(40, 20, device=device).half()
    for bias in (b, None):
        with poisoned_outputs():
            y = ops.linear(x, w, bias, activation="gelu_tanh", backend="triton", save_preact=True)
            got = torch.autograd.grad(y, (x, w), dy)
        leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
        b64 = bias.double() if bias is not None else None
        want = torch.autograd.grad(linear_ref(*leaves64, b64, "gelu_tanh"), leaves64, dy.double())
        leaves16 = [t.detach().requires_grad_() for t in (x, w)]
        lowp = torch.autograd.grad(linear_ref(*leaves16, bias, "gelu_tanh"), leaves16, dy)
        for name, g, e, lp in zip(("dx", "dweight"), got, want, lowp):
            assert_three_way(g, e, lp, factor=3.0, name=f"{name} (bias={bias is not None})")


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.interpreter
def test_save_preact_memory(device):
    """The documented memory cost: save keeps x, weight and the (M, N) pre-activation in x's dtype (not the
    bias); recompute keeps x, weight and bias; without an activation or without grad nothing changes."""
    x, w, b, _ = _inputs((64, 32), 128, torch.float16, device, residual=False)
    x_bytes, w_bytes, b_bytes, h_bytes = 64 * 32 * 2, 128 * 32 * 2, 128 * 2, 64 * 128 * 2

    def run(save, activation="gelu"):
        return lambda: ops.linear(x, w, b, activation=activation, backend="triton", save_preact=save)

    assert _saved_bytes(run(True)) == x_bytes + w_bytes + h_bytes
    assert _saved_bytes(run(False)) == x_bytes + w_bytes + b_bytes
    assert _saved_bytes(run(True, activation=None)) == x_bytes + w_bytes + b_bytes
    with torch.no_grad():
        y_nograd = ops.linear(x, w, b, activation="gelu", backend="triton", save_preact=True)
    assert torch.equal(y_nograd, ops.linear(x, w, b, activation="gelu", backend="triton").detach())


@pytest.mark.interpreter
def test_save_preact_default_from_env_and_context(monkeypatch, device):
    """save_preact=None follows the context manager, else FASTVIT_SAVE_PREACT, else recompute."""
    from fastvit.ops.linear import SAVE_PREACT_ENV, save_preact, save_preact_default

    x, w, b, _ = _inputs((16, 8), 12, torch.float32, device, residual=False)
    h_bytes = 16 * 12 * 4

    def saved():
        return _saved_bytes(lambda: ops.linear(x, w, b, activation="gelu", backend="triton"))

    recompute = 16 * 8 * 4 + 12 * 8 * 4 + 12 * 4
    monkeypatch.delenv(SAVE_PREACT_ENV, raising=False)
    assert save_preact_default() is False and saved() == recompute
    for value, expected in [("1", True), (" TRUE ", True), ("on", True), ("yes", True), ("0", False),
                            ("off", False), ("False", False), ("", False)]:  # fmt: skip
        monkeypatch.setenv(SAVE_PREACT_ENV, value)
        assert save_preact_default() is expected, value
    monkeypatch.setenv(SAVE_PREACT_ENV, "1")
    assert saved() == recompute - 12 * 4 + h_bytes
    with save_preact(False):
        assert save_preact_default() is False and saved() == recompute
        with save_preact(True):
            assert save_preact_default() is True
        assert save_preact_default() is False
    monkeypatch.setenv(SAVE_PREACT_ENV, "0")
    with save_preact(True):
        assert saved() == recompute - 12 * 4 + h_bytes
        # an explicit argument beats the context
        assert _saved_bytes(lambda: ops.linear(x, w, b, activation="gelu", backend="triton", save_preact=False)) == (
            recompute
        )
    assert save_preact_default() is False


@pytest.mark.parametrize("value", ["2", "maybe", "save"])
def test_save_preact_bad_env_raises(value, monkeypatch):
    from fastvit.ops.linear import SAVE_PREACT_ENV, save_preact_default

    monkeypatch.setenv(SAVE_PREACT_ENV, value)
    with pytest.raises(ValueError, match=rf"FASTVIT_SAVE_PREACT='{value}' is not understood; set it to 1 .* or 0"):
        save_preact_default()


@pytest.mark.parametrize("value", [1, "yes", 0.0])
def test_save_preact_bad_flag_raises(value):
    from fastvit.ops.linear import save_preact

    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"save_preact must be True or False, got"):
        ops.linear(x, w, activation="gelu", save_preact=value)
    with pytest.raises(TypeError, match=r"save_preact\(enabled\) must be True or False, got"):
        with save_preact(value):
            pass


def test_save_preact_torch_backend_unchanged():
    """The torch backend is autograd's composition (F.gelu keeps h): the flag changes nothing there."""
    x, w, b, r = _inputs((6, 16), 12, torch.float64, "cpu")
    dy = torch.randn(6, 12, dtype=torch.float64)
    y0, g0 = _grads("torch", (x, w, b, r), "gelu", dy, save=False)
    y1, g1 = _grads("torch", (x, w, b, r), "gelu", dy, save=True)
    assert torch.equal(y0, y1) and all(torch.equal(a, c) for a, c in zip(g0, g1))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_grad_saved_torch_formula(activation):
    """The cuda backend's saved-h backward (torch ops): g = dy * act'(h) against autograd of the reference
    activation in fp64, and dbias = sum_rows(g) in fp32."""
    from fastvit.ops.linear import _act_grad_saved_torch, _activate

    h = torch.linspace(-12, 12, 2 * 301, dtype=torch.float64).view(2, 301).t().contiguous()
    dy = torch.randn(301, 2, dtype=torch.float64)
    h_leaf = h.clone().requires_grad_()
    (want,) = torch.autograd.grad(_activate(h_leaf, activation), h_leaf, dy)
    g, dbias = _act_grad_saved_torch(dy.float(), h.float(), activation, True)
    assert g.dtype == torch.float32 and dbias.dtype == torch.float32
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbias.double(), want.sum(0), rtol=1e-5, atol=1e-4)
    assert _act_grad_saved_torch(dy.float(), h.float(), activation, False)[1] is None


@pytest.mark.interpreter
def test_act_grad_saved_kernel_strided_dy(device):
    """The saved-h kernel on a transposed (column-major) dy and a strided h view, with dbias partials over
    3 programs of rows: against the torch formula."""
    from fastvit.kernels import linear as kernels
    from fastvit.ops.linear import _act_grad_saved_torch

    dy = torch.randn(24, 70, device=device).t()
    h = (3 * torch.randn(70, 50, device=device))[:, 5:29]
    g = torch.full((70, 24), float("nan"), device=device)
    dbias = kernels.linear_act_grad_saved(dy, h, "gelu", g, True)
    g_want, dbias_want = _act_grad_saved_torch(dy, h, "gelu", True)
    torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dbias, dbias_want, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation, bias, residual", [("gelu", True, True), ("quick_gelu", False, False)])
def test_opcheck_save_preact(activation, bias, residual, device):
    from fastvit.ops.linear import _linear_act_grad_saved, _linear_fwd_save

    x, w, b, r = _inputs((5, 40), 24, torch.float32, device, bias=bias, residual=residual)
    torch.library.opcheck(_linear_fwd_save, (x, w, b, r, activation, "triton"))
    dy, h = torch.randn(5, 24, device=device), torch.randn(5, 24, device=device)
    torch.library.opcheck(_linear_act_grad_saved, (dy, h, activation, bias, "triton"))


@pytest.mark.interpreter
def test_compile_fullgraph_save_preact(device):
    """The save path under torch.compile(fullgraph=True): no graph break, same values as eager."""
    from fastvit.ops.linear import save_preact

    x, w, b, r = _inputs((2, 5, 32), 24, torch.float32, device)

    def f(x, w, b, r):
        return ops.linear(x, w, b, activation="gelu", residual=r, backend="triton", save_preact=True) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with save_preact(True):
        got, got_grads = _run(compiled, (x, w, b, r), torch.ones(2, 5, 24, device=device))
    want, want_grads = _run(f, (x, w, b, r), torch.ones(2, 5, 24, device=device))
    torch.testing.assert_close(got, want)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e)


def _kernel_report():
    """benchmarks/kernel_report.py by path (the name "benchmarks" is also the tests/benchmarks package)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "benchmarks", "kernel_report.py")
    spec = importlib.util.spec_from_file_location("fastvit_kernel_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_gemm_flops_vit_b16_by_hand():
    """ViT-B/16 at batch 256: M = 256 * 197 = 50432. Per GEMM 2 M N K: qkv 2 * 50432 * 2304 * 768 =
    178,476,023,808; proj 2 * 50432 * 768 * 768 = 59,492,007,936; fc1 and fc2 2 * 50432 * 3072 * 768 =
    237,968,031,744. Forward sum 713,904,095,232; training = 3x that (fwd, dgrad, wgrad) = 2,141,712,285,696
    with the pre-activation saved, + one fc1 GEMM = 2,379,680,317,440 when it is recomputed: 10.0% of before."""
    report = _kernel_report()
    before = {r["layer"]: r for r in report.training_gemm_flops(save_preact=False)}
    after = {r["layer"]: r for r in report.training_gemm_flops(save_preact=True)}
    assert [before[n]["fwd"] for n in ("qkv", "proj", "fc1", "fc2")] == [
        178_476_023_808, 59_492_007_936, 237_968_031_744, 237_968_031_744]  # fmt: skip
    assert (before["fc1"]["M"], before["fc1"]["N"], before["fc1"]["K"]) == (50432, 3072, 768)
    assert before["fc1"]["recompute"] == 237_968_031_744 and after["fc1"]["recompute"] == 0
    assert all(before[n]["recompute"] == 0 for n in ("qkv", "proj", "fc2"))
    summary = report.training_flops_summary()
    assert summary["before"] == 2_379_680_317_440 and summary["after"] == 2_141_712_285_696
    assert summary["saved"] == 237_968_031_744
    assert summary["saved_pct_of_before"] == pytest.approx(10.0)
    assert summary["extra_pct_over_after"] == pytest.approx(100 / 9)
    assert summary["saved_preact_bytes_bf16"] == 309_854_208  # 256 * 197 * 3072 * 2 B, the documented 310 MB
    text = report.training_flops_markdown()
    assert "before (recompute) 2.380 TFLOP, after (save) 2.142 TFLOP: 10.0% of before saved" in text
    # dbias fused into the dW GEMM: no FLOPs change (the totals above hold); the separate column sum's read of
    # dy is gone, M * N * 2 bytes per linear without activation (qkv N = 2304, proj and fc2 N = 768)
    assert summary["dbias_dy_bytes_bf16"] == {"qkv": 232_390_656, "proj": 77_463_552, "fc2": 77_463_552}
    assert "qkv 232 MB, proj 77 MB, fc2 77 MB, total 387 MB" in text


@pytest.mark.interpreter
def test_save_preact_skipped_without_autograd(monkeypatch, device):
    """No input requires grad, or grad is off: save_preact=True runs the plain forward (h is not written)."""
    import importlib

    linear_module = importlib.import_module("fastvit.ops.linear")  # the module (fastvit.ops.linear is the function)

    def refuse(*args):
        raise AssertionError("the saving forward ran although autograd records nothing")

    x, w, b = (t.detach() for t in _inputs((6, 16), 12, torch.float32, device, residual=False)[:3])
    want = ops.linear(x, w, b, activation="gelu", backend="triton")
    monkeypatch.setattr(linear_module, "_fwd_save", refuse)
    assert torch.equal(ops.linear(x, w, b, activation="gelu", backend="triton", save_preact=True), want)
    with torch.no_grad():
        y = ops.linear(x, w.requires_grad_(), b, activation="gelu", backend="triton", save_preact=True)
    assert torch.equal(y, want)
    with pytest.raises(AssertionError, match="the saving forward ran"):  # the patch is live: the check can fail
        ops.linear(x, w, b, activation="gelu", backend="triton", save_preact=True)


@pytest.mark.interpreter
def test_save_preact_epilogue_sub_tiles(monkeypatch, device):
    """A forward that stores h splits its epilogue like the GELU gradient (32 values per thread at a time):
    4 column sub-tiles of a 64 x 64 one-warp tile instead of 2; y, h and the gradients by the three-way rule."""
    from fastvit.kernels import linear as kernels
    from fastvit.ops.linear import save_preact

    fwd_args = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 1, "ACT_GRAD": False}
    assert (kernels._epilogue_split(fwd_args), kernels._epilogue_split(dict(fwd_args, STORE_H=True))) == (2, 4)
    monkeypatch.setattr(kernels, "_INTERPRET_CONFIG", kernels._config(64, 64, 32, 1, 1, group_m=4))
    monkeypatch.setattr(kernels, "_MIN_BLOCK_M", 64)
    x, w, b, r = _inputs((70, 40), 100, torch.float32, device)
    with save_preact(True):
        _check("triton", x, w, b, r, "gelu")
    h = torch.full((70, 100), float("nan"), device=device)
    y = torch.empty(70, 100, device=device)
    kernels.linear_fwd(x.detach(), w.detach(), b.detach(), None, "gelu", y, h)
    torch.testing.assert_close(h, F.linear(x, w, b).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_save_preact_reaches_the_mlp_layers(monkeypatch, device):
    """fastvit.layers.Mlp calls ops.linear with save_preact=None: the process default decides. With it on,
    autograd keeps fc1's (M, hidden) pre-activation and the gradients equal the recomputing run's (fp32)."""
    from fastvit.layers.mlp import Mlp
    from fastvit.ops.linear import save_preact

    monkeypatch.setenv("FASTVIT_BACKEND", "triton")
    mlp = Mlp(16, 48).to(device)
    x = torch.randn(2, 5, 16, device=device)
    runs = {}
    for save in (False, True):
        leaf = x.clone().requires_grad_()
        with save_preact(save):
            saved = _saved_bytes(lambda: mlp(leaf))
            y = mlp(leaf)
        runs[save] = (saved, y, *torch.autograd.grad(y.square().sum(), (leaf, *mlp.parameters())))
    assert runs[True][0] - runs[False][0] == 10 * 48 * 4 - 48 * 4  # + fc1's h, - fc1's bias (not needed)
    for a, c in zip(runs[False][1:], runs[True][1:]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- dbias fused into the dW GEMM (no activation)
#
# Without an activation the backward gets dW and dbias from one pass over dy (fastvit::linear_wgrad). On
# the "triton" backend the fused kernel runs only where the measured dispatch chose it: here a GPU is
# faked (as tests/kernels/test_linear_wgrad.py does) and the injected timer says the fused kernel is the
# faster, so the real kernel (under the interpreter on CPU) computes the gradients checked below.


@pytest.fixture
def fused_wgrad(monkeypatch, tmp_path):
    from fastvit.kernels import linear as kernels_linear
    from fastvit.ops import dispatch

    fake_sm90(monkeypatch, tmp_path, kernels_linear, "_wgrad_device", kernels_linear.WGRAD_ENV_SWITCH)
    state = {"fused": 0, "timing": False}
    real = kernels_linear.linear_wgrad

    def spy(dy, x, need_dbias, *args):
        state["last"] = "fused"
        state["fused"] += 0 if state["timing"] else 1
        return real(dy, x, need_dbias, *args)

    def timer(fn, device):
        state["last"], state["timing"] = "torch", True
        fn()
        state["timing"] = False
        return {"torch": 2.0, "fused": 1.0}[state["last"]]

    monkeypatch.setattr(kernels_linear, "linear_wgrad", spy)
    previous = dispatch.set_timer(timer)
    yield state
    dispatch.set_timer(previous)
    dispatch.reset()


@pytest.mark.interpreter
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_wgrad_gradients_match(fused_wgrad, residual, dtype, device):
    """Ragged M = 70 (not a multiple of the tile), K = 40, N = 24; the fused kernel served dW and dbias."""
    x, w, b, r = _inputs((2, 35, 40), 24, dtype, device, residual=residual)
    _check("triton", x, w, b, r, None)
    assert fused_wgrad["fused"] == 1


@pytest.mark.interpreter
def test_fused_wgrad_only_when_both_grads_are_wanted(fused_wgrad, device):
    """No bias, or a frozen bias: dW by torch.matmul; a frozen weight: dbias by the column sum alone."""
    x, w, b, _ = _inputs((70, 40), 24, torch.float16, device, residual=False)
    dy = torch.randn(70, 24, device=device).half()
    torch.autograd.grad(ops.linear(x, w, None, backend="triton"), (x, w), dy)
    b.requires_grad_(False)
    torch.autograd.grad(ops.linear(x, w, b, backend="triton"), (x, w), dy)
    b.requires_grad_(True)
    w.requires_grad_(False)
    (db,) = torch.autograd.grad(ops.linear(x, w, b, backend="triton"), (b,), dy)
    assert fused_wgrad["fused"] == 0
    assert_three_way(db, dy.double().sum(0), dy.sum(0), factor=3.0, name="dbias")


@pytest.mark.interpreter
def test_wgrad_unmeasured_runs_the_torch_pair(device, monkeypatch):
    """On a CPU tensor (no GPU to measure on) the pair runs: same values as the torch backend's autograd."""
    from fastvit.kernels import linear as kernels_linear

    if device.type != "cpu":
        pytest.skip("the CPU case; the gpu tests measure for real")
    calls = []
    monkeypatch.setattr(kernels_linear, "linear_wgrad", lambda *a: calls.append(a))
    x, w, b, _ = _inputs((70, 40), 24, torch.float32, device, residual=False)
    dy = torch.randn(70, 24)
    got = torch.autograd.grad(ops.linear(x, w, b, backend="triton"), (w, b), dy)
    want = torch.autograd.grad(ops.linear(x, w, b, backend="torch"), (w, b), dy)
    assert calls == []
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------ the memo hit (host overhead)


@pytest.mark.parametrize("bias, residual", [(False, False), (True, False), (False, True), (True, True)])
def test_a_cached_signature_still_refuses_bad_inputs(bias, residual):
    """The memo key covers every input's shape,
    dtype and device: after a valid call is memoised, a meta weight (F.linear with a CPU input and a meta
    weight returns without raising), a dtype mismatch and a ``.data`` swap to another shape are refused by
    fastvit's checks, by name."""
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    b = torch.randn(5) if bias else None
    r = torch.randn(3, 5) if residual else None
    for _ in range(2):
        torch.testing.assert_close(ops.linear(x, w, b, residual=r), linear_ref(x, w, b, None, r))
    with pytest.raises(ValueError, match="different devices"):
        ops.linear(x, w.to("meta"), b, residual=r)
    with pytest.raises(TypeError, match="weight dtype torch.float16 must equal x's dtype"):
        ops.linear(x, w.half(), b, residual=r)
    if bias:
        with pytest.raises(ValueError, match="different devices"):
            ops.linear(x, w, b.to("meta"), residual=r)
        with pytest.raises(TypeError, match="bias dtype torch.float16 must equal x's dtype"):
            ops.linear(x, w, b.half(), residual=r)
    if residual:
        with pytest.raises(ValueError, match="different devices"):
            ops.linear(x, w, b, residual=r.to("meta"))
        with pytest.raises(TypeError, match="residual dtype torch.float16 must equal x's dtype"):
            ops.linear(x, w, b, residual=r.half())
    swapped = torch.randn(5, 8)
    swapped.data = torch.randn(5, 7)  # same object, another shape: the key reads the shape, not the identity
    with pytest.raises(ValueError, match=r"weight must have shape \(out_features, 8\)"):
        ops.linear(x, swapped, b, residual=r)


def test_bias_and_residual_keys_never_meet():
    """A bias-only and a residual-only call can read the same (shape, dtype, device) triple (1-D x: bias
    (N,) and residual (N,)); their memo keys must not meet, so each call runs its own op."""
    x, w, v = torch.randn(8), torch.randn(4, 8), torch.randn(4)
    for _ in range(2):
        torch.testing.assert_close(ops.linear(x, w, v), F.linear(x, w, v))
        torch.testing.assert_close(ops.linear(x, w, residual=v), F.linear(x, w) + v)
        torch.testing.assert_close(ops.linear(x, w), F.linear(x, w))


def test_memo_hit_fast_path_keeps_the_flag_check_and_activations():
    """On a memoised signature a bad save_preact flag is still refused and an activation still applied."""
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    for _ in range(2):
        ops.linear(x, w, b)
    with pytest.raises(TypeError, match="save_preact must be True or False, got 1"):
        ops.linear(x, w, b, save_preact=1)
    for _ in range(2):
        torch.testing.assert_close(ops.linear(x, w, b, activation="gelu"), F.gelu(F.linear(x, w, b)))
    assert ops.linear(x, w, b, save_preact=True).shape == (2, 4)

"""ops.soft_split: outputs and every gradient against the fp32 reference, on each backend available.

Without LayerNorm the forward is a pure gather and must equal ``nn.Unfold`` bit for bit; everything
else is compared with the per-dtype tolerance table (fastvit.testing). Without a GPU the Triton
kernels run under the interpreter on reduced T2T geometries (7/4/2 on small images, 3/2/1 on token
input with 8 channels); the real T2T sizes, bf16, the cuda backend (csrc/) on every case of the GPU
matrices, and its compute-sanitizer run are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastvit import ops
from fastvit.ops.soft_split import _soft_split_bwd, _soft_split_fwd, soft_split_ref
from fastvit.testing import GRAD_TOLERANCE_SCALE, assert_close, poisoned_outputs
from tests.ops.backends import kernel_backends, run_under_memcheck

STAGE0 = dict(kernel_size=7, stride=4, padding=2)  # on the image
STAGE12 = dict(kernel_size=3, stride=2, padding=1)  # on the tokens of the previous stage


def _norm(features, dtype, device, *, bias=True):
    w = (1 + 0.5 * torch.randn(features, device=device)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(features, device=device)).to(dtype).requires_grad_() if bias else None
    return w, b


def _features(x, hw, kernel_size):
    k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
    return (x.shape[2] if hw else x.shape[1]) * k[0] * k[1]


def _check(x, *, hw=None, norm=None, eps=1e-5, backend="triton", **geometry):
    """Runs the op and the fp32 reference; compares the tokens and the gradients of every input."""
    nw, nb = norm if norm is not None else (None, None)
    leaves = [t for t in (x, nw, nb) if t is not None]
    names = [n for n, t in zip(("dx", "dnorm_weight", "dnorm_bias"), (x, nw, nb)) if t is not None]
    with poisoned_outputs():
        y = ops.soft_split(x, hw=hw, norm_weight=nw, norm_bias=nb, norm_eps=eps, backend=backend, **geometry)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    it = iter(ref_leaves[1:])
    y_ref = soft_split_ref(
        ref_leaves[0], hw=hw, norm_weight=next(it) if nw is not None else None,
        norm_bias=next(it) if nb is not None else None, norm_eps=eps, **geometry,
    )  # fmt: skip
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    if nw is None:  # a pure gather: exact
        assert torch.equal(y, y_ref.to(x.dtype)), "soft split without LayerNorm must equal nn.Unfold exactly"
    else:
        assert_close(y, y_ref, x.dtype, name="tokens")
    dy = torch.randn(y.shape, device=x.device)
    with poisoned_outputs():
        got = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    want = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, g, leaf, e in zip(names, got, leaves, want):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{name}: {g.dtype}{list(g.shape)}"
        assert_close(g, e, x.dtype, scale=GRAD_TOLERANCE_SCALE, name=name)


# ------------------------------------------------------------------------------ interpreter / GPU


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused_norm", [False, True])
def test_t2t_stage0_on_image(dtype, fused_norm, device):
    """7/4/2 on a 3x20x20 image: 5x5 = 25 tokens of 147 features (the zero padding counts in the LN)."""
    x = torch.randn(2, 3, 20, 20, device=device).to(dtype).requires_grad_()
    _check(x, norm=_norm(147, dtype, device) if fused_norm else None, **STAGE0)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused_norm", [False, True])
def test_t2t_stages12_on_tokens(dtype, fused_norm, device):
    """3/2/1 on (B, 7 * 9, 8) tokens with hw=(7, 9): 4x5 = 20 tokens of 72 features, ragged grid."""
    x = torch.randn(2, 63, 8, device=device).to(dtype).requires_grad_()
    _check(x, hw=(7, 9), norm=_norm(72, dtype, device) if fused_norm else None, **STAGE12)


@pytest.mark.interpreter
def test_fp32_norm_weights_with_half_tokens_and_no_bias(device):
    """The AMP layout: fp32 LayerNorm parameters, fp16 tokens; dnorm_weight comes back in fp32."""
    x = torch.randn(1, 36, 8, device=device).half().requires_grad_()
    _check(x, hw=(6, 6), norm=_norm(72, torch.float32, device, bias=False), **STAGE12)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "geometry",
    [dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)), dict(kernel_size=2, stride=2, padding=0),
     dict(kernel_size=3, stride=1, padding=2), dict(kernel_size=5, stride=3, padding=0)],
)  # fmt: skip
def test_other_geometries(geometry, device):
    """Rectangular kernels, non-overlapping windows, padding wider than the stride, uncovered pixels."""
    x = torch.randn(2, 3, 11, 10, device=device).requires_grad_()
    _check(x, **geometry)
    _check(x, norm=_norm(_features(x, None, geometry["kernel_size"]), torch.float32, device), **geometry)


@pytest.mark.interpreter
def test_layouts_read_in_place(device):
    """channels_last images, tokens from a (B, C, L) buffer (transposed) and tokens sliced from a wider buffer."""
    img = torch.randn(2, 4, 9, 9, device=device).to(memory_format=torch.channels_last).requires_grad_()
    _check(img, norm=_norm(36, torch.float32, device), **STAGE12)
    tokens_t = torch.randn(2, 4, 81, device=device).transpose(1, 2).requires_grad_()  # (B, L, C), stride(1) == 1
    _check(tokens_t, hw=(9, 9), **STAGE12)
    wide = torch.randn(2, 81, 12, device=device)
    tokens_s = wide[:, :, 2:6].requires_grad_()
    _check(tokens_s, hw=(9, 9), norm=_norm(36, torch.float32, device), **STAGE12)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", kernel_backends("soft_split", gpu_mark_cuda=True))
def test_strided_and_expanded_norm_parameters(backend, device):
    # The kernels read norm_weight / norm_bias as dense vectors: a stride-2 weight and a stride-0
    # (expanded) bias must give the reference tokens and gradients in the views' own shapes.
    x = torch.randn(1, 8, 4, 4, device=device).requires_grad_()
    features = _features(x, None, STAGE12["kernel_size"])
    nw = (1 + 0.5 * torch.randn(2 * features, device=device)).requires_grad_()[::2]
    nb = (0.5 * torch.randn(1, device=device)).requires_grad_().expand(features)
    assert nw.stride() == (2,) and nb.stride() == (0,)
    _check(x, norm=(nw, nb), backend=backend, **STAGE12)


@pytest.mark.interpreter
def test_only_norm_gradients(device):
    """The first T2T stage: the image needs no gradient, the fused LayerNorm's parameters do."""
    x = torch.randn(1, 3, 12, 12, device=device)
    nw, nb = _norm(147, torch.float32, device)
    y = ops.soft_split(x, norm_weight=nw, norm_bias=nb, backend="triton", **STAGE0)
    got = torch.autograd.grad(y.sum(), (nw, nb))
    want = torch.autograd.grad(soft_split_ref(x, norm_weight=nw, norm_bias=nb, **STAGE0).sum(), (nw, nb))
    for g, e, name in zip(got, want, ("dnorm_weight", "dnorm_bias")):
        assert_close(g, e, torch.float32, scale=GRAD_TOLERANCE_SCALE, name=name)


@pytest.mark.interpreter
def test_zero_batch(device):
    x = torch.randn(0, 16, 4, device=device, requires_grad=True)
    nw, nb = _norm(36, torch.float32, device)
    y = ops.soft_split(x, hw=(4, 4), norm_weight=nw, norm_bias=nb, backend="triton", **STAGE12)
    assert y.shape == (0, 4, 36)
    dx, dw = torch.autograd.grad(y.sum(), (x, nw))
    assert dx.shape == x.shape and (dw == 0).all()


@pytest.mark.interpreter
def test_autocast_keeps_dtype(device):
    x = torch.randn(1, 16, 4, device=device)
    nw, nb = (t.detach() for t in _norm(36, torch.float32, device))
    with torch.autocast(device.type, dtype=torch.float16):
        y = ops.soft_split(x, hw=(4, 4), norm_weight=nw, norm_bias=nb, backend="triton", **STAGE12)
    assert y.dtype == torch.float32
    assert_close(y, soft_split_ref(x, hw=(4, 4), norm_weight=nw, norm_bias=nb, **STAGE12), torch.float32)


def test_reference_is_unfold_transpose():
    """The spec: nn.Unfold(k, s, p)(x).transpose(1, 2); tokens go through T2T's transpose + reshape."""
    x = torch.randn(2, 3, 20, 20)
    want = nn.Unfold(kernel_size=7, stride=4, padding=2)(x).transpose(1, 2)
    torch.testing.assert_close(soft_split_ref(x, **STAGE0), want, rtol=0, atol=0)
    tokens = torch.randn(2, 49, 8)
    image = tokens.transpose(1, 2).reshape(2, 8, 7, 7)
    want = nn.LayerNorm(72)(nn.Unfold(kernel_size=3, stride=2, padding=1)(image).transpose(1, 2))
    ln = nn.LayerNorm(72)
    got = soft_split_ref(tokens, hw=(7, 7), norm_weight=ln.weight, norm_bias=ln.bias, **STAGE12)
    torch.testing.assert_close(got, want)


def test_torch_backend_is_the_reference():
    x = torch.randn(2, 16, 4)
    nw, nb = (t.detach() for t in _norm(36, torch.float32, "cpu"))
    got = ops.soft_split(x, hw=(4, 4), norm_weight=nw, norm_bias=nb, backend="torch", **STAGE12)
    assert torch.equal(got, soft_split_ref(x, hw=(4, 4), norm_weight=nw, norm_bias=nb, **STAGE12))
    assert torch.equal(ops.soft_split(x, hw=(4, 4), **STAGE12), soft_split_ref(x, hw=(4, 4), **STAGE12))


@pytest.mark.interpreter
def test_opcheck(device):
    x = torch.randn(2, 16, 4, device=device)
    nw, nb = (t.detach() for t in _norm(36, torch.float32, device))
    kernel = [3, 3, 2, 2, 1, 1]
    torch.library.opcheck(_soft_split_fwd, (x, [4, 4], kernel, nw, nb, 1e-5, "triton"))
    image = x.transpose(1, 2).reshape(2, 4, 4, 4)
    torch.library.opcheck(_soft_split_fwd, (image, [], kernel, None, None, 1e-5, "triton"))
    _, mean, rstd = _soft_split_fwd(x, [4, 4], kernel, nw, nb, 1e-5, "triton")
    dy = torch.randn(8, 36, device=device)
    torch.library.opcheck(_soft_split_bwd, (dy, x, [4, 4], kernel, nw, mean, rstd, True, True, True, "triton"))


@pytest.mark.interpreter
def test_compile_fullgraph(device):
    """One opaque node for Dynamo, forward and backward: no graph break, same values as eager."""
    x = torch.randn(2, 16, 4, device=device, requires_grad=True)
    nw, nb = _norm(36, torch.float32, device)

    def f(x, nw, nb):
        return ops.soft_split(x, hw=(4, 4), norm_weight=nw, norm_bias=nb, backend="triton", **STAGE12) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        y = fn(x, nw, nb)
        results.append((y, *torch.autograd.grad(y.sum(), (x, nw, nb))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.randn(2, 16, 4), {}, ValueError, r"x must be a \(B, C, H, W\) image, or \(B, L, C\) tokens with hw"),
        (torch.randn(2, 16, 4), {"hw": (4, 5)}, ValueError, r"L = H \* W = 20 for hw=\(4, 5\)"),
        (torch.randn(2, 16, 4), {"hw": (4, 0)}, ValueError, "hw must be a pair of positive ints"),
        (torch.randn(1, 3, 2, 2), {"kernel_size": 7, "padding": 2, "stride": 4}, ValueError,
         r"kernel_size \(7, 7\) is larger than the padded image \(6x6\)"),
        (torch.randn(1, 3, 8, 8), {"stride": 0}, ValueError, "stride must be an int >= 1"),
        (torch.randn(1, 3, 8, 8), {"padding": -1}, ValueError, "padding must be an int >= 0"),
        (torch.randn(1, 3, 8, 8), {"norm_weight": torch.ones(26)}, ValueError,
         r"norm_weight must have shape \(27,\) = C \* kh \* kw"),
        (torch.randn(1, 3, 8, 8), {"norm_bias": torch.ones(27)}, ValueError, "norm_bias was given without norm_weight"),
        (torch.randn(1, 3, 8, 8), {"norm_weight": torch.ones(27), "norm_bias": torch.ones(27).half()}, ValueError,
         "norm_bias must match norm_weight"),
        (torch.randn(1, 3, 8, 8).half(), {"norm_weight": torch.ones(27, dtype=torch.bfloat16)}, TypeError,
         "norm_weight dtype torch.bfloat16 must be x's dtype"),
        (torch.randn(1, 3, 8, 8), {"norm_weight": torch.ones(27), "norm_eps": 0.0}, ValueError, "norm_eps must be > 0"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int64), {}, TypeError, "x must be float32, float16 or bfloat16"),
        (torch.randn(1, 3, 8, 8), {"norm_weight": torch.ones(27, device="meta")}, ValueError, "different devices"),
        (torch.randn(1, 3, 8, 8), {"backend": "tpu"}, ValueError, "unknown backend"),
    ],
)  # fmt: skip
def test_bad_inputs(x, kwargs, error, match):
    kwargs = {**STAGE12, **kwargs}
    with pytest.raises(error, match=match):
        ops.soft_split(x, **kwargs)


def test_triton_refuses_batches_past_the_grid_limit():
    """The backward's fold puts the batch on CUDA's z axis (at most 65535 blocks)."""
    from fastvit.ops.soft_split import _triton_reasons

    assert _triton_reasons(x=torch.empty(65535, 3, 8, 8, device="meta"), channels=3, window=9) == []
    x = torch.randn(1, 3, 8, 8).expand(65536, 3, 8, 8)  # no 65536-image allocation
    assert _triton_reasons(x=x, channels=3, window=9) == [
        "batch 65536 exceeds 65535, the CUDA grid's z limit the Triton backward launches images on; split the batch"
    ]
    with pytest.raises(ops.BackendNotSupported, match="batch 65536 exceeds 65535"):
        ops.soft_split(x, backend="triton", **STAGE12)


def test_cuda_backend_refuses_cpu_tensors():
    """The cuda backend's kernels (csrc/) are tested by the GPU matrices below; the extension itself
    (entry points, argument checks, launchers' marshalling) in tests/test_ext_kernels.py."""
    with pytest.raises(ops.BackendNotSupported, match="the 'cuda' backend needs CUDA tensors"):
        ops.soft_split(torch.randn(1, 3, 8, 8), backend="cuda", **STAGE12)


# ------------------------------------------------------------------------------------ GPU matrix

# The T2T-ViT soft splits at 224: image 3x224x224 -> 3136 x 147; tokens 64x56x56 -> 784 x 576;
# tokens 64x28x28 -> 196 x 576; and the first split at 384 (96x96 -> 9216 tokens, > 4096).
GPU_CASES = [((3, 224, 224), None, STAGE0), ((3136, 64), (56, 56), STAGE12), ((784, 64), (28, 28), STAGE12),
             ((3, 384, 384), None, STAGE0)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("shape, hw, geometry", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fused_norm", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("backend", kernel_backends("soft_split"))
def test_gpu_t2t_shapes(shape, hw, geometry, dtype, fused_norm, batch, backend):
    cuda = torch.device("cuda")
    x = torch.randn(batch, *shape, device=cuda).to(dtype).requires_grad_()
    features = _features(x, hw, geometry["kernel_size"])
    _check(x, hw=hw, norm=_norm(features, dtype, cuda) if fused_norm else None, backend=backend, **geometry)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, hw, geometry", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", kernel_backends("soft_split"))
def test_gpu_fp32_norm_weights_half_tokens(shape, hw, geometry, dtype, backend):
    """The AMP layout at the T2T sizes: fp32 LayerNorm parameters beside bf16 / fp16 tokens."""
    cuda = torch.device("cuda")
    x = torch.randn(8, *shape, device=cuda).to(dtype).requires_grad_()
    features = _features(x, hw, geometry["kernel_size"])
    _check(x, hw=hw, norm=_norm(features, torch.float32, cuda), backend=backend, **geometry)


# Geometries and layouts the T2T shapes do not reach: (input shape, hw, geometry, layout).
GPU_LAYOUT_CASES = [
    ((1, 5, 13, 11), None, dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0)), "channels_last"),  # ragged
    ((3, 4, 9, 10), None, dict(kernel_size=2, stride=3, padding=0), "nchw"),  # stride > kernel: unread pixels
    ((2, 35, 6), (5, 7), dict(kernel_size=4, stride=1, padding=2), "strided_tokens"),  # channel stride 2
]


def _layout_input(shape, layout, dtype, device):
    """A leaf of the given shape: contiguous, channels_last, or tokens whose channels have stride 2 (every
    other channel of a buffer twice as wide)."""
    if layout == "channels_last":
        x = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    elif layout == "strided_tokens":
        x = torch.randn((*shape[:-1], 2 * shape[-1]), device=device).to(dtype)[..., 1::2]
    else:
        x = torch.randn(shape, device=device).to(dtype)
    return x.requires_grad_()


@pytest.mark.gpu
@pytest.mark.parametrize("shape, hw, geometry, layout", GPU_LAYOUT_CASES)
@pytest.mark.parametrize("norm", ["none", "ln", "ln_fp32_weight"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", kernel_backends("soft_split"))
def test_gpu_ragged_geometries_and_layouts(shape, hw, geometry, layout, norm, dtype, backend):
    cuda = torch.device("cuda")
    x = _layout_input(shape, layout, dtype, cuda)
    assert layout != "strided_tokens" or x.stride(-1) == 2
    assert layout != "channels_last" or x.stride(1) == 1
    features = _features(x, hw, geometry["kernel_size"])
    w_dtype = torch.float32 if norm == "ln_fp32_weight" else dtype
    _check(x, hw=hw, norm=_norm(features, w_dtype, cuda) if norm != "none" else None, backend=backend, **geometry)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_cuda_kernels_pass_memcheck():
    """One forward + backward of the cuda backend's kernels (gather + LayerNorm) under compute-sanitizer."""
    run_under_memcheck(
        """
x = torch.randn(2, 49, 8, device="cuda", dtype=torch.float16, requires_grad=True)
nw = torch.ones(72, device="cuda", dtype=torch.float16, requires_grad=True)
nb = torch.zeros(72, device="cuda", dtype=torch.float16, requires_grad=True)
for norm in ((nw, nb), (None, None)):
    y = ops.soft_split(x, hw=(7, 7), kernel_size=3, stride=2, padding=1, norm_weight=norm[0], norm_bias=norm[1],
                       backend="cuda")
    torch.autograd.grad(y, [t for t in (x, *norm) if t is not None], torch.randn_like(y))
"""
    )


@pytest.mark.gpu
def test_gpu_deterministic():
    cuda = torch.device("cuda")
    x = torch.randn(16, 3136, 64, device=cuda).half().requires_grad_()
    nw, nb = _norm(576, torch.float16, cuda)
    runs = []
    for _ in range(2):
        y = ops.soft_split(x, hw=(56, 56), norm_weight=nw, norm_bias=nb, backend="triton", **STAGE12)
        runs.append((y, *torch.autograd.grad(y, (x, nw, nb), torch.ones_like(y))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)

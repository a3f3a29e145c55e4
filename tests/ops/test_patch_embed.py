"""ops.patch_embed: output and every gradient by the three-way rule, on each backend available.

The kernel's error against the fp64 reference (``patch_embed_ref`` on fp64 copies) must be at most 2x
(output) / 3x (gradients) the error of the same torch computation (conv2d + flatten + cat + add) in
the kernel's dtype, plus the dtype's rounding floor (fastvit.testing.assert_three_way). Without a GPU
the Triton kernels run under the interpreter on small images in fp32 and fp16; bf16, the real ViT
sizes, the cuda backend (csrc/) on every case of the GPU matrices and its compute-sanitizer run are
marked ``gpu``. The reference itself is checked against timm's PatchEmbed + _pos_embed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastvit import ops
from fastvit.ops.patch_embed import _patch_embed_bwd, _patch_embed_fwd, patch_embed_ref
from fastvit.testing import assert_three_way, poisoned_outputs
from tests.ops.backends import all_backends, kernel_backends, run_under_memcheck

GRAD_NAMES = ("dx", "dweight", "dbias", "dpos_embed", "dprefix_tokens")


def _inputs(B, C, H, W, D, patch, dtype, device, *, bias=True, prefix=1, pos="all", channels_last=False):
    """Fresh random leaves; the weight scaled by 1/sqrt(C p p) so the tokens have unit-size values.

    pos: "all" (P + N rows, timm's class-token default), "patches" (N rows, no_embed_class) or None."""
    Hp, Wp = -(-H // patch), -(-W // patch)
    x = torch.randn(B, C, H, W, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(D, C, patch, patch, device=device) * (C * patch * patch) ** -0.5).to(dtype)
    b = (0.5 * torch.randn(D, device=device)).to(dtype) if bias else None
    pre = torch.randn(1, prefix, D, device=device).to(dtype) if prefix else None
    rows = {"all": prefix + Hp * Wp, "patches": Hp * Wp}.get(pos)
    p = (0.5 * torch.randn(1, rows, D, device=device)).to(dtype) if rows else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b, p, pre)]


def _run(fn, leaves, dy, cast=None):
    """fn(*leaves) and the gradients of <fn, dy> for every leaf that is not None (leaves cast first if asked)."""
    leaves = [t if t is None else (t.detach().to(cast) if cast else t.detach()).requires_grad_() for t in leaves]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype))
    return y, grads


def _tf32(t):
    """t rounded to TF32's 10 mantissa bits (round to nearest even), as the tensor cores read fp32 operands."""
    if t is None:
        return None
    bits = t.detach().float().contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & -0x2000
    return bits.view(torch.float32)


@contextlib.contextmanager
def _tf32_convs(enabled):
    """The kernel runs fp32 through TF32 exactly when cuDNN's conv may (allow_tf32); pin that on for it."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def _check(backend, leaves, patch, *, pad=False):
    """Three-way check of the tokens and every gradient: kernel vs fp64 reference vs torch in x's dtype.

    fp32 on the GPU runs on TF32 tensor cores, and whether cuDNN's own fp32 conv does is its choice, so
    the low-precision side there is the fp64 computation on TF32-rounded GEMM operands (image, weight and
    the upstream gradient): the rounding TF32 products make, exactly."""
    x, w, b, p, pre = leaves
    names = [n for n, t in zip(GRAD_NAMES, leaves) if t is not None]

    def kernel(x, w, b, p, pre):
        return ops.patch_embed(x, w, b, patch_size=patch, pos_embed=p, prefix_tokens=pre, pad=pad, backend=backend)

    def reference(x, w, b, p, pre):
        return patch_embed_ref(x, w, b, patch_size=patch, pos_embed=p, prefix_tokens=pre, pad=pad)

    Hp, Wp = -(-x.shape[2] // patch), -(-x.shape[3] // patch)
    P = pre.shape[1] if pre is not None else 0
    dy = torch.randn(x.shape[0], P + Hp * Wp, w.shape[0], device=x.device)
    tf32 = x.device.type == "cuda" and x.dtype == torch.float32
    with _tf32_convs(tf32), poisoned_outputs():
        y, grads = _run(kernel, leaves, dy)
    if tf32:
        y_lp, grads_lp = _run(reference, [_tf32(x), _tf32(w), b, p, pre], _tf32(dy), cast=torch.float64)
    else:
        y_lp, grads_lp = _run(reference, leaves, dy)
    y_ref, grads_ref = _run(reference, leaves, dy, cast=torch.float64)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], P + Hp * Wp, w.shape[0])
    assert_three_way(y, y_ref, y_lp, factor=2.0, name="tokens")
    for name, g, g_ref, g_lp, leaf in zip(names, grads, grads_ref, grads_lp, [t for t in leaves if t is not None]):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{name}: {g.dtype}{list(g.shape)}"
        assert_three_way(g, g_ref, g_lp, factor=3.0, name=name)


# ------------------------------------------------------------------------------ interpreter / GPU


@pytest.mark.interpreter
@pytest.mark.parametrize("patch, size", [(14, 28), (16, 32), (32, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(patch, size, dtype, device):
    """The ViT patch sizes at 2x2 grids; D = 24 is a partial column tile; a class token and P + N positions."""
    _check("triton", _inputs(2, 3, size, size, 24, patch, dtype, device), patch)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "bias, prefix, pos",
    [(True, 0, None), (False, 0, "patches"), (True, 2, "all"), (True, 1, "patches"), (False, 2, None)],
)
def test_prefix_and_position_variants(bias, prefix, pos, device):
    """No extras; positions only; cls + dist with P + N positions (distilled DeiT); cls with N positions
    (no_embed_class); prefix without positions."""
    _check("triton", _inputs(3, 4, 16, 24, 20, 8, torch.float32, device, bias=bias, prefix=prefix, pos=pos), 8)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_ragged_image(dtype, device):
    """30 x 21 with patch 8 and pad=True: a 4 x 3 grid whose last row/column read zero padding."""
    _check("triton", _inputs(2, 3, 30, 21, 16, 8, dtype, device), 8, pad=True)


@pytest.mark.interpreter
def test_channels_last_and_strided_weight(device):
    """A channels_last image and a channels_last conv weight are read in place (no copy on the kernel path)."""
    x, w, b, p, pre = _inputs(2, 5, 16, 16, 24, 8, torch.float32, device, channels_last=True)
    w = w.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert x.stride(1) == 1 and w.stride(1) == 1
    _check("triton", [x, w, b, p, pre], 8)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "row_strided"])
def test_patch_1_projection_of_feature_maps(layout, device):
    """The hybrid models' 1x1 projection (patch 1 on a CNN feature map): NCHW and channels_last maps
    take the flat-pixel path; a map cut from a wider one (rows not mergeable) takes the general one."""
    x, w, b, p, pre = _inputs(2, 40, 4, 5, 24, 1, torch.float32, device, channels_last=layout == "channels_last")
    if layout == "row_strided":
        x = torch.randn(2, 40, 4, 8, device=device)[..., 1:6].requires_grad_()
    _check("triton", [x, w, b, p, pre], 1)


@pytest.mark.interpreter
def test_image_grad_not_requested(device):
    """The usual case (the image needs no gradient): the parameters' gradients alone, no dx kernel."""
    x, w, b, p, pre = _inputs(2, 3, 16, 16, 16, 8, torch.float32, device)
    x = x.detach()
    y = ops.patch_embed(x, w, b, patch_size=8, pos_embed=p, prefix_tokens=pre, backend="triton")
    dw, db = torch.autograd.grad(y.sum(), (w, b))
    y_ref = patch_embed_ref(x, w, b, patch_size=8, pos_embed=p, prefix_tokens=pre)
    dw_ref, db_ref = torch.autograd.grad(y_ref.sum(), (w, b))
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, db_ref)


@pytest.mark.interpreter
def test_zero_batch(device):
    x, w, b, p, pre = _inputs(0, 3, 16, 16, 16, 8, torch.float32, device)
    y = ops.patch_embed(x, w, b, patch_size=8, pos_embed=p, prefix_tokens=pre, backend="triton")
    assert y.shape == (0, 5, 16)
    dw, db, dp = torch.autograd.grad(y.sum(), (w, b, p))
    assert (dw == 0).all() and (db == 0).all() and (dp == 0).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", [b for b in all_backends("patch_embed") if b != "cuda"])
@pytest.mark.parametrize("image_dtype", [torch.float32, torch.float16])
def test_autocast_lowers_like_conv(backend, image_dtype, device):
    """fp32 parameters (and an fp32 or fp16 image) under autocast(float16) run in fp16 and return fp16 on
    both backends, as the conv does; the parameters' gradients come back in fp32."""
    x, w, b, p, pre = _inputs(2, 3, 16, 16, 16, 8, torch.float32, device)
    x = x.detach().to(image_dtype)
    with torch.autocast(device.type, dtype=torch.float16):
        y = ops.patch_embed(x, w, b, patch_size=8, pos_embed=p, prefix_tokens=pre, backend=backend)
        assert F.conv2d(x, w, b, stride=8).dtype == torch.float16
    assert y.dtype == torch.float16
    grads = torch.autograd.grad(y.float().sum(), (w, b, p, pre))
    assert all(g.dtype == torch.float32 for g in grads)
    lowered = [t.detach().half() for t in (x, w, b, p, pre)]

    def ref(x, w, b, p, pre):
        return patch_embed_ref(x, w, b, patch_size=8, pos_embed=p, prefix_tokens=pre)

    assert_three_way(y, ref(*[t.double() for t in lowered]), ref(*lowered), name="tokens under autocast")


def test_reference_matches_timm():
    """The spec expresses timm's PatchEmbed + _pos_embed: class-token models (cat, then + pos over all
    tokens), no_embed_class models (+ pos, then cat), distilled DeiT (cls + dist) and dynamic_img_pad."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    common = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=24, depth=0, num_heads=2, num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    cases = [
        (VisionTransformer(**common), lambda m: m.cls_token),
        (VisionTransformer(**common, no_embed_class=True), lambda m: m.cls_token),
        (VisionTransformerDistilled(**common), lambda m: torch.cat([m.cls_token, m.dist_token], 1)),
        (VisionTransformer(**common, class_token=False, global_pool="avg"), lambda m: None),
    ]
    for model, prefix in cases:
        torch.nn.init.normal_(model.pos_embed)
        with torch.no_grad():
            want = model._pos_embed(model.patch_embed(x))
            got = patch_embed_ref(
                x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, patch_size=8,
                pos_embed=model.pos_embed, prefix_tokens=prefix(model),
            )  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    padded = VisionTransformer(**common, dynamic_img_size=True, dynamic_img_pad=True).patch_embed
    x_odd = torch.randn(2, 3, 30, 21)
    with torch.no_grad():
        want = padded(x_odd).flatten(1, 2)  # NHWC grid from dynamic_img_size
        got = patch_embed_ref(x_odd, padded.proj.weight, padded.proj.bias, patch_size=8, pad=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_backend_is_the_reference():
    x, w, b, p, pre = (t.detach() for t in _inputs(2, 3, 16, 16, 8, 8, torch.float32, "cpu"))
    got = ops.patch_embed(x, w, b, patch_size=(8, 8), pos_embed=p, prefix_tokens=pre, backend="torch")
    assert torch.equal(got, patch_embed_ref(x, w, b, patch_size=8, pos_embed=p, prefix_tokens=pre))


def test_auto_on_cpu_uses_torch():
    x, w, b, _, _ = (t.detach() if t is not None else None for t in _inputs(1, 3, 16, 16, 8, 8, torch.float32, "cpu"))
    assert torch.equal(ops.patch_embed(x, w, b, patch_size=8), patch_embed_ref(x, w, b, patch_size=8))


@pytest.mark.interpreter
def test_opcheck(device):
    x, w, b, p, pre = (t.detach() for t in _inputs(2, 3, 16, 16, 16, 8, torch.float32, device, prefix=2))
    torch.library.opcheck(_patch_embed_fwd, (x, w, b, p[0], pre[0], "triton"))
    dout = torch.randn(2, 6, 16, device=device)
    torch.library.opcheck(_patch_embed_bwd, (dout, x, w, 2, True, True, "triton"))


@pytest.mark.interpreter
def test_compile_fullgraph(device):
    """One opaque node for Dynamo, forward and backward: no graph break, same values as eager."""
    leaves = _inputs(2, 3, 16, 16, 16, 8, torch.float32, device)

    def f(x, w, b, p, pre):
        return ops.patch_embed(x, w, b, patch_size=8, pos_embed=p, prefix_tokens=pre, backend="triton") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    dy = torch.ones(2, 5, 16, device=device)
    got, got_grads = _run(compiled, leaves, dy)
    want, want_grads = _run(f, leaves, dy)
    torch.testing.assert_close(got, want)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e)


def test_triton_refuses_images_past_int32_offsets():
    from fastvit.ops.patch_embed import _triton_reasons

    big = torch.empty(1, 3, 30000, 30000, device="meta")  # 2.7e9 elements in one image
    reasons = _triton_reasons(x=big, weight=torch.empty(8, 3, 16, 16, device="meta"))
    assert reasons == ["one image of x spans 2^31 elements or more; the Triton kernel addresses within it in int32"]
    assert _triton_reasons(x=torch.empty(64, 3, 224, 224, device="meta"), weight=torch.empty(8, 3, 16, 16)) == []


def test_triton_refuses_batches_past_the_grid_limit():
    """The forward and dx grids put the batch on CUDA's y axis (at most 65535 blocks)."""
    from fastvit.ops.patch_embed import _triton_reasons

    weight = torch.randn(8, 3, 16, 16)
    assert _triton_reasons(x=torch.empty(65535, 3, 16, 16, device="meta"), weight=weight) == []
    x = torch.randn(1, 3, 16, 16).expand(65536, 3, 16, 16)  # no 65536-image allocation
    assert _triton_reasons(x=x, weight=weight) == [
        "batch 65536 exceeds 65535, the CUDA grid's y limit the Triton kernels launch images on; split the batch"
    ]
    with pytest.raises(ops.BackendNotSupported, match="batch 65536 exceeds 65535"):
        ops.patch_embed(x, weight, None, patch_size=16, backend="triton")


_STUBBED_PATCH_EMBED = """
import json
from fastvit.kernels import _common, patch_embed as kp

real_capturing = _common.graph_capturing


def run(capturing):
    _common.graph_capturing = (lambda t: True) if capturing else real_capturing
    x = torch.randn(2, 3, 32, 32, dtype=torch.float16)
    w = torch.randn(64, 3, 16, 16, dtype=torch.float16)
    out = torch.randn(2, 4, 64, dtype=torch.float16)
    kp.patch_embed_fwd(x, w, None, None, None, out)
    kp.patch_embed_dx(out, w, 0, torch.empty_like(x))
    kp.patch_embed_dweight(out, x, w, 0)
    launched = [(name, meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]) for name, meta in LAUNCHED]
    LAUNCHED.clear()
    return launched, len(BENCHED)


report = {}
for phase, capturing in (("capture_unseen", True), ("eager", False), ("capture_seen", True)):
    with _common.compile_target(86):  # the CPU tensors' prune answers for sm_86: 99 KB per block
        report[phase] = run(capturing)
print(json.dumps(report))
"""


def test_autotuning_and_graph_capture_on_the_gpu_path():
    """Runs the real launchers with GPU config lists (benchmark and kernel launch stubbed, see
    tests/ops/triton_stubs.py): eager launches autotune through Triton's prune calling convention; inside a
    CUDA-graph capture nothing is benchmarked (trial launches would be recorded into the graph): keys not
    tuned yet launch the first config that fits shared memory, tuned keys their chosen config."""
    import json

    from tests.ops.triton_stubs import run_stubbed

    report = json.loads(run_stubbed(_STUBBED_PATCH_EMBED).splitlines()[-1])
    kernels = ["_patch_embed_fwd_kernel", "_patch_embed_dx_kernel", "_patch_embed_dweight_kernel"]
    # fp16 against sm_86's 99 KB limit (the prune asks compile_target for CPU tensors): the first config whose
    # staged tiles fit, per kernel.
    first_fit = [[k, *tile] for k, tile in zip(kernels, [(128, 128, 64), (128, 64, 64), (64, 128, 64)])]
    assert report["capture_unseen"] == [first_fit, 0]
    eager, trials = report["eager"]
    assert trials > 3 and [e[0] for e in eager] == kernels
    # The stub makes later trials faster, so eager picks a config other than the first fit ...
    assert eager != first_fit
    # ... and a capture afterwards launches exactly that one, still without a trial.
    assert report["capture_seen"] == [eager, trials]


# ------------------------------------------------------------------------------------ bad inputs


def _img(*shape, **kw):
    return torch.randn(*shape, **kw)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((_img(1, 3, 30, 32), _img(8, 3, 16, 16), None), {}, ValueError,
         "image size 30x32 is not a multiple of patch_size 16; pass pad=True"),
        ((_img(1, 3, 32, 32), _img(8, 3, 14, 14), None), {}, ValueError,
         r"weight must be the conv weight \(D, 3, 16, 16\)"),
        ((_img(1, 4, 32, 32), _img(8, 3, 16, 16), None), {}, ValueError,
         r"weight must be the conv weight \(D, 4, 16, 16\)"),
        ((_img(3, 32, 32), _img(8, 3, 16, 16), None), {}, ValueError, r"x must be a \(B, C, H, W\) image"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16), _img(7)), {}, ValueError, r"bias must have shape \(8,\)"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16), None), {"pos_embed": _img(1, 5, 8)}, ValueError,
         r"pos_embed must have shape \(1, R, 8\) or \(R, 8\) with R = 4 for a 2x2 grid"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16), None), {"prefix_tokens": _img(1, 1, 8), "pos_embed": _img(1, 6, 8)},
         ValueError, "with R = 4 or 5 for a 2x2 grid and 1 prefix tokens"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16), None), {"prefix_tokens": _img(2, 1, 8)}, ValueError,
         r"prefix_tokens must have shape \(P, 8\) or \(1, P, 8\)"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16, dtype=torch.float16), None), {}, TypeError,
         "weight dtype torch.float16 must equal x's dtype torch.float32"),
        ((torch.zeros(1, 3, 32, 32, dtype=torch.int32), _img(8, 3, 16, 16), None), {}, TypeError,
         "x must be float32, float16 or bfloat16"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16, device="meta"), None), {}, ValueError, "different devices"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16), None), {"patch_size": (16, 8)}, ValueError,
         "non-square patches"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16), None), {"patch_size": 0}, TypeError,
         "patch_size must be a positive int"),
        ((_img(1, 3, 32, 32), _img(8, 3, 16, 16), None), {"backend": "tpu"}, ValueError, "unknown backend"),
    ],
)  # fmt: skip
def test_bad_inputs(args, kwargs, error, match):
    kwargs = {"patch_size": 16, **kwargs}
    with pytest.raises(error, match=match):
        ops.patch_embed(*args, **kwargs)


def test_cuda_backend_refuses_cpu_tensors():
    """The cuda backend's kernels (csrc/) are tested by the GPU matrices below; the extension itself
    (entry points, argument checks, launchers' marshalling) in tests/test_ext_kernels.py."""
    with pytest.raises(ops.BackendNotSupported, match="the 'cuda' backend needs CUDA tensors"):
        ops.patch_embed(torch.randn(1, 3, 16, 16), torch.randn(8, 3, 16, 16), None, patch_size=16, backend="cuda")


# ------------------------------------------------------------------------------------ GPU matrix

# (C, image, patch, D): ViT-B/16 @224 and @384, ViT-B/32, ViT-L/16, ViT-H/14, DeiT-S/16, a ragged padded case,
# and the R50+ViT-B/16 hybrid's 1x1 projection of the 1024-channel 1/16 feature map at 384 and 224.
GPU_SHAPES = [(3, 224, 16, 768), (3, 384, 16, 768), (3, 224, 32, 768), (3, 224, 16, 1024), (3, 224, 14, 1280),
              (3, 224, 16, 384), (3, 230, 16, 768), (1024, 24, 1, 768), (1024, 14, 1, 768)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("C, size, patch, D", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("backend", kernel_backends("patch_embed"))
def test_gpu_matrix(C, size, patch, D, dtype, batch, backend):
    leaves = _inputs(batch, C, size, size, D, patch, dtype, torch.device("cuda"), prefix=1 if D != 384 else 2)
    _check(backend, leaves, patch, pad=size % patch != 0)


@pytest.mark.gpu
@pytest.mark.parametrize("pos", ["all", "patches"])
@pytest.mark.parametrize("backend", kernel_backends("patch_embed"))
def test_gpu_channels_last_bf16(pos, backend):
    leaves = _inputs(4, 3, 224, 224, 768, 16, torch.bfloat16, torch.device("cuda"), pos=pos, channels_last=True)
    _check(backend, leaves, 16)


# Prefix / position / layout variants on small images: (B, C, H, W, D, patch, bias, prefix, pos, channels_last).
GPU_VARIANTS = [
    (2, 3, 32, 32, 64, 16, True, 0, None, False),  # no prefix, no positions
    (3, 3, 48, 32, 96, 16, True, 1, "all", False),  # non-square image; class token, pos over cls + patches
    (1, 3, 32, 32, 80, 8, True, 2, "patches", True),  # distilled DeiT with no_embed_class, channels_last
    (5, 4, 30, 27, 64, 8, True, 1, "patches", False),  # ragged: zero-padded right / bottom, C = 4
    (2, 3, 40, 24, 48, 8, False, 2, None, True),  # no bias, prefix without positions, channels_last
]


@pytest.mark.gpu
@pytest.mark.parametrize("B, C, H, W, D, patch, bias, prefix, pos, channels_last", GPU_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", kernel_backends("patch_embed"))
def test_gpu_prefix_position_layout(B, C, H, W, D, patch, bias, prefix, pos, channels_last, dtype, backend):
    cuda = torch.device("cuda")
    leaves = _inputs(B, C, H, W, D, patch, dtype, cuda, bias=bias, prefix=prefix, pos=pos, channels_last=channels_last)
    _check(backend, leaves, patch, pad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_cuda_pos_gemm_answer_is_cached(dtype):
    """cuda backend: the pos-embed GEMM has a stride-0 addend that cuBLASLt may reject (NOT_SUPPORTED / no
    result), and then patch_embed_fwd adds the pos-embed in its own kernel. Either answer is cached per
    problem, so the second call takes the cached path and must give the first call's tokens bit for bit."""
    x, w, b, p, pre = (t.detach() for t in _inputs(2, 3, 32, 32, 64, 16, dtype, torch.device("cuda"), prefix=1))
    tf32 = dtype == torch.float32  # fp32 runs on TF32 tensor cores, as _check explains
    outs = []
    for _ in range(2):
        with _tf32_convs(tf32), poisoned_outputs():
            outs.append(ops.patch_embed(x, w, b, patch_size=16, pos_embed=p, prefix_tokens=pre, backend="cuda"))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)

    def reference(x, w, cast):
        return patch_embed_ref(*(t.to(cast) for t in (x, w, b)), patch_size=16, pos_embed=p.to(cast),
                               prefix_tokens=pre.to(cast))  # fmt: skip

    low = reference(_tf32(x), _tf32(w), torch.float64) if tf32 else reference(x, w, dtype)
    assert_three_way(outs[0], reference(x, w, torch.float64), low, factor=2.0, name="tokens")


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_cuda_kernels_pass_memcheck():
    """One forward + backward of the cuda backend's kernels (im2col, cuBLASLt GEMMs with the prefix / pos
    epilogue, col2im) under compute-sanitizer, on a ragged padded bf16 image."""
    run_under_memcheck(
        """
bf = torch.bfloat16
x = torch.randn(2, 3, 30, 27, device="cuda", dtype=bf, requires_grad=True)
w = torch.randn(64, 3, 8, 8, device="cuda", dtype=bf, requires_grad=True)
b, cls, pos = (torch.randn(s, device="cuda", dtype=bf, requires_grad=True) for s in ((64,), (1, 64), (17, 64)))
y = ops.patch_embed(x, w, b, patch_size=8, pos_embed=pos, prefix_tokens=cls, pad=True, backend="cuda")
torch.autograd.grad(y, (x, w, b, pos, cls), torch.randn_like(y))
"""
    )


@pytest.mark.gpu
def test_gpu_deterministic():
    leaves = _inputs(16, 3, 224, 224, 768, 16, torch.bfloat16, torch.device("cuda"))
    runs = []
    for _ in range(2):
        y = ops.patch_embed(*leaves[:3], patch_size=16, pos_embed=leaves[3], prefix_tokens=leaves[4], backend="triton")
        runs.append((y, *torch.autograd.grad(y, leaves, torch.ones_like(y))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)

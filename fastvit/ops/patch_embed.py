"""Patch embedding: a convolution with kernel = stride = patch, flattened to tokens, with the class /
distillation tokens prepended and the position embedding added, as one GEMM.

Math, for an image x (B, C, H, W), conv weight (D, C, p, p), grid Hp x Wp, N = Hp * Wp::

    patches = conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)        # (B, N, D)
    tokens  = cat([prefix_tokens.expand(B, P, D), patches], dim=1)                # (B, P + N, D)
    pos_embed with P + N rows (timm's default, class_token models):  tokens + pos_embed
    pos_embed with N rows (timm's ``no_embed_class``, DeiT III):     prefix rows get no position
    pos_embed with N rows and P == 0: the two rules agree.

The number of pos_embed rows decides which rule applies, so one call expresses timm's ``_pos_embed``
for both kinds of model. The output is ``(B, P + N, D)`` in x's dtype; bias, pos_embed and the prefix
are added to the fp32 accumulator and rounded once (torch rounds after the conv and again after the add).

Images that are not a multiple of the patch: ``pad=True`` zero-pads right and bottom to the next
multiple, as timm's ``dynamic_img_pad`` does (the kernel reads the padding as zeros, no padded copy);
``pad=False`` (timm's ``strict_img_size``) refuses them.

Gradients: dweight = sum over (b, patch) of dout_patch^T im2col(x) (Triton, fp32 partials);
dx = dout_patch @ W scattered back into the image layout (Triton; the patches do not overlap, so no
atomics); dbias, dpos_embed and dprefix_tokens are sums of dout over the batch (one torch reduction
of dout to fp32, a memory-bound pass that torch already does at bandwidth).

Dtypes: fp32, fp16, bf16; every input in x's dtype. fp32 on a GPU goes through TF32 tensor cores when
``torch.backends.cudnn.allow_tf32`` is set (torch's default for convolutions), exactly like the conv
it replaces. Under autocast the op lowers all its floating inputs to the autocast dtype, as a conv
does, on every backend, and returns that dtype (timm's eager composition under autocast returns fp32
here, because ``torch.cat`` promotes the fp16 conv output with the fp32 class token).

Backends and auto order on CUDA tensors: ``triton`` > ``cuda`` > ``torch``. Provisional: neither kernel has been
timed on an H100/H200 yet (benchmarks/bench_patch_embed.py will set this order).
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import kernels
from fastvit._geometry import patch_grid
from fastvit.ops import _cuda_backends as _cuda
from fastvit.ops._library import (
    FLOAT_DTYPES,
    autocast_dtype,
    check_tensors,
    direct,
    eager_op,
    new_output,
    register_autocast_lower,
)
from fastvit.ops._selftest_spec import SelftestSpec, normal
from fastvit.ops._validate import check_call
from fastvit.ops.dispatch import ENV_KEY, OpDispatcher, env_get, is_compiling, no_reasons

if kernels.TRITON_IMPORT_ERROR is None:
    from fastvit.kernels import patch_embed as _triton_kernels

__all__ = ["patch_embed", "patch_embed_ref"]

_OP = "fastvit.ops.patch_embed"


def patch_embed_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    *,
    patch_size: int,
    pos_embed: Optional[Tensor] = None,
    prefix_tokens: Optional[Tensor] = None,
    pad: bool = False,
) -> Tensor:
    """The specification, in plain torch (timm's PatchEmbed + ``_pos_embed`` composition).

    Shapes as in :func:`patch_embed`; inputs are assumed valid. Computes in x's dtype (pass fp32/fp64
    tensors for an oracle)."""
    B, _, H, W = x.shape
    Hp, Wp = patch_grid(H, W, patch_size)
    if pad and (Hp * patch_size != H or Wp * patch_size != W):
        x = F.pad(x, (0, Wp * patch_size - W, 0, Hp * patch_size - H))
    tokens = F.conv2d(x, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    N, D = tokens.shape[1], tokens.shape[2]
    pos = pos_embed.reshape(-1, D) if pos_embed is not None else None
    if pos is not None and pos.shape[0] == N:
        tokens = tokens + pos
    if prefix_tokens is not None:
        prefix = prefix_tokens.reshape(-1, D)
        tokens = torch.cat([prefix.unsqueeze(0).expand(B, -1, -1), tokens], dim=1)
    if pos is not None and pos.shape[0] != N:
        tokens = tokens + pos
    return tokens


# ---------------------------------------------------------------------------------------- checks


def _patch_size(patch_size: object) -> int:
    if isinstance(patch_size, (tuple, list)) and len(patch_size) == 2:
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"{_OP}: non-square patches {tuple(patch_size)} are not supported; use a square patch")
        patch_size = patch_size[0]
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise TypeError(f"{_OP}: patch_size must be a positive int (or a pair of equal ints), got {patch_size!r}")
    return patch_size


def _check_inputs(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], patch: int, pos_embed: Optional[Tensor],
    prefix_tokens: Optional[Tensor], pad: bool,
) -> None:  # fmt: skip
    named = {"x": x, "weight": weight, "bias": bias, "pos_embed": pos_embed, "prefix_tokens": prefix_tokens}
    check_tensors(_OP, named)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{_OP}: {name} dtype {t.dtype} must equal x's dtype {x.dtype} (cast the parameters, or run under "
                "torch.autocast, which lowers every input like a conv)"
            )
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be a (B, C, H, W) image, got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if weight.dim() != 4 or weight.shape[1] != C or weight.shape[2] != patch or weight.shape[3] != patch:
        raise ValueError(
            f"{_OP}: weight must be the conv weight (D, {C}, {patch}, {patch}) for {C} input channels and "
            f"patch_size {patch}, got shape {tuple(weight.shape)}"
        )
    D = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"{_OP}: bias must have shape ({D},), got {tuple(bias.shape)}")
    if H == 0 or W == 0:
        raise ValueError(f"{_OP}: x has an empty image ({H}x{W})")
    if not pad and (H % patch or W % patch):
        raise ValueError(
            f"{_OP}: image size {H}x{W} is not a multiple of patch_size {patch}; pass pad=True to zero-pad "
            "right/bottom as timm's dynamic_img_pad does, or resize the image"
        )
    P = 0
    if prefix_tokens is not None:
        if not (prefix_tokens.dim() == 2 or (prefix_tokens.dim() == 3 and prefix_tokens.shape[0] == 1)) or (
            prefix_tokens.shape[-1] != D
        ):
            raise ValueError(
                f"{_OP}: prefix_tokens must have shape (P, {D}) or (1, P, {D}) (e.g. timm's cls_token), "
                f"got {tuple(prefix_tokens.shape)}"
            )
        P = prefix_tokens.shape[-2]
    if pos_embed is not None:
        Hp, Wp = patch_grid(H, W, patch)
        N = Hp * Wp
        rows = (N, N + P) if P else (N,)
        ok_dims = pos_embed.dim() == 2 or (pos_embed.dim() == 3 and pos_embed.shape[0] == 1)
        if not ok_dims or pos_embed.shape[-1] != D or pos_embed.shape[-2] not in rows:
            want = " or ".join(str(r) for r in rows)
            raise ValueError(
                f"{_OP}: pos_embed must have shape (1, R, {D}) or (R, {D}) with R = {want} for a {Hp}x{Wp} grid and "
                f"{P} prefix tokens, got {tuple(pos_embed.shape)}; resample it to the grid first "
                "(timm.layers.resample_abs_pos_embed)"
            )


# -------------------------------------------------------------------------------------- backends


def _triton_reasons(x: Tensor, weight: Tensor, **_: object) -> List[str]:
    if kernels.TRITON_IMPORT_ERROR is not None:
        return []
    regions = {"image of x": (x.shape[1:], x.stride()[1:]), "weight": (weight.shape, weight.stride())}
    reasons = [
        f"one {name} spans 2^31 elements or more; the Triton kernel addresses within it in int32"
        for name, (sizes, strides) in regions.items()
        if not _triton_kernels.int32_extent_ok(tuple(sizes), tuple(strides))
    ]
    if x.shape[0] > _triton_kernels.MAX_BATCH:
        reasons.append(
            f"batch {x.shape[0]} exceeds {_triton_kernels.MAX_BATCH}, the CUDA grid's y limit the Triton kernels "
            "launch images on; split the batch"
        )
    return reasons


def _rows(t: Optional[Tensor], width: int) -> Optional[Tensor]:
    """A (1, R, D) / (R, D) parameter as a 2-D (R, D) view with a unit last stride."""
    if t is None:
        return None
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _out_shape(x: Tensor, weight: Tensor, prefix: Optional[Tensor]) -> Tuple[int, int, int]:
    Hp, Wp = patch_grid(x.shape[2], x.shape[3], weight.shape[2])
    return x.shape[0], (prefix.shape[0] if prefix is not None else 0) + Hp * Wp, weight.shape[0]


# ------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastvit::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor], prefix_tokens: Optional[Tensor],
    backend: str,
) -> Tensor:  # fmt: skip
    """x (B, C, H, W) any strides; weight (D, C, p, p); pos_embed (R, D) and prefix_tokens (P, D) with unit
    last strides. The grid is ceil(H / p) x ceil(W / p): the caller refused non-multiples unless padding."""
    out = new_output(_out_shape(x, weight, prefix_tokens), x)
    launch = _cuda.patch_embed_fwd if backend == "cuda" else _triton_kernels.patch_embed_fwd
    launch(x, weight, bias, pos_embed, prefix_tokens, out)
    return out


@_patch_embed_fwd.register_fake
def _(x, weight, bias, pos_embed, prefix_tokens, backend):
    return x.new_empty(_out_shape(x, weight, prefix_tokens))


@torch.library.custom_op("fastvit::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd(
    dout: Tensor, x: Tensor, weight: Tensor, num_prefix: int, need_dx: bool, need_dweight: bool, backend: str
) -> Tuple[Tensor, Tensor]:
    """Returns dx (x's shape, contiguous; empty unless need_dx) and dweight (empty unless need_dweight)."""
    if backend == "cuda":
        return _cuda.patch_embed_bwd(dout, x, weight, num_prefix, need_dx, need_dweight)
    dx = x.new_empty((0,))
    if need_dx:
        dx = new_output(x.shape, x)  # contiguous NCHW whatever x's layout; the kernel writes through strides
        _triton_kernels.patch_embed_dx(dout, weight, num_prefix, dx)
    dweight = weight.new_empty((0,))
    if need_dweight:
        dweight = _triton_kernels.patch_embed_dweight(dout, x, weight, num_prefix).to(weight.dtype)
    return dx, dweight


@_patch_embed_bwd.register_fake
def _(dout, x, weight, num_prefix, need_dx, need_dweight, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, weight.new_empty(weight.shape if need_dweight else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, pos_embed, prefix_tokens, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.num_prefix = prefix_tokens.shape[0] if prefix_tokens is not None else 0
    ctx.has_bias = bias is not None
    ctx.pos_rows = pos_embed.shape[0] if pos_embed is not None else 0
    ctx.backend = backend


def _backward(ctx, dout):
    x, weight = ctx.saved_tensors
    P = ctx.num_prefix
    dout = dout.contiguous()
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx = dweight = None
    if need_dx or need_dw:
        dx, dweight = _bwd(dout, x, weight, P, need_dx, need_dw, ctx.backend)
    # One fp32 pass over dout serves the bias, the position embedding and the prefix tokens.
    dsum = torch.sum(dout, dim=0, dtype=torch.float32) if any(ctx.needs_input_grad[2:5]) else None
    dbias = dsum[P:].sum(0).to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    dpos = None
    if ctx.pos_rows and ctx.needs_input_grad[3]:
        dpos = (dsum if ctx.pos_rows == dsum.shape[0] else dsum[P:]).to(x.dtype)
    dprefix = dsum[:P].to(x.dtype) if P and ctx.needs_input_grad[4] else None
    return dx if need_dx else None, dweight if need_dw else None, dbias, dpos, dprefix, None


_fwd = eager_op(_patch_embed_fwd, _setup_context, _backward)
_bwd = direct(_patch_embed_bwd)
register_autocast_lower(_patch_embed_fwd)


def _torch_launch(x, weight, bias, patch, pos_embed, prefix_tokens, pad):
    return patch_embed_ref(x, weight, bias, patch_size=patch, pos_embed=pos_embed, prefix_tokens=prefix_tokens, pad=pad)


def _kernel_launch(backend: str):
    def launch(x, weight, bias, patch, pos_embed, prefix_tokens, pad):
        D = weight.shape[0]
        return _fwd(x, weight, bias, _rows(pos_embed, D), _rows(prefix_tokens, D), backend)

    return launch


# The selftest's cases (fastvit/ops/_selftest_spec.py). label -> (image size, patch, embed dim).
_SELFTEST_SHAPES = {"vit_b16_224": (224, 16, 768), "vit_h14_224": (224, 14, 1280)}


def _selftest_problem(s: Dict[str, Any], dev: torch.device) -> Any:
    from fastvit import ops

    rn = normal(dev)
    B, S, P, D = s["B"], s["S"], s["P"], s["D"]
    tokens = (S // P) ** 2
    leaves = {
        "x": rn(B, 3, S, S),
        "weight": rn(D, 3, P, P, scale=(3 * P * P) ** -0.5),
        "bias": rn(D, scale=0.1),
        "pos_embed": rn(1, tokens + 1, D, scale=0.02),
        "cls": rn(1, 1, D, scale=0.02),
    }

    def pe(fn: Callable, t: Dict[str, Tensor], **kw: Any) -> Tensor:
        return fn(t["x"], t["weight"], t["bias"], patch_size=P, pos_embed=t["pos_embed"], prefix_tokens=t["cls"], **kw)

    return leaves, lambda t, b: pe(ops.patch_embed, t, backend=b), lambda t: pe(ops.patch_embed_ref, t)


def _selftest_conv(t: Dict[str, Tensor], s: Dict[str, Any]) -> Callable[[], Tensor]:
    def conv() -> Tensor:
        y = F.conv2d(t["x"], t["weight"], t["bias"], stride=s["P"]).flatten(2).transpose(1, 2)
        return torch.cat([t["cls"].expand(y.shape[0], -1, -1), y], 1) + t["pos_embed"]

    return conv


_SELFTEST = SelftestSpec(
    model_shapes=lambda batch: {k: {"B": batch, "S": s, "P": p, "D": d} for k, (s, p, d) in _SELFTEST_SHAPES.items()},
    small_shapes={"small": {"B": 1, "S": 32, "P": 16, "D": 32}},
    problem=_selftest_problem,
    rule="three_way",
    speed_shape="vit_b16_224",
    composition=_selftest_conv,
    work=lambda s, t, out: ("tflops", 2.0 * s["B"] * (s["S"] // s["P"]) ** 2 * 3 * s["P"] ** 2 * s["D"]),
    primary_shapes=("vit_b16_224",),
    cpu_torch_shapes=("vit_b16_224",),
    order=4,
)


_OP = OpDispatcher(
    name="patch_embed",
    reasons={"torch": no_reasons, "triton": _triton_reasons, "cuda": _cuda.patch_embed_reasons},
    preference=("triton", "cuda", "torch"),
    reference=patch_embed_ref,
    check=_check_inputs,
    forward_op=_patch_embed_fwd,
    backward_op=_patch_embed_bwd,
    autocast="lower",
    launchers={"torch": _torch_launch, "triton": _kernel_launch("triton"), "cuda": _kernel_launch("cuda")},
    selftest=_SELFTEST,
)
_MEMO = _OP._memo
_autocast_on = torch._C._is_any_autocast_enabled


# ------------------------------------------------------------------------------------ public API


def patch_embed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    *,
    patch_size: Union[int, Tuple[int, int]],
    pos_embed: Optional[Tensor] = None,
    prefix_tokens: Optional[Tensor] = None,
    pad: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """Patch embedding + prefix tokens + position embedding in one launch: ``(B, P + N, D)`` tokens.

    Args:
        x: (B, C, H, W) image, NCHW or channels_last (any strides; no copy is made), fp32 / fp16 / bf16.
        weight: (D, C, p, p) conv weight (timm's ``patch_embed.proj.weight``), x's dtype.
        bias: (D,) conv bias (``patch_embed.proj.bias``) or None.
        patch_size: p, the kernel size and stride (an int, or a pair of equal ints like timm's
            ``patch_embed.patch_size``).
        pos_embed: (1, R, D) or (R, D) position embedding, or None. R = P + N adds it to every token,
            prefix included (timm's class-token models: ``cat`` then ``+ pos_embed``); R = N adds it to
            the patch tokens only (timm's ``no_embed_class``: ``+ pos_embed`` then ``cat``).
        prefix_tokens: (P, D) or (1, P, D) tokens prepended to every image, e.g. timm's ``cls_token`` or
            ``torch.cat([cls_token, dist_token], 1)`` for distilled DeiT; None for no prefix.
        pad: zero-pad the image right/bottom to a multiple of p (timm's ``dynamic_img_pad``); when False,
            an image that is not a multiple of p raises ValueError.
        backend: None (``FASTVIT_BACKEND`` or auto), "torch", "triton" or "cuda".

    Returns:
        (B, P + N, D) tokens in x's dtype (under autocast: the autocast dtype), N = ceil(H/p) * ceil(W/p)
        in row-major patch order.

    Raises:
        TypeError / ValueError: bad dtypes, shapes, patch size or mixed devices, naming the input.
        fastvit.ops.dispatch.BackendNotSupported: an explicit backend cannot serve the input.
    """
    patch = patch_size if patch_size.__class__ is int and patch_size > 0 else _patch_size(patch_size)
    if _autocast_on():
        lowered = autocast_dtype(x.device) if isinstance(x, Tensor) else None
        if lowered is not None:
            # Like a conv under autocast, on every backend: all floating inputs in the autocast dtype (timm's
            # eager composition would instead promote the result back to fp32 in cat / + pos_embed).
            x, weight, bias, pos_embed, prefix_tokens = (
                t.to(lowered) if isinstance(t, Tensor) and t.is_floating_point() else t
                for t in (x, weight, bias, pos_embed, prefix_tokens)
            )
    key = chosen = pos_shape = prefix_shape = None
    if not is_compiling():  # traced: the full checks and select run (on values cached outside the trace)
        try:  # the signature: validation and the choice are cached per signature (patch: an exact int here)
            key = (
                (shape := x.shape), x.dtype, x.device, weight.shape, weight.dtype, weight.device, patch, pad,
                bias is None or bias.shape, bias is None or bias.dtype, bias is None or bias.device,
                pos_embed is None or (pos_shape := pos_embed.shape), pos_embed is None or pos_embed.dtype,
                pos_embed is None or pos_embed.device, prefix_tokens is None or (prefix_shape := prefix_tokens.shape),
                prefix_tokens is None or prefix_tokens.dtype, prefix_tokens is None or prefix_tokens.device,
                backend, env_get(ENV_KEY),
            )  # fmt: skip
            chosen = _MEMO.get(key)
        except (AttributeError, TypeError):  # not tensors / unhashable: the checks say what is wrong
            key = None
        if chosen.__class__ is not str:  # a measured (CUDA, auto) or autocast-only entry, or a miss
            chosen = _OP.slot(chosen, (x, weight, bias, pos_embed, prefix_tokens))
    if chosen is None:
        check_call(
            "fastvit.ops.patch_embed", {"x": x, "weight": weight}, optional={"bias": bias, "pos_embed": pos_embed}
        )
        _check_inputs(x, weight, bias, patch, pos_embed, prefix_tokens, pad)

        def run(b, x, weight, bias, pos_embed, prefix_tokens):
            return patch_embed(
                x, weight, bias, patch_size=patch, pos_embed=pos_embed, prefix_tokens=prefix_tokens, pad=pad, backend=b
            )

        chosen = _OP.resolve(
            key, backend, x.device, run, x=x, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens
        )
        shape = x.shape
        pos_shape = pos_embed.shape if pos_embed is not None else None
        prefix_shape = prefix_tokens.shape if prefix_tokens is not None else None
    if chosen == "torch":  # the common CPU case: patch_embed_ref inlined (bit-identical), fewer autograd nodes
        B, _, H, W = shape
        if not (H % patch or W % patch):  # no padding
            tokens = F.conv2d(x, weight, bias, patch).flatten(2).transpose(1, 2)
            if prefix_tokens is None:
                return tokens if pos_embed is None else tokens + pos_embed
            # (1, P, D) / (P, D) prefix tokens and (1, R, D) / (R, D) pos_embed broadcast as they are
            prefix = prefix_tokens if B == 1 and len(prefix_shape) == 3 else prefix_tokens.expand(B, -1, -1)
            if pos_embed is None:
                return torch.cat([prefix, tokens], 1)
            if pos_shape[-2] == (H // patch) * (W // patch):  # pos_embed for the patch tokens only
                return torch.cat([prefix, tokens + pos_embed], 1)
            return torch.cat([prefix, tokens], 1) + pos_embed
    return _OP.launchers[chosen](x, weight, bias, patch, pos_embed, prefix_tokens, pad)

"""T2T-ViT soft split: ``nn.Unfold`` + transpose, optionally fused with the LayerNorm that follows it.

Math, for an image x (B, C, H, W), kernel k, stride s, zero padding p (each an int or an (h, w) pair)::

    Ho = (H + 2p - k) // s + 1,  Wo likewise,  L = Ho * Wo,  F = C * k * k
    u[b, oh * Wo + ow, c * k * k + ki * k + kj] = x[b, c, oh * s - p + ki, ow * s - p + kj]   (0 outside)
    u == nn.Unfold(k, s, p)(x).transpose(1, 2)                         # (B, L, F)
    with norm_weight: returns layer_norm(u, norm_weight, norm_bias, norm_eps) over the F features
    (the zero padding counts in the statistics, exactly as unfold-then-LayerNorm does).

Token input: T2T stages pass (B, L, C) tokens with their grid ``hw=(H, W)``, L = H * W; the op reads
them as the image ``x.transpose(1, 2).reshape(B, C, H, W)`` through strides, without the copy that
reshape would make. T2T geometries: 7/4/2 on 3x224x224 -> 3136 x 147; 3/2/1 on 64x56x56 -> 784 x 576;
3/2/1 on 64x28x28 -> 196 x 576.

Gradients: the fold (each pixel gathers the <= ceil(k/s)^2 outputs that read it; deterministic, no
atomics), with the LayerNorm backward folded into it when fused; dnorm_weight = sum(dy * xhat),
dnorm_bias = sum(dy) over all rows.

Dtypes: fp32, fp16, bf16; the output keeps x's dtype (also under autocast: an unfold and a
LayerNorm do no arithmetic worth lowering). LayerNorm statistics in fp32; norm_weight / norm_bias are
x's dtype or fp32.

Backends and auto order on CUDA tensors: ``triton`` > ``cuda`` > ``torch``. Provisional: neither kernel has been
timed on an H100/H200 yet (benchmarks/bench_soft_split.py will set this order).
"""

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import kernels
from fastvit._geometry import int_pair, unfold_grid
from fastvit.ops import _cuda_backends as _cuda
from fastvit.ops._library import FLOAT_DTYPES, check_tensors, direct, eager_op, new_output, register_autocast_keep_dtype
from fastvit.ops._selftest_spec import SelftestSpec, bytes_moved, normal
from fastvit.ops._validate import check_call
from fastvit.ops.dispatch import ENV_KEY, OpDispatcher, env_get, is_compiling, no_reasons
from fastvit.ops.layer_norm import check_affine, layer_norm_ref

if kernels.TRITON_IMPORT_ERROR is None:
    from fastvit.kernels import soft_split as _triton_kernels

__all__ = ["soft_split", "soft_split_ref"]

_OP = "fastvit.ops.soft_split"
IntPair = Union[int, Tuple[int, int]]


def soft_split_ref(
    x: Tensor,
    *,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    hw: Optional[Tuple[int, int]] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
) -> Tensor:
    """The specification, in plain torch: (token ->) image, ``F.unfold``, transpose (, LayerNorm).

    Shapes as in :func:`soft_split`; inputs are assumed valid. Computes in x's dtype."""
    if hw is not None:
        B, L, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
    u = F.unfold(x, kernel_size, padding=padding, stride=stride).transpose(1, 2)
    if norm_weight is not None:
        u = layer_norm_ref(u, norm_weight, norm_bias, norm_eps)
    return u


# ---------------------------------------------------------------------------------------- checks


def _pair(value: object, name: str, minimum: int) -> Tuple[int, int]:
    def error(v: object) -> Exception:
        return ValueError(f"{_OP}: {name} must be an int >= {minimum} or a pair of them, got {v!r}")

    return int_pair(value, error, minimum=minimum)


def _geometry(x: Tensor, hw: Optional[Sequence[int]]) -> Tuple[Tuple[int, int, int, int], Tuple[int, int, int, int]]:
    """(B, C, H, W) and the (b, c, h, w) strides through which x reads as an image (no copy)."""
    if not hw:
        return tuple(x.shape), tuple(x.stride())  # type: ignore[return-value]
    B, _, C = x.shape
    H, W = hw
    s_b, s_l, s_c = x.stride()
    return (B, C, H, W), (s_b, s_c, W * s_l, s_l)


def _check_inputs(
    x: Tensor, hw: Optional[Sequence[int]], kernel: Tuple[int, ...], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], norm_eps: float,
) -> int:  # fmt: skip
    """Validates everything; returns F, the features per output row."""
    check_tensors(_OP, {"x": x, "norm_weight": norm_weight, "norm_bias": norm_bias})
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if hw is None:
        if x.dim() != 4:
            raise ValueError(
                f"{_OP}: x must be a (B, C, H, W) image, or (B, L, C) tokens with hw=(H, W); got shape "
                f"{tuple(x.shape)} without hw"
            )
    else:
        if (
            not isinstance(hw, (tuple, list)) or len(hw) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw)
        ):  # fmt: skip
            raise ValueError(f"{_OP}: hw must be a pair of positive ints (H, W), got {hw!r}")
        if x.dim() != 3 or x.shape[1] != hw[0] * hw[1]:
            raise ValueError(
                f"{_OP}: token input must have shape (B, L, C) with L = H * W = {hw[0] * hw[1]} for hw={tuple(hw)}, "
                f"got {tuple(x.shape)}"
            )
    (_, C, H, W), _ = _geometry(x, hw)
    kh, kw, sh, sw, ph, pw = kernel
    if H + 2 * ph < kh or W + 2 * pw < kw:
        raise ValueError(
            f"{_OP}: kernel_size ({kh}, {kw}) is larger than the padded image ({H + 2 * ph}x{W + 2 * pw}); "
            "no output position fits"
        )
    features = C * kh * kw
    if norm_bias is not None and norm_weight is None:
        raise ValueError(f"{_OP}: norm_bias was given without norm_weight; pass both to fuse the LayerNorm")
    if norm_weight is not None:
        why = f"= C * kh * kw for C={C} and kernel ({kh}, {kw})"
        check_affine(_OP, norm_weight, norm_bias, features, x.dtype, why, names=("norm_weight", "norm_bias"))
        if not norm_eps > 0:
            raise ValueError(f"{_OP}: norm_eps must be > 0, got {norm_eps}")
    return features


# -------------------------------------------------------------------------------------- backends


def _triton_reasons(x: Tensor, channels: int, window: int, **_: object) -> List[str]:
    reasons: List[str] = []
    if kernels.TRITON_IMPORT_ERROR is None:
        padded = _triton_kernels.padded_row_elements(channels, window)
        if padded > _triton_kernels.MAX_TILE:
            reasons.append(
                f"a row of {channels} channels x {window} window positions pads to {padded} elements, over the "
                f"Triton kernel's {_triton_kernels.MAX_TILE}"
            )
        if x.shape[0] > _triton_kernels.MAX_BATCH:
            reasons.append(
                f"batch {x.shape[0]} exceeds {_triton_kernels.MAX_BATCH}, the CUDA grid's z limit the Triton "
                "backward launches images on; split the batch"
            )
    return reasons


def _out_shape(x: Tensor, hw: Sequence[int], kernel: Sequence[int]) -> Tuple[int, int]:
    (B, C, H, W), _ = _geometry(x, hw)
    kh, kw = kernel[:2]
    return B * math.prod(unfold_grid(H, W, kernel)), C * kh * kw


# ------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastvit::soft_split_fwd", mutates_args=())
def _soft_split_fwd(
    x: Tensor, hw: List[int], kernel: List[int], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
    eps: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """x: (B, C, H, W) with hw == [], or (B, L, C) tokens with hw == [H, W]; kernel = [kh, kw, sh, sw, ph, pw].
    Returns the (B * L_out, F) rows and, with LayerNorm, their fp32 mean and rstd (else empty)."""
    geometry, strides = _geometry(x, hw)
    y = new_output(_out_shape(x, hw, kernel), x)
    has_ln = norm_weight is not None
    mean = new_output((y.shape[0] if has_ln else 0,), x, torch.float32)
    rstd = new_output((y.shape[0] if has_ln else 0,), x, torch.float32)
    launch = _cuda.soft_split_fwd if backend == "cuda" else _triton_kernels.soft_split_fwd
    launch(
        x, strides, geometry, tuple(kernel), norm_weight, norm_bias, eps, y, mean if has_ln else None,
        rstd if has_ln else None,
    )  # fmt: skip
    return y, mean, rstd


@_soft_split_fwd.register_fake
def _(x, hw, kernel, norm_weight, norm_bias, eps, backend):
    rows, features = _out_shape(x, hw, kernel)
    stats = rows if norm_weight is not None else 0
    return (
        x.new_empty((rows, features)), x.new_empty((stats,), dtype=torch.float32),
        x.new_empty((stats,), dtype=torch.float32),
    )  # fmt: skip


@torch.library.custom_op("fastvit::soft_split_bwd", mutates_args=())
def _soft_split_bwd(
    dy: Tensor, x: Tensor, hw: List[int], kernel: List[int], norm_weight: Optional[Tensor], mean: Tensor,
    rstd: Tensor, has_bias: bool, need_dx: bool, need_dnorm: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns dx (x's shape, contiguous; empty unless need_dx) and, with LayerNorm and need_dnorm, the
    gradients of norm_weight and norm_bias (else empty)."""
    geometry, strides = _geometry(x, hw)
    kernel_t = tuple(kernel)
    if backend == "cuda":
        dx, dx_strides = None, None
        if need_dx:
            dx = new_output(x.shape, x)
            _, dx_strides = _geometry(dx, hw)
        dweight, dbias = _cuda.soft_split_bwd(
            dy, x, strides, geometry, kernel_t, norm_weight, mean, rstd, has_bias, need_dnorm, dx, dx_strides
        )
        return dx if dx is not None else x.new_empty((0,)), dweight, dbias
    stats = None
    dweight, dbias = x.new_empty((0,)), x.new_empty((0,))
    if norm_weight is not None:
        c1, c2, dw_part, db_part = _triton_kernels.soft_split_ln_bwd_stats(
            dy, x, strides, geometry, kernel_t, norm_weight, mean, rstd, has_bias
        )
        stats = (mean, rstd, c1, c2)
        if need_dnorm:
            dweight = dw_part.sum(0).to(norm_weight.dtype)
            dbias = db_part.sum(0).to(norm_weight.dtype) if db_part is not None else dbias
    dx = x.new_empty((0,))
    if need_dx:
        dx = new_output(x.shape, x)
        _, dx_strides = _geometry(dx, hw)
        _triton_kernels.soft_split_bwd(dy, x, strides, geometry, kernel_t, dx, dx_strides, norm_weight, stats)
    return dx, dweight, dbias


@_soft_split_bwd.register_fake
def _(dy, x, hw, kernel, norm_weight, mean, rstd, has_bias, need_dx, need_dnorm, backend):
    dx = x.new_empty(x.shape if need_dx else (0,))
    ln_grads = norm_weight is not None and need_dnorm
    dweight = x.new_empty(norm_weight.shape, dtype=norm_weight.dtype) if ln_grads else x.new_empty((0,))
    dbias = x.new_empty(norm_weight.shape, dtype=norm_weight.dtype) if ln_grads and has_bias else x.new_empty((0,))
    return dx, dweight, dbias


def _setup_context(ctx, inputs, output) -> None:
    x, hw, kernel, norm_weight, norm_bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, norm_weight, mean, rstd)
    ctx.hw, ctx.kernel, ctx.backend = hw, kernel, backend
    ctx.has_bias = norm_bias is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, norm_weight, mean, rstd = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dnorm = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    if not need_dx and not need_dnorm:
        return None, None, None, None, None, None, None
    dx, dweight, dbias = _bwd(
        dy.contiguous(), x, ctx.hw, ctx.kernel, norm_weight, mean, rstd, ctx.has_bias, need_dx, need_dnorm,
        ctx.backend,
    )  # fmt: skip
    return (
        dx if need_dx else None, None, None,
        dweight if norm_weight is not None and ctx.needs_input_grad[3] else None,
        dbias if ctx.has_bias and ctx.needs_input_grad[4] else None, None, None,
    )  # fmt: skip


_fwd = eager_op(_soft_split_fwd, _setup_context, _backward)
_bwd = direct(_soft_split_bwd)
register_autocast_keep_dtype(_soft_split_fwd)


def _torch_launch(x, hw, kernel, norm_weight, norm_bias, norm_eps, features):
    kh, kw, sh, sw, ph, pw = kernel
    return soft_split_ref(
        x, kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw), hw=hw, norm_weight=norm_weight,
        norm_bias=norm_bias, norm_eps=norm_eps,
    )  # fmt: skip


def _kernel_launch(backend: str):
    def launch(x, hw, kernel, norm_weight, norm_bias, norm_eps, features):
        hw_list = list(hw) if hw else []
        (_, _, H, W), _ = _geometry(x, hw_list)
        tokens = math.prod(unfold_grid(H, W, kernel))
        # The kernels index norm_weight / norm_bias as dense (F,) vectors: a strided or expanded (stride 0) one
        # is copied here (a no-op when already contiguous; differentiable, so grads keep the caller's shapes).
        norm_weight = norm_weight.contiguous() if norm_weight is not None else None
        norm_bias = norm_bias.contiguous() if norm_bias is not None else None
        y, _, _ = _fwd(x, hw_list, list(kernel), norm_weight, norm_bias, float(norm_eps), backend)
        return y.view(x.shape[0], tokens, features)

    return launch


# The selftest's cases (fastvit/ops/_selftest_spec.py). label -> input ((C, H, W) image or (L, C) tokens with
# hw), kernel, stride, padding, fused LayerNorm.
_SELFTEST_SHAPES = {
    "t2t_split0_image": {"image": (3, 224, 224), "k": 7, "s": 4, "p": 2, "norm": True},
    "t2t_split1_tokens": {"tokens": (3136, 64), "hw": (56, 56), "k": 3, "s": 2, "p": 1, "norm": True},
    "t2t_split2_tokens": {"tokens": (784, 64), "hw": (28, 28), "k": 3, "s": 2, "p": 1, "norm": False},
}


def _selftest_problem(s: Dict[str, Any], dev: torch.device) -> Any:
    from fastvit import ops

    rn = normal(dev)
    B, k, st, p = s["B"], s["k"], s["s"], s["p"]
    if "image" in s:
        x, hw, channels = rn(B, *s["image"]), None, s["image"][0]
    else:
        x, hw, channels = rn(B, *s["tokens"]), tuple(s["hw"]), s["tokens"][1]
    leaves = {"x": x}
    features = channels * k * k
    if s["norm"]:
        leaves.update(norm_weight=1 + rn(features, scale=0.1), norm_bias=rn(features, scale=0.1))

    def ss(fn: Callable, t: Dict[str, Tensor], **kw: Any) -> Tensor:
        return fn(
            t["x"], kernel_size=k, stride=st, padding=p, hw=hw, norm_weight=t.get("norm_weight"),
            norm_bias=t.get("norm_bias"), **kw,
        )  # fmt: skip

    return leaves, lambda t, b: ss(ops.soft_split, t, backend=b), lambda t: ss(ops.soft_split_ref, t)


def _selftest_unfold(t: Dict[str, Tensor], s: Dict[str, Any]) -> Callable[[], Tensor]:
    features = t["norm_weight"].numel()  # the speed shape (T2T stage 0) has the fused LayerNorm
    return lambda: F.layer_norm(
        F.unfold(t["x"], s["k"], stride=s["s"], padding=s["p"]).transpose(1, 2), (features,), t["norm_weight"],
        t["norm_bias"],
    )  # fmt: skip


_SELFTEST = SelftestSpec(
    model_shapes=lambda batch: {k: {"B": batch, **v} for k, v in _SELFTEST_SHAPES.items()},
    small_shapes={
        "small_image": {"B": 1, "image": (3, 12, 12), "k": 7, "s": 4, "p": 2, "norm": True},
        "small_tokens": {"B": 1, "tokens": (64, 8), "hw": (8, 8), "k": 3, "s": 2, "p": 1, "norm": False},
    },
    problem=_selftest_problem,
    rule="table",
    speed_shape="t2t_split0_image",
    composition=_selftest_unfold,
    work=lambda s, t, out: bytes_moved(t, out),
    primary_shapes=("t2t_split0_image",),
    cpu_torch_shapes=("t2t_split2_tokens",),
    order=5,
)


_OP = OpDispatcher(
    name="soft_split",
    reasons={"torch": no_reasons, "triton": _triton_reasons, "cuda": _cuda.soft_split_reasons},
    preference=("triton", "cuda", "torch"),
    reference=soft_split_ref,
    check=_check_inputs,
    forward_op=_soft_split_fwd,
    backward_op=_soft_split_bwd,
    autocast="keep",
    launchers={"torch": _torch_launch, "triton": _kernel_launch("triton"), "cuda": _kernel_launch("cuda")},
    selftest=_SELFTEST,
)


# ------------------------------------------------------------------------------------ public API

_MEMO = _OP._memo
# signature key -> (kernel, features) of a call that passed the checks (a function of the key alone)
_PLANS: Dict[Any, Tuple[List[int], int]] = {}


def soft_split(
    x: Tensor,
    *,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    hw: Optional[Tuple[int, int]] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    backend: Optional[str] = None,
) -> Tensor:
    """T2T soft split: ``nn.Unfold(kernel_size, stride, padding)(x).transpose(1, 2)``, optionally followed
    by a fused LayerNorm over the ``C * k * k`` features of each output token.

    Args:
        x: (B, C, H, W) image (NCHW or channels_last), or (B, L, C) tokens with ``hw``; fp32 / fp16 /
            bf16; any strides (no copy is made for either layout).
        kernel_size: k, an int or (kh, kw).
        stride: s, an int or (sh, sw).
        padding: zero padding p, an int or (ph, pw).
        hw: (H, W) grid of token input (L = H * W, row-major as T2T's ``reshape``); None for an image.
        norm_weight: (C * kh * kw,) LayerNorm weight (x's dtype or fp32) to fuse, or None.
        norm_bias: LayerNorm bias like norm_weight, or None (only with norm_weight).
        norm_eps: LayerNorm epsilon; T2T-ViT's ``nn.LayerNorm`` default is 1e-5.
        backend: None (``FASTVIT_BACKEND`` or auto), "torch", "triton" or "cuda".

    Returns:
        (B, L_out, C * kh * kw) in x's dtype, L_out = Ho * Wo in row-major order.

    Raises:
        TypeError / ValueError: bad dtypes, shapes, geometry or mixed devices, naming the input.
        fastvit.ops.dispatch.BackendNotSupported: an explicit backend cannot serve the input.
    """
    key = chosen = None
    # The signature: validation (shapes, dtypes, devices only) and the choice are cached per signature. Only
    # for exactly-typed geometry (True == 1 and 8.0 == 8 would otherwise share a key with a valid call), and
    # not while traced (the full checks and select run then, on values cached outside the trace).
    if (
        type(kernel_size) is int and type(stride) is int and type(padding) is int and type(norm_eps) is float
        and (hw is None or (type(hw) is tuple and len(hw) == 2 and type(hw[0]) is int and type(hw[1]) is int))
        and not is_compiling()
    ):  # fmt: skip
        try:
            key = (
                (shape := x.shape), x.dtype, x.device, kernel_size, stride, padding, hw, norm_eps,
                norm_weight is None or norm_weight.shape, norm_weight is None or norm_weight.dtype,
                norm_weight is None or norm_weight.device, norm_bias is None or norm_bias.shape,
                norm_bias is None or norm_bias.dtype, norm_bias is None or norm_bias.device, backend, env_get(ENV_KEY),
            )  # fmt: skip
            chosen = _MEMO.get(key)
        except (AttributeError, TypeError):  # not tensors / unhashable: the checks say what is wrong
            key = None
        if chosen.__class__ is not str:  # a measured (CUDA, auto) or autocast-only entry, or a miss
            chosen = _OP.slot(chosen, (x, norm_weight, norm_bias))
    if chosen is not None:
        if chosen == "torch" and norm_weight is None:  # soft_split_ref inlined: what F.unfold calls, on int geometry
            if hw is not None:
                B, L, C = shape
                x = x.transpose(1, 2).reshape(B, C, hw[0], hw[1])
            return torch._C._nn.im2col(x, kernel_size, 1, padding, stride).transpose(1, 2)
        kernel, features = _PLANS[key]
        return _OP.launchers[chosen](x, hw, kernel, norm_weight, norm_bias, norm_eps, features)
    (kh, kw), (sh, sw) = _pair(kernel_size, "kernel_size", 1), _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    kernel = [kh, kw, sh, sw, ph, pw]
    check_call("fastvit.ops.soft_split", {"x": x}, optional={"norm_weight": norm_weight}, eps={"norm_eps": norm_eps})
    features = _check_inputs(x, hw, tuple(kernel), norm_weight, norm_bias, norm_eps)

    def run(b, x, norm_weight, norm_bias, **_):
        return soft_split(
            x, kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw), hw=hw, norm_weight=norm_weight,
            norm_bias=norm_bias, norm_eps=norm_eps, backend=b,
        )  # fmt: skip

    inputs = dict(
        x=x, norm_weight=norm_weight, norm_bias=norm_bias, hw=hw, channels=features // (kh * kw), window=kh * kw
    )
    if key is not None:
        _PLANS[key] = (kernel, features)
    chosen = _OP.resolve(key, backend, x.device, run, **inputs)
    return _OP.launchers[chosen](x, hw, kernel, norm_weight, norm_bias, norm_eps, features)

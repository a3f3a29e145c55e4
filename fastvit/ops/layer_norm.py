"""LayerNorm over the last dimension, with an optional fused residual add.

Math (statistics in fp32, output in x's dtype)::

    z    = x + residual                   # in x's dtype: the transformer's residual stream
    y    = (z - mean(z)) / sqrt(var(z) + eps) * weight + bias
    returns y                             # residual is None
    returns (y, z)                        # from one pass over memory

Gradients: dz = rstd * (w*dy - xhat*mean(w*dy*xhat) - mean(w*dy)) + dz_out is both dx and dresidual;
dweight = sum_rows(dy * xhat), dbias = sum_rows(dy).

Dtypes: x and residual share a dtype (fp32, fp16 or bf16); weight and bias are that dtype or fp32
(the AMP case of fp32 parameters and low-precision activations). Under autocast the op keeps x's
dtype (``F.layer_norm`` would return fp32).

Backends: ``torch`` (``F.layer_norm``), ``triton``, ``cuda``. On CUDA tensors auto dispatch times the
eligible ones per key (fastvit.ops.dispatch); the static order ``triton`` > ``cuda`` > ``torch`` is
unmeasured (dispatch.STATIC_ORDER_SOURCE). The measured key buckets the row count (every leading dimension
together) to a power of two: rows are independent and identical work, so the winner is set by the width,
dtype and the order of magnitude of the rows.
"""

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import kernels
from fastvit.kernels._common import rows_view
from fastvit.ops import _cuda_backends as _cuda
from fastvit.ops._library import (
    FLOAT_DTYPES,
    check_tensors,
    direct,
    eager_op,
    new_output,
    register_autocast_keep_dtype,
)
from fastvit.ops._selftest_spec import SelftestSpec, bytes_moved, normal
from fastvit.ops._validate import check_call
from fastvit.ops.dispatch import ENV_KEY, OpDispatcher, bucket, env_get, is_compiling, no_reasons

if kernels.TRITON_IMPORT_ERROR is None:
    from fastvit.kernels import layer_norm as _triton_kernels

__all__ = ["check_affine", "layer_norm", "layer_norm_ref"]


def layer_norm_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    eps: float = 1e-6,
    residual: Optional[Tensor] = None,
    *,
    upcast: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The specification, in plain torch. ``upcast=True`` computes everything in fp32 and returns fp32
    (the oracle tests compare against); otherwise y and z come back in x's dtype."""
    if upcast:
        x = x.float()
        residual = residual.float() if residual is not None else None
    z = x if residual is None else x + residual
    shape = (z.shape[-1],)
    if weight.dtype == z.dtype:
        y = F.layer_norm(z, shape, weight, bias, eps)
    else:
        y = F.layer_norm(z.float(), shape, weight.float(), bias.float() if bias is not None else None, eps)
    if y.dtype != z.dtype:
        y = y.to(z.dtype)  # autocast runs F.layer_norm in fp32; the op keeps the input dtype
    return y if residual is None else (y, z)


# ---------------------------------------------------------------------------------------- checks


def check_affine(
    op: str, weight: Tensor, bias: Optional[Tensor], width: int, x_dtype: torch.dtype, why: str,
    names: Tuple[str, str] = ("weight", "bias"),
) -> None:  # fmt: skip
    """A LayerNorm's (width,) weight and bias: x's dtype or fp32, the bias matching the weight.
    Shared by every op that normalises (``why`` explains the expected width in the error)."""
    w_name, b_name = names
    if weight.dim() != 1 or weight.shape[0] != width:
        raise ValueError(f"{op}: {w_name} must have shape ({width},) {why}, got {tuple(weight.shape)}")
    if weight.dtype not in (x_dtype, torch.float32):
        raise TypeError(f"{op}: {w_name} dtype {weight.dtype} must be x's dtype ({x_dtype}) or float32")
    if bias is not None and (bias.shape != weight.shape or bias.dtype != weight.dtype):
        raise ValueError(
            f"{op}: {b_name} must match {w_name} (shape {tuple(weight.shape)}, {weight.dtype}), "
            f"got shape {tuple(bias.shape)}, {bias.dtype}"
        )


def _check_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float) -> None:
    check_tensors("fastvit.ops.layer_norm", {"x": x, "weight": weight, "bias": bias, "residual": residual})
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastvit.ops.layer_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"fastvit.ops.layer_norm: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_affine("fastvit.ops.layer_norm", weight, bias, x.shape[-1], x.dtype, "to match x's last dimension")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"fastvit.ops.layer_norm: residual shape {tuple(residual.shape)} must equal x's shape {tuple(x.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"fastvit.ops.layer_norm: residual dtype {residual.dtype} must equal x's dtype {x.dtype}")
    if not eps > 0:
        raise ValueError(f"fastvit.ops.layer_norm: eps must be > 0, got {eps}")


# -------------------------------------------------------------------------------------- backends


def _triton_reasons(x: Tensor, **_: object) -> list[str]:
    if kernels.TRITON_IMPORT_ERROR is None and x.shape[-1] > _triton_kernels.MAX_COLS:
        return [f"row width {x.shape[-1]} exceeds the Triton kernel's {_triton_kernels.MAX_COLS} (one row per program)"]
    return []


def _signature(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> str:
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        f"rows~{bucket(rows)} width={x.shape[-1]} w={str(weight.dtype)[6:]} bias={bias is not None} "
        f"residual={residual is not None}"
    )


def _fwd_kernel(
    backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
    y: Tensor, residual_out: Optional[Tensor], mean: Tensor, rstd: Tensor,
) -> None:  # fmt: skip
    if backend == "triton":
        _triton_kernels.layer_norm_fwd(x, weight, bias, residual, eps, y, residual_out, mean, rstd)
        return
    _cuda.layer_norm_fwd(x, weight, bias, residual, eps, y, residual_out, mean, rstd)


def _bwd_kernel(
    backend: str, dy: Tensor, dresidual_out: Optional[Tensor], z: Tensor, weight: Tensor, mean: Tensor,
    rstd: Tensor, dz: Tensor, has_bias: bool,
) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    if backend == "triton":
        return _triton_kernels.layer_norm_bwd(dy, dresidual_out, z, weight, mean, rstd, dz, has_bias)
    return _cuda.layer_norm_bwd(dy, dresidual_out, z, weight, mean, rstd, dz, has_bias)


# ------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastvit::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (M, N) with unit last stride; weight, bias: contiguous (N,). Returns y, x + residual
    (empty without a residual), and the fp32 per-row mean and rstd kept for the backward."""
    M, N = x.shape
    y = new_output((M, N), x)
    residual_out = new_output((M, N), x) if residual is not None else x.new_empty((0,))
    mean = new_output((M,), x, torch.float32)
    rstd = new_output((M,), x, torch.float32)
    _fwd_kernel(backend, x, weight, bias, residual, eps, y, residual_out if residual is not None else None, mean, rstd)
    return y, residual_out, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps, backend):
    M, N = x.shape
    residual_out = x.new_empty((M, N)) if residual is not None else x.new_empty((0,))
    return (
        x.new_empty((M, N)),
        residual_out,
        x.new_empty((M,), dtype=torch.float32),
        x.new_empty((M,), dtype=torch.float32),
    )


@torch.library.custom_op("fastvit::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor, dresidual_out: Optional[Tensor], z: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    has_bias: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns dz (= dx = dresidual), dweight and dbias (empty without a bias)."""
    dz = new_output(z.shape, z)
    dw_part, db_part = _bwd_kernel(backend, dy, dresidual_out, z, weight, mean, rstd, dz, has_bias)
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(weight.dtype) if db_part is not None else weight.new_empty((0,))
    return dz, dweight, dbias


@_layer_norm_bwd.register_fake
def _(dy, dresidual_out, z, weight, mean, rstd, has_bias, backend):
    return z.new_empty(z.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, eps, backend = inputs
    _, residual_out, mean, rstd = output
    z = residual_out if residual is not None else x
    ctx.save_for_backward(z, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.backend = backend


def _backward(ctx, dy, dresidual_out, _dmean, _drstd):
    z, weight, mean, rstd = ctx.saved_tensors
    dy = rows_view(dy) if dy is not None else torch.zeros_like(z)
    dresidual_out = rows_view(dresidual_out) if ctx.has_residual and dresidual_out is not None else None
    dz, dweight, dbias = _bwd(dy, dresidual_out, z, weight, mean, rstd, ctx.has_bias, ctx.backend)
    return dz, dweight, dbias if ctx.has_bias else None, dz if ctx.has_residual else None, None, None


_fwd = eager_op(_layer_norm_fwd, _setup_context, _backward)
_bwd = direct(_layer_norm_bwd)
register_autocast_keep_dtype(_layer_norm_fwd)


def _torch_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, residual: Optional[Tensor]):
    return layer_norm_ref(x, weight, bias, eps, residual)


def _kernel_launch(backend: str):
    def launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, residual: Optional[Tensor]):
        # The kernels index weight / bias as dense (C,) vectors: a strided or expanded (stride 0) one is copied
        # (a no-op when already contiguous; differentiable, so their grads keep the caller's shapes).
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y, residual_out, _, _ = _fwd(
            rows_view(x), weight, bias, rows_view(residual) if residual is not None else None, float(eps), backend
        )
        y = y.view(x.shape)
        return y if residual is None else (y, residual_out.view(x.shape))

    return launch


# The selftest's cases (fastvit/ops/_selftest_spec.py). label -> (tokens, channels).
_SELFTEST_SHAPES = {"vit_b16_224": (197, 768), "vit_l16_384": (577, 1024), "vit_h14_224": (257, 1280)}


def _selftest_problem(s: Dict[str, Any], dev: torch.device) -> Any:
    from fastvit import ops

    rn = normal(dev)
    M, C = s["M"], s["C"]
    leaves = {"x": rn(M, C), "weight": 1 + rn(C, scale=0.1), "bias": rn(C, scale=0.1), "residual": rn(M, C)}
    return (
        leaves,
        lambda t, b: ops.layer_norm(t["x"], t["weight"], t["bias"], 1e-6, residual=t["residual"], backend=b),
        lambda t: ops.layer_norm_ref(t["x"], t["weight"], t["bias"], 1e-6, t["residual"]),
    )


_SELFTEST = SelftestSpec(
    model_shapes=lambda batch: {k: {"M": batch * n, "N": n, "C": c} for k, (n, c) in _SELFTEST_SHAPES.items()},
    small_shapes={"small": {"M": 8, "N": 8, "C": 96}},
    problem=_selftest_problem,
    rule="table",
    speed_shape="vit_b16_224",
    composition=lambda t, s: lambda: F.layer_norm(t["x"] + t["residual"], (s["C"],), t["weight"], t["bias"], 1e-6),
    work=lambda s, t, out: bytes_moved(t, out, outputs=2),  # writes the normalised rows and x + residual
    primary_shapes=("vit_b16_224",),
    cpu_torch_shapes=("vit_b16_224",),
    order=3,
)


_OP = OpDispatcher(
    name="layer_norm",
    reasons={"torch": no_reasons, "triton": _triton_reasons, "cuda": no_reasons},
    preference=("triton", "cuda", "torch"),
    launchers={"torch": _torch_launch, "triton": _kernel_launch("triton"), "cuda": _kernel_launch("cuda")},
    reference=layer_norm_ref,
    check=_check_inputs,
    forward_op=_layer_norm_fwd,
    backward_op=_layer_norm_bwd,
    autocast="keep",
    signature=_signature,
    selftest=_SELFTEST,
)
_MEMO = _OP._memo


# ------------------------------------------------------------------------------------ public API


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    eps: float = 1e-6,
    *,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """LayerNorm over the last dimension, optionally of ``x + residual``, in one pass.

    Args:
        x: (..., C) activations, fp32 / fp16 / bf16; any strides (a copy is made only when the last
            dimension is not contiguous).
        weight: (C,) scale, x's dtype or fp32; any strides (a strided or expanded one is copied).
        bias: (C,) shift like ``weight``, or None.
        eps: added to the variance; timm's ViTs use 1e-6, ``nn.LayerNorm`` defaults to 1e-5.
        residual: (..., C) like ``x``; when given, the op normalises ``x + residual`` and also returns it.
        backend: None (``FASTVIT_BACKEND`` or auto), "torch", "triton" or "cuda".

    Returns:
        ``y`` without a residual; ``(y, x + residual)`` with one. Both in x's dtype and shape.

    Raises:
        TypeError / ValueError: bad dtypes, shapes or mixed devices, naming the input.
        fastvit.ops.dispatch.BackendNotSupported: an explicit backend cannot serve the input.
    """
    key = chosen = None
    if not is_compiling():  # traced: the full checks and select run (on values cached outside the trace)
        try:  # the signature: validation and the choice are cached per signature (eps keyed with its type)
            key = (
                (shape := x.shape), (dtype := x.dtype), x.device, weight.shape, (w_dtype := weight.dtype),
                weight.device, eps, eps.__class__,
                bias is None or bias.shape, bias is None or bias.dtype, bias is None or bias.device,
                residual is None or residual.shape, residual is None or residual.dtype,
                residual is None or residual.device, backend, env_get(ENV_KEY),
            )  # fmt: skip
            chosen = _MEMO.get(key)
        except (AttributeError, TypeError):  # not tensors / unhashable: the checks say what is wrong
            key = None
        if chosen.__class__ is not str:  # a measured (CUDA, auto) or autocast-only entry, or a miss
            chosen = _OP.slot(chosen, (x, weight, bias, residual))
    if chosen is None:
        check_call("fastvit.ops.layer_norm", {"x": x, "weight": weight}, optional={"bias": bias}, eps={"eps": eps})
        _check_inputs(x, weight, bias, residual, eps)

        def run(b, x, weight, bias, residual):
            return layer_norm(x, weight, bias, eps, residual=residual, backend=b)

        chosen = _OP.resolve(key, backend, x.device, run, x=x, weight=weight, bias=bias, residual=residual)
        shape, dtype, w_dtype = x.shape, x.dtype, weight.dtype
    if chosen == "torch":  # the common CPU case: layer_norm_ref inlined (bit-identical), fewer frames
        if w_dtype is dtype:
            z = x if residual is None else x + residual
            # torch.layer_norm is what F.layer_norm calls (its cudnn_enable argument is unused)
            y = torch.layer_norm(z, (shape[-1],), weight, bias, eps)
            if y.dtype is not dtype:
                y = y.to(dtype)  # autocast runs layer_norm in fp32; the op keeps x's dtype
            return y if residual is None else (y, z)
        return layer_norm_ref(x, weight, bias, eps, residual)
    return _OP.launchers[chosen](x, weight, bias, eps, residual)

"""Launchers for the ``cuda`` backends of soft_split, patch_embed and linear (fastvit._C).

The kernels live in csrc/soft_split.cu, csrc/patch_embed.cu and csrc/linear.cu and take raw
pointers, sizes, strides, dtype codes and a stream; these functions turn tensors into those arguments,
allocate outputs with :func:`fastvit.ops._library.new_output` and workspaces with ``torch.empty``, and
say (``*_reasons``) when the backend cannot serve an input. Each launcher has the signature of the
Triton launcher it stands beside (fastvit/kernels/<op>.py), so an ops file picks one by backend name.

The GEMMs go through cuBLASLt, which fastvit._C loads with dlopen at first use instead of linking it,
so the extension imports without it. Search order for ``libcublasLt.so.<major>`` (first hit wins): a copy
already loaded in the process (torch's), the directories of :func:`cublaslt_search_dirs` (the nvidia
cuBLAS wheel torch depends on, torch/lib, then any set with :func:`set_cublaslt_search_dirs`), the
loader path (``LD_LIBRARY_PATH``, rpath, ld.so.cache), ``$CUDA_HOME/lib64``, ``/usr/local/cuda/lib64``.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastvit import _ext
from fastvit._geometry import ceil_div, num_programs, patch_grid, sm_count
from fastvit.kernels._common import device_guard
from fastvit.ops._library import new_output

__all__ = [
    "ACTIVATION_CODES",
    "MAX_SOFT_SPLIT_FEATURES",
    "cublaslt_reasons",
    "cublaslt_search_dirs",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "linear_act_grad",
    "linear_fwd",
    "linear_reasons",
    "linear_wgrad",
    "patch_embed_bwd",
    "patch_embed_fwd",
    "patch_embed_reasons",
    "set_cublaslt_search_dirs",
    "soft_split_bwd",
    "soft_split_fwd",
    "soft_split_reasons",
]

# Activation name -> csrc/linear.h::ActivationCode, read from the extension (None and "" mean "none");
# empty when the extension did not load (the launchers then stop at _ext.require first).
_C_ACTIVATIONS: dict = _ext.module().ACTIVATION_CODES if _ext.available() else {}
ACTIVATION_CODES: dict[Optional[str], int] = {
    **{name: code for name, code in _C_ACTIVATIONS.items() if name != "none"},
    **({None: _C_ACTIVATIONS["none"], "": _C_ACTIVATIONS["none"]} if "none" in _C_ACTIVATIONS else {}),
}
# csrc/soft_split.cu stages one output row (C * kh * kw fp32 values) in 48 KB of shared memory.
MAX_SOFT_SPLIT_FEATURES = 12000
# cuBLASLt's workspace; NVIDIA recommends 32 MiB on Hopper. Taken from torch's caching allocator per call.
_WORKSPACE_BYTES = 32 << 20
_INT32_LIMIT = 2**31
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_user_dirs: list[str] = []
_cublaslt_error: Optional[str] = None
_cublaslt_checked = False


# ------------------------------------------------------------------------------------------ cuBLASLt


def _wheel_dirs() -> list[str]:
    """lib directories of the nvidia wheels torch installs (nvidia/cu13/lib, nvidia/cublas/lib, ...)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    libs = [p for root in roots for p in glob.glob(os.path.join(root, "*", "lib", "libcublasLt.so*"))]
    return sorted({os.path.dirname(p) for p in libs})


def cublaslt_search_dirs() -> list[str]:
    """The directories fastvit._C tries for libcublasLt before the loader path, in order."""
    return [*_user_dirs, *_wheel_dirs(), os.path.join(os.path.dirname(torch.__file__), "lib")]


def set_cublaslt_search_dirs(dirs: Sequence[str]) -> None:
    """Puts ``dirs`` first among the directories searched for libcublasLt (before the nvidia wheel and
    torch/lib). Takes effect at the next load attempt; once cuBLASLt is loaded it stays loaded.

    Args:
        dirs: directories that hold ``libcublasLt.so.<major>``.
    """
    global _cublaslt_checked
    _user_dirs[:] = [os.fspath(d) for d in dirs]
    _cublaslt_checked = False


def _load_cublaslt() -> Optional[str]:
    """Loads cuBLASLt once (no GPU needed); returns why it cannot be used, or None."""
    global _cublaslt_checked, _cublaslt_error
    C = _ext.module()
    if C is None:
        return None  # the environment's own reason (extension not loaded) covers it
    if not _cublaslt_checked:
        C.set_cublaslt_search_dirs(cublaslt_search_dirs())
        try:
            C.load_cublaslt()
            _cublaslt_error = None
        except RuntimeError as exc:
            _cublaslt_error = str(exc)
        _cublaslt_checked = True
    return _cublaslt_error


def cublaslt_reasons(**_: object) -> list[str]:
    """Why the cuBLASLt-backed kernels cannot run in this process (empty when they can)."""
    error = _load_cublaslt()
    return [f"cuBLASLt is not usable: {error}"] if error else []


def _require_cublaslt(op: str) -> ModuleType:
    """The extension with cuBLASLt loaded (with the search directories above), or a RuntimeError saying why."""
    C = _ext.require(op)
    error = _load_cublaslt()
    if error:
        raise RuntimeError(f"fastvit.ops.{op}: the 'cuda' backend needs cuBLASLt: {error}")
    return C


def _workspace(like: Tensor) -> Tensor:
    return torch.empty((_WORKSPACE_BYTES,), device=like.device, dtype=torch.uint8)


def _gemm_operand(t: Tensor) -> Tensor:
    """A 2-D operand with a unit column stride and a row stride >= its width, as cuBLASLt reads it."""
    if t.stride(-1) == 1 and t.stride(0) >= max(t.shape[1], 1):
        return t
    return t.contiguous()


# ---------------------------------------------------------------------------------------- layer_norm


def layer_norm_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
    y: Tensor, residual_out: Optional[Tensor], mean: Tensor, rstd: Tensor,
) -> None:  # fmt: skip
    """Writes y (and residual_out = x + residual) and the fp32 row mean / rstd of the 2-D rows ``x``: the
    signature of fastvit.kernels.layer_norm.layer_norm_fwd."""
    C = _ext.require("layer_norm")
    with device_guard(x):
        C.layer_norm_fwd(
            x=_ext.ptr(x), residual=_ext.ptr(residual), weight=_ext.ptr(weight), bias=_ext.ptr(bias),
            y=_ext.ptr(y), residual_out=_ext.ptr(residual_out), mean=_ext.ptr(mean), rstd=_ext.ptr(rstd),
            rows=x.shape[0], cols=x.shape[1], x_stride=x.stride(0),
            residual_stride=residual.stride(0) if residual is not None else 0, y_stride=y.stride(0),
            residual_out_stride=residual_out.stride(0) if residual_out is not None else 0, eps=float(eps),
            x_dtype=_ext.dtype_code(x), w_dtype=_ext.dtype_code(weight), stream=_ext.stream_handle(x.device),
        )  # fmt: skip


def layer_norm_bwd(
    dy: Tensor, dresidual_out: Optional[Tensor], z: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    dz: Tensor, has_bias: bool,
) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """Writes dz and returns the fp32 per-block partials of dweight (and dbias with ``has_bias``): the
    signature of fastvit.kernels.layer_norm.layer_norm_bwd."""
    C = _ext.require("layer_norm")
    M, N = z.shape
    programs = num_programs(z, M)
    dw_part = torch.empty((programs, N), device=z.device, dtype=torch.float32)
    db_part = torch.empty((programs, N), device=z.device, dtype=torch.float32) if has_bias else None
    with device_guard(z):
        C.layer_norm_bwd(
            dy=_ext.ptr(dy), dresidual_out=_ext.ptr(dresidual_out), z=_ext.ptr(z), weight=_ext.ptr(weight),
            mean=_ext.ptr(mean), rstd=_ext.ptr(rstd), dz=_ext.ptr(dz), dweight_partial=_ext.ptr(dw_part),
            dbias_partial=_ext.ptr(db_part), rows=M, cols=N, dy_stride=dy.stride(0),
            dresidual_out_stride=dresidual_out.stride(0) if dresidual_out is not None else 0,
            z_stride=z.stride(0), dz_stride=dz.stride(0), num_partials=programs,
            x_dtype=_ext.dtype_code(z), w_dtype=_ext.dtype_code(weight), stream=_ext.stream_handle(z.device),
        )  # fmt: skip
    if M == 0:
        dw_part.zero_()
        if db_part is not None:
            db_part.zero_()
    return dw_part, db_part


# ---------------------------------------------------------------------------------------- soft_split


def soft_split_reasons(channels: int, window: int, **_: object) -> list[str]:
    """Why csrc/soft_split.cu cannot serve a row of ``channels * window`` features."""
    features = channels * window
    if features > MAX_SOFT_SPLIT_FEATURES:
        return [
            f"a row of {channels} channels x {window} window positions = {features} features exceeds the CUDA "
            f"kernel's {MAX_SOFT_SPLIT_FEATURES} (one row is staged in 48 KB of shared memory)"
        ]
    return []


def soft_split_fwd(
    x: Tensor,
    image_strides: tuple[int, int, int, int],
    geometry: tuple[int, int, int, int],
    kernel: tuple[int, int, int, int, int, int],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    y: Tensor,
    mean: Optional[Tensor],
    rstd: Optional[Tensor],
) -> None:
    """Writes y (B * L, F), contiguous, and with a LayerNorm the fp32 row mean / rstd: the signature of
    fastvit.kernels.soft_split.soft_split_fwd. ``image_strides`` are the (b, c, h, w) strides through which
    ``x`` reads as the image ``geometry`` = (B, C, H, W); ``kernel`` = (kh, kw, sh, sw, ph, pw)."""
    C = _ext.require("soft_split")
    with device_guard(x):
        C.soft_split_fwd(
            x=_ext.ptr(x), norm_weight=_ext.ptr(norm_weight), norm_bias=_ext.ptr(norm_bias), y=_ext.ptr(y),
            mean=_ext.ptr(mean), rstd=_ext.ptr(rstd), shape=tuple(geometry), strides=tuple(image_strides),
            kernel=tuple(kernel), eps=float(eps), x_dtype=_ext.dtype_code(x),
            w_dtype=_ext.dtype_code(norm_weight if norm_weight is not None else x), stream=_ext.stream_handle(x.device),
        )  # fmt: skip


def soft_split_bwd(
    dy: Tensor,
    x: Tensor,
    image_strides: tuple[int, int, int, int],
    geometry: tuple[int, int, int, int],
    kernel: tuple[int, int, int, int, int, int],
    norm_weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
    need_dnorm: bool,
    dx: Optional[Tensor],
    dx_strides: Optional[tuple[int, int, int, int]],
) -> tuple[Tensor, Tensor]:
    """Writes dx (when given, through ``dx_strides`` in the forward's image view) and returns the gradients
    of norm_weight and norm_bias (empty without a LayerNorm, without ``need_dnorm`` or, for the bias,
    without ``has_bias``). dy: (B * L, F) contiguous."""
    C = _ext.require("soft_split")
    rows, features = dy.shape
    has_ln = norm_weight is not None
    programs = num_programs(x, rows)
    dw_part = torch.empty((programs, features), device=x.device, dtype=torch.float32) if has_ln and need_dnorm else None
    db_part = (
        torch.empty((programs, features), device=x.device, dtype=torch.float32)
        if has_ln and need_dnorm and has_bias else None
    )  # fmt: skip
    coefs = torch.empty((rows, 2), device=x.device, dtype=torch.float32) if has_ln else None
    with device_guard(x):
        C.soft_split_bwd(
            dy=_ext.ptr(dy), x=_ext.ptr(x), norm_weight=_ext.ptr(norm_weight), mean=_ext.ptr(mean if has_ln else None),
            rstd=_ext.ptr(rstd if has_ln else None), row_coefs=_ext.ptr(coefs), dx=_ext.ptr(dx),
            dweight_partial=_ext.ptr(dw_part), dbias_partial=_ext.ptr(db_part), shape=tuple(geometry),
            strides=tuple(image_strides), kernel=tuple(kernel),
            dx_strides=tuple(dx_strides) if dx is not None else (0, 0, 0, 0), num_partials=programs,
            x_dtype=_ext.dtype_code(x), w_dtype=_ext.dtype_code(norm_weight if has_ln else x),
            stream=_ext.stream_handle(x.device),
        )  # fmt: skip
    empty = x.new_empty((0,))
    dweight = dw_part.sum(0).to(norm_weight.dtype) if dw_part is not None else empty
    dbias = db_part.sum(0).to(norm_weight.dtype) if db_part is not None else empty
    return dweight, dbias


# --------------------------------------------------------------------------------------- patch_embed


def patch_embed_reasons(x: Tensor, weight: Tensor, **_: object) -> list[str]:
    """Why csrc/patch_embed.cu cannot serve ``x`` (B, C, H, W) with ``weight`` (D, C, p, p)."""
    reasons = cublaslt_reasons()
    B, C, H, W = x.shape
    D, _, p, _ = weight.shape
    rows = B * math.prod(patch_grid(H, W, p))
    if rows >= _INT32_LIMIT or C * p * p >= _INT32_LIMIT or D >= _INT32_LIMIT:
        reasons.append(f"B * N = {rows}, C * p * p or D reaches 2^31; cuBLASLt takes 32-bit sizes")
    return reasons


def _patch_geometry(x: Tensor, patch: int) -> tuple[int, int]:
    """(N, K): patches per image (ceil grid) and features per patch."""
    B, C, H, W = x.shape
    return math.prod(patch_grid(H, W, patch)), C * patch * patch


def patch_embed_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    pos: Optional[Tensor],
    prefix: Optional[Tensor],
    out: Tensor,
) -> None:
    """Writes ``out`` (B, P + N, D), contiguous: the signature of fastvit.kernels.patch_embed.patch_embed_fwd.
    x (B, C, H, W) any strides; weight (D, C, p, p); pos (R, D) and prefix (P, D) with unit last strides,
    R = N or P + N. fp32 uses TF32 when ``torch.backends.cudnn.allow_tf32`` (the conv it replaces would)."""
    C = _require_cublaslt("patch_embed")
    B = x.shape[0]
    D, patch = weight.shape[0], weight.shape[2]
    N, K = _patch_geometry(x, patch)
    P = prefix.shape[0] if prefix is not None else 0
    cols = torch.empty((B * N, K), device=x.device, dtype=x.dtype)
    w2 = weight.reshape(D, K).contiguous()
    bias = bias.contiguous() if bias is not None else None
    pos = pos.contiguous() if pos is not None else None
    prefix = prefix.contiguous() if prefix is not None else None
    workspace = _workspace(x)
    with device_guard(x):
        C.patch_embed_fwd(
            x=_ext.ptr(x), weight=_ext.ptr(w2), bias=_ext.ptr(bias), pos_embed=_ext.ptr(pos), prefix=_ext.ptr(prefix),
            cols=_ext.ptr(cols), out=_ext.ptr(out), shape=tuple(x.shape), strides=tuple(x.stride()), patch=patch,
            embed_dim=D, num_prefix=P, pos_rows=pos.shape[0] if pos is not None else 0, dtype=_ext.dtype_code(x),
            allow_tf32=bool(torch.backends.cudnn.allow_tf32), workspace=_ext.ptr(workspace),
            workspace_bytes=_WORKSPACE_BYTES, stream=_ext.stream_handle(x.device),
        )  # fmt: skip


def patch_embed_bwd(
    dout: Tensor, x: Tensor, weight: Tensor, num_prefix: int, need_dx: bool, need_dweight: bool
) -> tuple[Tensor, Tensor]:
    """Returns dx (x's shape, contiguous NCHW; empty unless ``need_dx``) and dweight (weight's shape;
    empty unless ``need_dweight``). dout: (B, P + N, D) contiguous."""
    C = _require_cublaslt("patch_embed")
    B = x.shape[0]
    D, patch = weight.shape[0], weight.shape[2]
    N, K = _patch_geometry(x, patch)
    # The GEMMs read the patch rows as one (B * N, D) matrix: with prefix rows between images, compact them.
    dpatch = dout[:, num_prefix:, :].reshape(B * N, D)
    dx = new_output(x.shape, x) if need_dx else None
    dweight = new_output((D, K), weight) if need_dweight else None
    w2 = weight.reshape(D, K).contiguous()
    cols = torch.empty((B * N, K), device=x.device, dtype=x.dtype)
    workspace = _workspace(x)
    with device_guard(x):
        C.patch_embed_bwd(
            dout=_ext.ptr(dpatch), x=_ext.ptr(x), weight=_ext.ptr(w2), cols=_ext.ptr(cols), dx=_ext.ptr(dx),
            dweight=_ext.ptr(dweight), shape=tuple(x.shape), strides=tuple(x.stride()),
            dx_strides=tuple(dx.stride()) if dx is not None else (0, 0, 0, 0), patch=patch, embed_dim=D,
            dout_stride=dpatch.stride(0), dtype=_ext.dtype_code(x), allow_tf32=bool(torch.backends.cudnn.allow_tf32),
            workspace=_ext.ptr(workspace), workspace_bytes=_WORKSPACE_BYTES, stream=_ext.stream_handle(x.device),
        )  # fmt: skip
    return (
        dx if dx is not None else x.new_empty((0,)),
        dweight.view(weight.shape) if dweight is not None else weight.new_empty((0,)),
    )


# -------------------------------------------------------------------------------------------- linear


def linear_reasons(x: Tensor, weight: Optional[Tensor] = None, **_: object) -> list[str]:
    """Why csrc/linear.cu cannot serve ``x`` (..., K) @ ``weight`` (N, K)^T."""
    reasons = []
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported by the cuBLASLt GEMM (float32 via TF32, float16, bfloat16)")
    M = x.numel() // max(x.shape[-1], 1)
    if M >= _INT32_LIMIT or x.shape[-1] >= _INT32_LIMIT or (weight is not None and weight.shape[0] >= _INT32_LIMIT):
        reasons.append("M, N or K reaches 2^31; cuBLASLt takes 32-bit sizes")
    return reasons + cublaslt_reasons()


def _allow_tf32() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: Optional[str], y: Tensor
) -> None:
    """Writes ``y = act(x @ weight.T + bias) + residual``: the signature of fastvit.kernels.linear.linear_fwd.
    x (M, K), weight (N, K), residual (M, N) any strides (copied only when cuBLASLt cannot read them);
    y (M, N) with a unit column stride. fp32 uses TF32 unless ``torch.get_float32_matmul_precision()`` is
    "highest", as F.linear does."""
    C = _require_cublaslt("linear")
    M, K = x.shape
    N = weight.shape[0]
    x, weight = _gemm_operand(x), _gemm_operand(weight)
    residual = _gemm_operand(residual) if residual is not None else None
    bias = bias.contiguous() if bias is not None else None
    workspace = _workspace(x)
    with device_guard(x):
        C.linear_fwd(
            x=_ext.ptr(x), weight=_ext.ptr(weight), bias=_ext.ptr(bias), residual=_ext.ptr(residual), y=_ext.ptr(y),
            m=M, n=N, k=K, x_stride=x.stride(0), weight_stride=weight.stride(0),
            residual_stride=residual.stride(0) if residual is not None else 0, y_stride=y.stride(0),
            activation=ACTIVATION_CODES[activation], dtype=_ext.dtype_code(x), allow_tf32=_allow_tf32(),
            workspace=_ext.ptr(workspace), workspace_bytes=_WORKSPACE_BYTES, stream=_ext.stream_handle(x.device),
        )  # fmt: skip


def linear_act_grad(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, g: Tensor, need_dbias: bool
) -> Optional[Tensor]:
    """Writes ``g = dy * act'(x @ weight.T + bias)`` (the pre-activation recomputed by cuBLASLt); returns
    sum_rows(g) in fp32 when ``need_dbias``, else None: the signature of fastvit.kernels.linear.linear_act_grad."""
    C = _require_cublaslt("linear")
    M, K = x.shape
    N = weight.shape[0]
    x, weight, dy = _gemm_operand(x), _gemm_operand(weight), _gemm_operand(dy)
    bias = bias.contiguous() if bias is not None else None
    column_tiles = ceil_div(N, 256)  # csrc/linear.cu: 256 columns per block
    programs = max(1, min(M, ceil_div(4 * sm_count(x), column_tiles)))
    part = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_dbias else None
    workspace = _workspace(x)
    with device_guard(x):
        C.linear_act_grad(
            dy=_ext.ptr(dy), x=_ext.ptr(x), weight=_ext.ptr(weight), bias=_ext.ptr(bias), g=_ext.ptr(g),
            dbias_partial=_ext.ptr(part), m=M, n=N, k=K, dy_stride=dy.stride(0), x_stride=x.stride(0),
            weight_stride=weight.stride(0), g_stride=g.stride(0), num_partials=programs,
            activation=ACTIVATION_CODES[activation], dtype=_ext.dtype_code(x), allow_tf32=_allow_tf32(),
            workspace=_ext.ptr(workspace), workspace_bytes=_WORKSPACE_BYTES, stream=_ext.stream_handle(x.device),
        )  # fmt: skip
    return part.sum(0) if part is not None else None


# (M, N, K, dtype, allow_tf32) -> why linear_wgrad left that problem to the separate GEMM + column sum: the
# cuda backend's BGRADB refusals, for python -c "from fastvit.ops import _cuda_backends as c; print(c.BGRADB_REFUSED)".
BGRADB_REFUSED: dict[tuple, str] = {}


def linear_wgrad(dy: Tensor, x: Tensor, need_dbias: bool) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """``(dy.T @ x, dy.sum(0) in dy's dtype)`` for a linear without activation, the bias gradient from the
    same cuBLASLt GEMM (BGRADB epilogue: csrc/linear.cu::linear_wgrad). dy (M, N) and x (M, K) any strides
    (copied only where cuBLASLt cannot read them). Returns None, having written nothing, where this does not
    apply, so the caller runs ``torch.matmul(dy.t(), x)`` and ``dy.sum(0)``: no dbias wanted, M = 0, or
    cuBLASLt has no BGRADB algorithm for the problem (its documented support depends on the layout, dtype
    and compute type and on the library version; the heuristic's answer is what is used)."""
    M, N = dy.shape
    K = x.shape[1]
    if not need_dbias or M == 0 or N == 0 or K == 0:
        return None
    C = _require_cublaslt("linear")
    dy, x = _gemm_operand(dy), _gemm_operand(x)
    dweight = torch.empty((N, K), device=dy.device, dtype=dy.dtype)
    dbias = torch.empty((N,), device=dy.device, dtype=dy.dtype)
    workspace = _workspace(x)
    with device_guard(x):
        ok = C.linear_wgrad(
            dy=_ext.ptr(dy), x=_ext.ptr(x), dweight=_ext.ptr(dweight), dbias=_ext.ptr(dbias), m=M, n=N, k=K,
            dy_stride=dy.stride(0), x_stride=x.stride(0), dweight_stride=dweight.stride(0),
            dtype=_ext.dtype_code(x), allow_tf32=_allow_tf32(), workspace=_ext.ptr(workspace),
            workspace_bytes=_WORKSPACE_BYTES, stream=_ext.stream_handle(x.device),
        )  # fmt: skip
    if not ok:
        BGRADB_REFUSED[(M, N, K, dy.dtype, _allow_tf32())] = (
            "cuBLASLt's heuristic has no CUBLASLT_EPILOGUE_BGRADB algorithm for this GEMM (dW = dy^T x, "
            f"M={M} N={N} K={K}, {dy.dtype}); dW and dbias ran as torch.matmul + dy.sum(0)"
        )
        return None
    return dweight, dbias

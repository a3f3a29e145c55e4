"""Triton GEMM ``x @ weight.T`` with a fused epilogue, forward and the activation's backward.

One kernel, two epilogues (constexpr ``ACT_GRAD``), each program computing one (BLOCK_M, BLOCK_N) tile
of the (M, N) result with an fp32 accumulator over K:
    forward   y = act(acc + bias) + residual         (one rounding to the output dtype)
    ACT_GRAD  g = dy * act'(acc + bias)              (h recomputed: the default, see ops/linear.py)
              and, if asked, the tile's column sums of g (fp32) as one row of dbias partials, so the
              bias gradient needs no second pass over the (M, N) tensor
The forward can also store h = acc + bias (constexpr ``STORE_H``, the ``save_preact`` training path);
then the backward is ``_act_grad_saved_kernel``, an elementwise pass g = dy * act'(h) over the saved h
with the same dbias partials, instead of the GEMM.

The backward of a linear without activation has its own kernel, ``_wgrad_kernel`` (:func:`linear_wgrad`):
dW = dy^T @ x tiled over (N, K) with the M reduction in the loop (optionally cut into row splits whose fp32
partials are summed after, for the narrow proj / qkv grids), and dbias = sum_rows(dy) summed by the
programs of the first K tile column from the dy tiles they load anyway: no second read of dy, no atomics.
It replaces cuBLAS's wgrad, so :func:`linear_wgrad_dispatch` runs it only where it measured faster than
``torch.matmul(dy.T, x)`` + ``dy.sum(0)`` (fastvit.ops.dispatch.measured_entry, family ``linear_wgrad``;
``FASTVIT_WGRAD_FUSED=0`` turns it off; CPU tensors and static mode take the pair).

Tiles are visited in groups of GROUP_M rows of tiles so neighbouring programs reuse the same weight
columns from L2. Loads clamp ragged rows / columns into range (``% M``, ``% N``) so the K loop needs no
M/N masks; K is masked only when BLOCK_K does not divide it; every store is masked. fp32 inputs follow
``torch.get_float32_matmul_precision()`` as ``F.linear`` does: "highest" (torch's default) gives exact
fp32 products, "high" / "medium" TF32 tensor-core products; fp32 accumulation either way (the
interpreter computes exactly).

Configs are autotuned once per (M bucket, N, K, dtype, epilogue) and remembered; while a CUDA graph is
being captured an untuned key gets a fixed default config instead of benchmarking inside the capture.
Under the interpreter there is one small config.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from fastvit.kernels import INTERPRET
from fastvit.kernels._common import (
    device_guard,
    graph_capturing,
    lazy_autotune,
    shared_memory_limit,
    target_capability,
)

__all__ = [
    "ACTIVATION_CODES", "WGRAD_CHOICES", "WGRAD_ENV_SWITCH", "WGRAD_FAMILY", "linear_act_grad", "linear_act_grad_saved",
    "linear_fwd", "linear_wgrad", "linear_wgrad_dispatch", "wgrad_enabled",
]  # fmt: skip

ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}
_SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = 0.7978845608028654
# Compiled kernels evaluate the forward GELU with libdevice's approximate divide and flush-to-zero exp2
# (one MUFU each, no denormal fix-ups); the interpreter cannot call libdevice and uses tl.math's.
_FAST_MATH = tl.constexpr(not INTERPRET)


@triton.jit
def _gelu(h, FAST_MATH: tl.constexpr):
    """Exact GELU h * Phi(h) as max(h, 0) - |h| Q(|h|), with the normal tail Q(a) = 1 - Phi(a) from
    Abramowitz & Stegun 26.2.17: Q(a) = phi(a) t (b1 + t (b2 + t (b3 + t (b4 + t b5)))), t = 1 / (1 + p a),
    |error| < 7.5e-8. The GELU's absolute error is below 3.4e-7 over all fp32 inputs (fp32 evaluation
    included; torch's own fp32 GELU is 1.2e-6 from the fp64 value), at one divide, one exp2 and eight
    FMA-class instructions instead of libdevice erff's polynomial pair and fix-ups (half the SASS)."""
    a = tl.abs(h)
    d = 1.0 + 0.2316419 * a
    if FAST_MATH:
        t = libdevice.fast_dividef(1.0, d)
    else:
        t = 1.0 / d
    poly = t * (0.319381530 + t * (-0.356563782 + t * (1.781477937 + t * (-1.821255978 + t * 1.330274429))))
    # phi(a) = exp2(-a^2 / (2 ln 2) + log2(1 / sqrt(2 pi)))
    z = -0.7213475204444817 * a * a - 1.3257480647361593
    if FAST_MATH:
        phi = libdevice.exp2(z)  # ex2.approx.ftz: the result is 0 below 2**-126, where |h| Q(|h|) < 1e-37
    else:
        phi = tl.exp2(z)
    return tl.maximum(h, 0.0) - a * (poly * phi)


@triton.jit
def _activation(h, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # exact GELU: h * Phi(h)
        return _gelu(h, _FAST_MATH)
    elif ACTIVATION == 2:  # tanh GELU: 0.5 h (1 + tanh(u)) == h * sigmoid(2u)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 3:  # quick GELU
        return h * tl.sigmoid(1.702 * h)
    else:
        return h


@triton.jit
def _activation_grad(h, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # Phi(h) + h * phi(h)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    # 1 - sigmoid(z) is evaluated as sigmoid(-z): near s = 1 the subtraction would cancel, and the
    # h * u' factor (~200 at |h| = 10) would magnify the lost bits.
    elif ACTIVATION == 2:  # s = sigmoid(2u): d/dh = s + 2 h s (1 - s) u'
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        return tl.sigmoid(2.0 * u) + 2.0 * h * tl.sigmoid(2.0 * u) * tl.sigmoid(-2.0 * u) * du
    elif ACTIVATION == 3:  # s = sigmoid(1.702 h): d/dh = s + 1.702 h s (1 - s)
        return tl.sigmoid(1.702 * h) + 1.702 * h * tl.sigmoid(1.702 * h) * tl.sigmoid(-1.702 * h)
    else:
        return tl.full(h.shape, 1.0, tl.float32)


@triton.jit
def _linear_kernel(
    X,  # (M, K) input, strides (stride_xm, stride_xk)
    W,  # (N, K) weight, strides (stride_wn, stride_wk)
    B,  # (N,) bias, or unused
    R,  # (M, N) forward: the residual added last; ACT_GRAD: dy. Strides (stride_rm, stride_rn)
    Y,  # (M, N) output, row stride stride_ym, unit column stride
    H,  # (M, N) forward with STORE_H: the pre-activation acc + bias, Y's strides; else unused
    DB,  # (>= cdiv(M, BLOCK_M), N) fp32 dbias partials, one row per row tile (WRITE_DBIAS), or unused
    M,
    N,
    K,
    M_BUCKET,  # unused in the body: the autotuning key's row bucket (next power of two of M)
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_ym,
    ACTIVATION: tl.constexpr,  # 0 none, 1 gelu, 2 gelu_tanh, 3 quick_gelu
    HAS_BIAS: tl.constexpr,
    HAS_R: tl.constexpr,
    ACT_GRAD: tl.constexpr,
    WRITE_DBIAS: tl.constexpr,
    STORE_H: tl.constexpr,  # forward only: also store h (the training path that saves fc1's pre-activation)
    EVEN_K: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # 1, 2 or 4 column sub-tiles for the epilogue (heuristic, from the tile)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only fp32 operands read it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Ragged rows / columns re-read valid ones (their results are never stored), keeping the K loop mask-free.
    # No max_contiguous hint here: the wrapped indices are not contiguous, and with a transposed operand
    # (unit stride along M or N) such a hint would vectorise loads across the wrap, past the buffer's end.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N): weight.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if EPILOGUE_SPLIT == 1:
        _epilogue(acc, offs_m, pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N), pid_m, B, R, Y, H, DB, M, N,
                  stride_rm, stride_rn, stride_ym, ACTIVATION, HAS_BIAS, ACT_GRAD, WRITE_DBIAS, HAS_R,
                  STORE_H)  # fmt: skip
    else:
        # The epilogue in column sub-tiles (tl.split of the accumulator): the bias, activation, residual and
        # dy tiles of a 128 x 256 accumulator do not fit the register file beside it at once.
        half: tl.constexpr = BLOCK_N // 2
        quarter: tl.constexpr = BLOCK_N // 4
        n0 = pid_n.to(tl.int64) * BLOCK_N
        a0, a1 = _halves(acc, BLOCK_M, half)
        if EPILOGUE_SPLIT == 2:
            _epilogue(a0, offs_m, n0 + tl.arange(0, half), pid_m, B, R, Y, H, DB, M, N,
                      stride_rm, stride_rn, stride_ym, ACTIVATION, HAS_BIAS, ACT_GRAD, WRITE_DBIAS, HAS_R,
                      STORE_H)  # fmt: skip
            _epilogue(a1, offs_m, n0 + half + tl.arange(0, half), pid_m, B, R, Y, H, DB, M, N,
                      stride_rm, stride_rn, stride_ym, ACTIVATION, HAS_BIAS, ACT_GRAD, WRITE_DBIAS, HAS_R,
                      STORE_H)  # fmt: skip
        else:
            a00, a01 = _halves(a0, BLOCK_M, quarter)
            a10, a11 = _halves(a1, BLOCK_M, quarter)
            _epilogue(a00, offs_m, n0 + tl.arange(0, quarter), pid_m, B, R, Y, H, DB, M, N,
                      stride_rm, stride_rn, stride_ym, ACTIVATION, HAS_BIAS, ACT_GRAD, WRITE_DBIAS, HAS_R,
                      STORE_H)  # fmt: skip
            _epilogue(a01, offs_m, n0 + quarter + tl.arange(0, quarter), pid_m, B, R, Y, H, DB, M, N,
                      stride_rm, stride_rn, stride_ym, ACTIVATION, HAS_BIAS, ACT_GRAD, WRITE_DBIAS, HAS_R,
                      STORE_H)  # fmt: skip
            _epilogue(a10, offs_m, n0 + 2 * quarter + tl.arange(0, quarter), pid_m, B, R, Y, H, DB, M, N,
                      stride_rm, stride_rn, stride_ym, ACTIVATION, HAS_BIAS, ACT_GRAD, WRITE_DBIAS, HAS_R,
                      STORE_H)  # fmt: skip
            _epilogue(a11, offs_m, n0 + 3 * quarter + tl.arange(0, quarter), pid_m, B, R, Y, H, DB, M, N,
                      stride_rm, stride_rn, stride_ym, ACTIVATION, HAS_BIAS, ACT_GRAD, WRITE_DBIAS, HAS_R,
                      STORE_H)  # fmt: skip


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, HALF: tl.constexpr):
    """The left and right column halves of a (BLOCK_M, 2 * HALF) tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, pid_m, B, R, Y, H, DB, M, N, stride_rm, stride_rn, stride_ym,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_GRAD: tl.constexpr, WRITE_DBIAS: tl.constexpr,
    HAS_R: tl.constexpr, STORE_H: tl.constexpr,
):  # fmt: skip
    """Bias, activation (or its gradient times dy), residual and the masked store of one column sub-tile
    (with STORE_H also of the pre-activation h, rounded to H's dtype)."""
    h = acc
    if HAS_BIAS:
        h += tl.load(B + offs_n % N).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    r_ptrs = R + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
    if ACT_GRAD:
        dy = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = dy * _activation_grad(h, ACTIVATION)  # 0 on ragged rows and columns (dy masked to 0)
        if WRITE_DBIAS:
            tl.store(DB + pid_m.to(tl.int64) * N + offs_n, tl.sum(out, axis=0), mask=offs_n < N)
    else:
        if STORE_H:
            tl.store(H + offs_m[:, None] * stride_ym + offs_n[None, :], h.to(H.dtype.element_ty), mask=mask)
        out = _activation(h, ACTIVATION)
        if HAS_R:
            out += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(Y.dtype.element_ty), mask=mask)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Hopper/Ampere tiles: big tiles for the large-batch ViT GEMMs, smaller ones for batch 1 (M = 197) and
# narrow N; BLOCK_K = 32 keeps fp32 (TF32) tiles inside shared memory. The 4-stage large tiles (192 KB
# at 16 bits) fit only Hopper's 227 KB per block; the 96 KB 128 x 128 x 64 three-stage tiles run two CTAs
# per SM (registers and shared memory), so one CTA's epilogue overlaps the other's K loop on the K = 768
# GEMMs (qkv, proj, fc1), which have only 12 k-steps per tile.
_CONFIGS = [
    _config(128, 256, 64, 8, 3),
    _config(128, 256, 64, 8, 4),
    _config(256, 128, 64, 8, 3),
    _config(256, 128, 64, 8, 4),
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 4, 3),
    _config(128, 128, 64, 4, 4),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 4, 3),
]
_DEFAULT_CONFIG = _config(128, 128, 32, 4, 4)  # fits every dtype; used for untuned keys during graph capture
_INTERPRET_CONFIG = _config(32, 32, 32, 1, 1, group_m=4)
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in [*_CONFIGS, _DEFAULT_CONFIG, _INTERPRET_CONFIG])


def _shared_bytes(config: triton.Config, elsize: int) -> int:
    """The K loop's operand buffers: one (BLOCK_M + BLOCK_N) x BLOCK_K pair per pipeline stage."""
    return config.num_stages * (config.kwargs["BLOCK_M"] + config.kwargs["BLOCK_N"]) * config.kwargs["BLOCK_K"] * elsize


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles that cannot fit the target GPU's shared memory per block at this dtype (227 KB on sm_90,
    163 KB on sm_80), or whose rows mostly fall past M."""
    elsize = named_args["X"].element_size()
    limit = shared_memory_limit(named_args["X"])
    max_k, max_tile = 64, 256 * 128
    if elsize == 4:
        # fp32 operands (not the fast path: bf16 / fp16 are) take 64 x 64 x 32 tiles only. Larger ones spill
        # on sm_90 (ptxas -v): 64 x 128 x 64 in 4 stages 16 bytes with TF32 and 34,920 with exact fp32 FMA
        # products, 64 x 64 x 64 140 bytes, 128 x 128 x 32 592 bytes (exact products).
        max_k, max_tile = 32, 64 * 64
    max_m = max(64, triton.next_power_of_2(named_args["M"]))
    kept = [
        c for c in configs
        if _shared_bytes(c, elsize) <= limit and c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_K"] <= max_k
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
    ]  # fmt: skip
    return kept or [_DEFAULT_CONFIG]


def _epilogue_split(args: dict) -> int:
    """Column sub-tiles for the epilogue: at most 32 accumulator values per thread at a time for the GELU
    gradient (it also holds dy) and for a forward that also stores h (64 spilled 16-64 bytes in the
    128 x 256 / 256 x 128 tiles, ptxas -v), 64 otherwise (no spills on sm_80 / sm_90 at these counts)."""
    per_thread = args["BLOCK_M"] * args["BLOCK_N"] // (32 * args.get("num_warps", 4))
    budget = 32 if args["ACT_GRAD"] or args.get("STORE_H", False) else 64
    return max(1, min(4, per_thread // budget))


_KEY = [
    "M_BUCKET", "N", "K", "ACTIVATION", "HAS_BIAS", "HAS_R", "ACT_GRAD", "WRITE_DBIAS", "STORE_H", "DOT_PRECISION"
]  # fmt: skip
_even_k = triton.heuristics(
    {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0, "EPILOGUE_SPLIT": _epilogue_split}
)
_linear_fixed = _even_k(_linear_kernel)  # launched with an explicit config
# DB is zeroed before every trial: a taller trial tile writes fewer partial rows than a shorter one did,
# and the stale rows would otherwise be summed into dbias.
_linear_tuned = lazy_autotune(
    configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["DB"]
)(_linear_fixed)
# (device index, dtype, *key values) -> the tuned config, so later launches (and graph captures) skip the autotuner.
_BEST: dict[tuple, triton.Config] = {}


def _dot_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 operands only where torch itself would use it for a matmul; fp16/bf16 ignore this."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _config_kwargs(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    r: Optional[torch.Tensor],
    y: torch.Tensor,
    dbias_part: Optional[torch.Tensor],
    activation: Optional[str],
    act_grad: bool,
    h: Optional[torch.Tensor] = None,
) -> None:
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return
    m_bucket = triton.next_power_of_2(M)
    flags = {
        "ACTIVATION": ACTIVATION_CODES[activation], "HAS_BIAS": bias is not None, "HAS_R": r is not None,
        "ACT_GRAD": act_grad, "WRITE_DBIAS": dbias_part is not None, "STORE_H": h is not None,
        "DOT_PRECISION": _dot_precision(x.dtype),
    }  # fmt: skip
    if h is not None and (h.shape != y.shape or h.stride() != y.stride()):
        raise ValueError(f"linear: h {tuple(h.shape)}{h.stride()} must have y's shape and strides {y.stride()}")
    args = (
        x, weight, bias if bias is not None else weight, r if r is not None else y, y, h if h is not None else y,
        dbias_part if dbias_part is not None else y, M, N, K, m_bucket,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        r.stride(0) if r is not None else 0, r.stride(1) if r is not None else 0, y.stride(0),
    )  # fmt: skip

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    key = (x.device.index, x.dtype, m_bucket, N, K, *flags.values())
    config = _INTERPRET_CONFIG if INTERPRET else _BEST.get(key)
    with device_guard(x):
        if config is None and graph_capturing(x):
            config = _DEFAULT_CONFIG  # benchmarking inside a capture would record the trials
        if config is None:
            _linear_tuned[grid](*args, **flags)
            _BEST[key] = _linear_tuned.best_config
        else:
            _linear_fixed[grid](*args, **flags, **_config_kwargs(config))


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    activation: Optional[str],
    y: torch.Tensor,
    h: Optional[torch.Tensor] = None,
) -> None:
    """Writes ``y = act(x @ weight.T + bias) + residual``; x (M, K), weight (N, K), residual (M, N) may have
    any strides; y is (M, N) with a unit column stride. With ``h`` (y's shape and strides) the same
    epilogue also stores the pre-activation ``x @ weight.T + bias`` there (rounded to h's dtype), and y is
    bit-identical to a launch without it. Without ``h``, on sm_90+ the persistent TMA kernel runs instead
    where it measured faster for the shape (kernels/linear_tma.py; FASTVIT_LINEAR_TMA=0 turns it off)."""
    if h is None and x.is_cuda:

        def pointer(out: torch.Tensor) -> None:
            _launch(x, weight, bias, residual, out, None, activation, act_grad=False)

        if linear_tma.linear_fwd_dispatch(x, weight, bias, residual, activation, y, pointer):
            return
    _launch(x, weight, bias, residual, y, None, activation, act_grad=False, h=h)


def linear_act_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: str,
    g: torch.Tensor,
    need_dbias: bool,
) -> Optional[torch.Tensor]:
    """Writes ``g = dy * act'(x @ weight.T + bias)``, recomputing the pre-activation tile by tile; returns
    sum_rows(g) in fp32 when ``need_dbias`` (reduced from per-row-tile partials), else None."""
    M, N = g.shape
    # Zeroed: the tuned tile height decides how many partial rows get written (at most this many).
    part = torch.zeros((triton.cdiv(M, _MIN_BLOCK_M), N), device=g.device, dtype=torch.float32) if need_dbias else None
    _launch(x, weight, bias, dy, g, part, activation, act_grad=True)
    return part.sum(0) if part is not None else None


# ------------------------------------------------------------------ act'(h) from a saved pre-activation


@triton.jit
def _act_grad_saved_kernel(
    DY,  # (M, N) the output's gradient, strides (stride_dym, stride_dyn)
    H,  # (M, N) the pre-activation saved by the forward, strides (stride_hm, stride_hn)
    G,  # (M, N) output g = dy * act'(h), row stride stride_gm, unit column stride
    DB,  # (cdiv(M, ROWS), N) fp32 dbias partials, one row per program row (WRITE_DBIAS), or unused
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_hm,
    stride_hn,
    stride_gm,
    ACTIVATION: tl.constexpr,
    WRITE_DBIAS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program, a multiple of BLOCK_M: the column sums stay in registers
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, ROWS, BLOCK_M):
        offs_m = pid_m.to(tl.int64) * ROWS + i + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & col_ok[None, :]
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
        h = tl.load(H + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn, mask=mask, other=0.0)
        g = dy.to(tl.float32) * _activation_grad(h.to(tl.float32), ACTIVATION)  # 0 where masked (dy = 0)
        tl.store(G + offs_m[:, None] * stride_gm + offs_n[None, :], g.to(G.dtype.element_ty), mask=mask)
        if WRITE_DBIAS:
            col_sum += tl.sum(g, axis=0)
    if WRITE_DBIAS:
        tl.store(DB + pid_m.to(tl.int64) * N + offs_n, col_sum, mask=col_ok)


# One fixed tile (an elementwise pass: no GEMM to tune): 32 x 128 per step, 256 rows per program, so the
# ViT-B/16 fc1 gradient at batch 256 (M = 50432, N = 3072) runs 197 x 24 programs and writes 197 partial
# rows of dbias. Under the interpreter the tile is smaller.
_SAVED_TILE = {"ROWS": 32, "BLOCK_M": 8, "BLOCK_N": 32, "num_warps": 1} if INTERPRET else {
    "ROWS": 256, "BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4}  # fmt: skip


def linear_act_grad_saved(
    dy: torch.Tensor, h: torch.Tensor, activation: str, g: torch.Tensor, need_dbias: bool
) -> Optional[torch.Tensor]:
    """Writes ``g = dy * act'(h)`` from the pre-activation ``h`` the forward saved (no GEMM); returns
    sum_rows(g) in fp32 when ``need_dbias`` (per-program partials summed in a fixed order: deterministic),
    else None. dy and h (M, N) may have any strides; g is (M, N) with a unit column stride."""
    M, N = g.shape
    rows, block_m, block_n = _SAVED_TILE["ROWS"], _SAVED_TILE["BLOCK_M"], _SAVED_TILE["BLOCK_N"]
    part = torch.zeros((triton.cdiv(M, rows), N), device=g.device, dtype=torch.float32) if need_dbias else None
    if M == 0 or N == 0:
        return part.sum(0) if part is not None else None
    grid = (triton.cdiv(M, rows), triton.cdiv(N, block_n))
    with device_guard(g):
        _act_grad_saved_kernel[grid](
            dy, h, g, part if part is not None else g, M, N,
            dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), g.stride(0),
            ACTIVATION=ACTIVATION_CODES[activation], WRITE_DBIAS=part is not None,
            ROWS=rows, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_SAVED_TILE["num_warps"],
        )  # fmt: skip
    return part.sum(0) if part is not None else None


# ---------------------------------------------------- dW = dy^T @ x with dbias = sum_rows(dy) fused in


@triton.jit
def _wgrad_kernel(
    DY,  # (M, N) the output's gradient, strides (stride_dym, stride_dyn)
    X,  # (M, K) the forward's input, strides (stride_xm, stride_xk)
    DW,  # (SPLITS, N, K) dweight (SPLITS == 1: dy's dtype) or fp32 per-split partials; row stride stride_dwn
    DB,  # (SPLITS, N) fp32 column sums of dy per split (WRITE_DBIAS), or unused
    M,
    N,
    K,
    M_BUCKET,  # unused in the body: the autotuning key's row bucket
    SPLITS,  # unused in the body (the grid's second axis): part of the autotuning key
    ROWS_PER_SPLIT,  # rows of dy / x each split reduces over, a multiple of every BLOCK_M (256)
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_dwn,
    WRITE_DBIAS: tl.constexpr,
    EVEN_M: tl.constexpr,  # M % BLOCK_M == 0 (then every split's rows are whole tiles)
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the reduction step
    GROUP_N: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_K) tile of dW = dy^T @ x over the rows [split * ROWS_PER_SPLIT, +ROWS_PER_SPLIT).
    The programs of the first K tile column (pid_k == 0) also sum the dy tiles they load over those rows:
    the fp32 column sums of dy (dbias) with no second read of dy and no atomics (one writer per (split, n))."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pids_per_group = GROUP_N * num_pid_k
    first_pid_n = (pid // pids_per_group) * GROUP_N
    group_rows = min(num_pid_n - first_pid_n, GROUP_N)
    pid_n = first_pid_n + (pid % pids_per_group) % group_rows
    pid_k = (pid % pids_per_group) // group_rows

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    m_start = split.to(tl.int64) * ROWS_PER_SPLIT
    m_stop = tl.minimum(m_start + ROWS_PER_SPLIT, M)
    # Ragged N / K columns re-read valid ones (never stored), as in _linear_kernel; M is the reduction: masked.
    dy_ptrs = DY + (offs_n % N)[:, None] * stride_dyn + (m_start + offs_m)[None, :] * stride_dym  # (BN, BM): dy^T
    x_ptrs = X + (m_start + offs_m)[:, None] * stride_xm + (offs_k % K)[None, :] * stride_xk  # (BM, BK)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_k = pid_k == 0  # (WRITE_DBIAS tested apart: a constexpr `and` a tensor is not portable to Triton 3.1)
    for m in range(m_start, m_stop, BLOCK_M):
        if EVEN_M:
            a = tl.load(dy_ptrs)
            b = tl.load(x_ptrs)
        else:
            left = m_stop - m
            a = tl.load(dy_ptrs, mask=offs_m[None, :] < left, other=0.0)
            b = tl.load(x_ptrs, mask=offs_m[:, None] < left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if WRITE_DBIAS:
            if first_k:
                col_sum += tl.sum(a.to(tl.float32), axis=1)
        dy_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    dw_ptrs = DW + split.to(tl.int64) * N * stride_dwn + offs_n[:, None] * stride_dwn + offs_k[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask)
    if WRITE_DBIAS:
        if first_k:
            tl.store(DB + split.to(tl.int64) * N + offs_n, col_sum, mask=offs_n < N)


def _wgrad_config(bn: int, bk: int, bm: int, warps: int, stages: int, group_n: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "GROUP_N": group_n}, num_warps=warps, num_stages=stages
    )


# Output tiles (BLOCK_N x BLOCK_K) of the forward's sizes, the reduction step BLOCK_M 64 (32 for fp32); the
# dy tile is loaded transposed ((BLOCK_N, BLOCK_M) with unit stride along N for a contiguous dy).
_WGRAD_CONFIGS = [
    _wgrad_config(128, 256, 64, 8, 3),
    _wgrad_config(256, 128, 64, 8, 3),
    _wgrad_config(128, 128, 64, 8, 3),
    _wgrad_config(128, 128, 64, 4, 4),
    _wgrad_config(128, 128, 32, 4, 4),
    _wgrad_config(128, 64, 64, 4, 4),
    _wgrad_config(64, 128, 64, 4, 4),
    _wgrad_config(64, 64, 64, 4, 4),
    _wgrad_config(64, 64, 32, 4, 3),
]
_WGRAD_DEFAULT_CONFIG = _wgrad_config(128, 128, 32, 4, 4)
_WGRAD_INTERPRET_CONFIG = _wgrad_config(16, 32, 16, 1, 1, group_n=2)
_WGRAD_ROWS_ALIGN = 256  # ROWS_PER_SPLIT is a multiple of this, so of every config's BLOCK_M


def _wgrad_prune(configs: list, named_args: dict, **kwargs) -> list:
    """Tiles that fit the target's shared memory per block at this dtype; fp32 operands take the 64 x 64 x 32
    tile only (the forward's rule: larger fp32 tiles spill there). Below sm_90 (mma.sync: the accumulator
    and the dy tile converted for the column sums share the registers) at most 64 accumulator values per
    thread: the 128-per-thread tiles spill 40-296 bytes on sm_80 in bf16 (benchmarks/kernel_report.py,
    ViT-B/16 bs256), none on sm_90a (wgmma)."""
    elsize = named_args["DY"].element_size()
    limit = shared_memory_limit(named_args["DY"])
    hopper = target_capability(named_args["DY"]) >= 90
    kept = []
    for c in configs:
        bn, bk, bm = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_M"]
        if c.num_stages * (bn + bk) * bm * elsize > limit:
            continue
        if elsize == 4 and (bm > 32 or bn * bk > 64 * 64):
            continue
        if not hopper and bn * bk > 64 * 32 * c.num_warps:
            continue
        kept.append(c)
    return kept or [_WGRAD_DEFAULT_CONFIG]


_wgrad_fixed = triton.heuristics({"EVEN_M": lambda args: args["M"] % args["BLOCK_M"] == 0})(_wgrad_kernel)
# DB is zeroed before every trial: only the pid_k == 0 programs write it.
_wgrad_tuned = lazy_autotune(
    configs=_WGRAD_CONFIGS, key=["M_BUCKET", "N", "K", "SPLITS", "WRITE_DBIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _wgrad_prune}, reset_to_zero=["DB"],
)(_wgrad_fixed)  # fmt: skip
_WGRAD_BEST: dict[tuple, triton.Config] = {}


def _wgrad_splits(M: int, N: int, K: int, programs: int) -> int:
    """Splits of the M reduction: enough (BLOCK_N, BLOCK_K) = 128 x 128 tiles x splits to give every SM two
    programs, at most 16, each split at least 2048 rows. ViT-B/16 at batch 256 (M = 50432, 132 SMs): qkv
    (N 2304, K 768) 108 tiles -> 3 splits, proj 36 tiles -> 8, fc2 (N 768, K 3072) 144 tiles -> 2."""
    tiles = triton.cdiv(N, 128) * triton.cdiv(K, 128)
    want = triton.cdiv(2 * programs, tiles)
    return max(1, min(16, want, M // 2048))


def linear_wgrad(
    dy: torch.Tensor, x: torch.Tensor, need_dbias: bool, splits: Optional[int] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dy.T @ x, sum_rows(dy))`` for a linear without activation: dweight (N, K) in dy's dtype and, when
    ``need_dbias``, the fp32 column sums of dy (else None), both from one pass over dy. dy (M, N) and x
    (M, K) share a dtype (fp16 / bf16 / fp32, TF32 as torch.get_float32_matmul_precision() allows); any
    strides. ``splits`` (default: :func:`_wgrad_splits`) cuts the M reduction into that many row ranges whose
    fp32 partials (dW and dbias) are summed in a fixed order after: deterministic, no atomics."""
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"linear_wgrad: dy (M, N) and x (M, K) must share M, got {tuple(dy.shape)}, {tuple(x.shape)}")
    if dy.dtype != x.dtype or dy.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"linear_wgrad: dy and x must share one of float32/float16/bfloat16, got {dy.dtype}, {x.dtype}")
    M, N = dy.shape
    K = x.shape[1]
    programs = _sm_programs(dy)
    splits = _wgrad_splits(M, N, K, programs) if splits is None else splits
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"linear_wgrad: splits must be an int >= 1, got {splits!r}")
    rows = triton.cdiv(triton.cdiv(max(M, 1), splits), _WGRAD_ROWS_ALIGN) * _WGRAD_ROWS_ALIGN
    splits = max(1, triton.cdiv(M, rows))  # no empty split
    if splits == 1:
        dw = torch.empty((N, K), device=dy.device, dtype=dy.dtype)
    else:
        dw = torch.empty((splits, N, K), device=dy.device, dtype=torch.float32)
    part = torch.zeros((splits, N), device=dy.device, dtype=torch.float32) if need_dbias else None
    if M == 0 or N == 0 or K == 0:
        dw.zero_()
    else:
        flags = {"WRITE_DBIAS": part is not None, "DOT_PRECISION": _dot_precision(dy.dtype)}
        m_bucket = triton.next_power_of_2(M)
        args = (
            dy, x, dw, part if part is not None else dw, M, N, K, m_bucket, splits, rows,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), K,
        )  # fmt: skip

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), splits)

        key = (dy.device.index, dy.dtype, m_bucket, N, K, splits, *flags.values())
        config = _WGRAD_INTERPRET_CONFIG if INTERPRET else _WGRAD_BEST.get(key)
        with device_guard(dy):
            if config is None and graph_capturing(dy):
                config = _WGRAD_DEFAULT_CONFIG
            if config is None:
                _wgrad_tuned[grid](*args, **flags)
                _WGRAD_BEST[key] = _wgrad_tuned.best_config
            else:
                _wgrad_fixed[grid](*args, **flags, **_config_kwargs(config))
    if splits > 1:
        dw = dw.sum(0).to(dy.dtype)
    return dw, (part.sum(0) if part is not None else None)


def _sm_programs(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 132  # H100 / H200 SXM: the compile report's meta tensors and the interpreter


# The measured choice between the fused kernel and the torch pair (fastvit.ops.dispatch.measured_entry, as
# kernels/linear_tma.py chooses its GEMM). (device index, M, N, K, dtype, need dbias) -> "torch" or "fused".
WGRAD_ENV_SWITCH = "FASTVIT_WGRAD_FUSED"
WGRAD_FAMILY = "linear_wgrad"
WGRAD_CHOICES: dict[tuple, str] = {}


def wgrad_enabled() -> bool:
    """False when ``FASTVIT_WGRAD_FUSED=0`` (or ``false`` / ``off`` / ``no``)."""
    import os

    return os.environ.get(WGRAD_ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def _wgrad_device(t: torch.Tensor) -> Optional[torch.device]:
    """The GPU the choice is made for; None off CUDA (the tests stand a CPU tensor in for a GPU one)."""
    return t.device if t.is_cuda else None


def wgrad_signature(M: int, N: int, K: int, dtype: torch.dtype, need_dbias: bool) -> str:
    dt = str(dtype).replace("torch.", "")
    return f"{dt}|M={M}|N={N}|K={K}|dbias={need_dbias}"


def _torch_wgrad(dy: torch.Tensor, x: torch.Tensor, need_dbias: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The unfused pair: cuBLAS's wgrad and torch's fp32 column sum (a second read of dy)."""
    return torch.matmul(dy.t(), x), dy.sum(0, dtype=torch.float32) if need_dbias else None


def linear_wgrad_dispatch(
    dy: torch.Tensor, x: torch.Tensor, need_dbias: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dy.T @ x, fp32 sum_rows(dy) or None)`` by the fused kernel where it measured faster than the torch
    pair for this key, else by the pair: always on CPU tensors, with ``FASTVIT_WGRAD_FUSED=0``,
    ``FASTVIT_DISPATCH=static`` (the static choice, unmeasured), a key neither measured nor cached inside
    CUDA-graph capture or torch.compile tracing, or where the fused kernel raised while timed (refused,
    with the reason, in the dispatch table)."""
    from fastvit.ops import dispatch

    device = _wgrad_device(dy)
    if device is None or not wgrad_enabled() or dispatch.current_mode() == "static":
        return _torch_wgrad(dy, x, need_dbias)
    M, N = dy.shape
    K = x.shape[1]
    key = (device.index, M, N, K, dy.dtype, need_dbias)
    choice = WGRAD_CHOICES.get(key)
    if choice is None:
        if torch.compiler.is_compiling():
            return _torch_wgrad(dy, x, need_dbias)
        entry = dispatch.measured_entry(
            WGRAD_FAMILY,
            wgrad_signature(M, N, K, dy.dtype, need_dbias),
            {"torch": lambda: _torch_wgrad(dy, x, need_dbias), "fused": lambda: linear_wgrad(dy, x, need_dbias)},
            device,
            measure=not graph_capturing(dy),
        )
        if entry is None:
            return _torch_wgrad(dy, x, need_dbias)
        choice = WGRAD_CHOICES.setdefault(key, entry["backend"])
    return linear_wgrad(dy, x, need_dbias) if choice == "fused" else _torch_wgrad(dy, x, need_dbias)


def _register_reset() -> None:
    from fastvit.ops import dispatch

    dispatch._RESET_HOOKS.append(WGRAD_CHOICES.clear)


# Imported last: linear_tma imports this module's epilogue helpers.
from fastvit.kernels import linear_tma  # noqa: E402

_register_reset()

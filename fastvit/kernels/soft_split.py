"""Triton T2T soft split: unfold (im2col) as a gather, with an optional fused LayerNorm per output row.

Geometry: image (B, C, H, W) seen through four strides, so NCHW, channels_last and T2T's token
layout (B, H * W, C) are all read in place; kernel kh x kw, stride sh x sw, zero padding ph x pw,
output grid Ho x Wo, L = Ho * Wo rows per image, F = C * kh * kw features per row. Row
r = b * L + oh * Wo + ow, feature f = c * kh * kw + ki * kw + kj (nn.Unfold's order) reads pixel
x[b, c, oh * sh - ph + ki, ow * sw - pw + kj], 0 outside the image.

Forward: each program gathers BLOCK_R full rows as (rows, channels, window) tiles (padded to powers of
two, at most MAX_TILE per row) and, with LayerNorm, normalises them in registers (fp32 statistics,
kept for the backward). No unfolded copy is ever materialised.

Backward (the fold), deterministic and without atomics: each program owns a tile of input pixels x
channels and gathers the at most ceil(kh / sh) * ceil(kw / sw) output elements that read each pixel.
With LayerNorm, a first kernel recomputes the rows, writes per-row c1 = mean(xhat * w * dy) and
c2 = mean(w * dy) and fp32 partials of dweight / dbias; the fold then forms
du = rstd * (w * dy - xhat * c1 - c2) on the fly from the pixel it is writing, so du is never stored.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastvit._geometry import num_programs, unfold_grid
from fastvit.kernels._common import MAX_GRID_YZ, device_guard

__all__ = [
    "MAX_BATCH",
    "MAX_TILE",
    "fold_tiles",
    "padded_row_elements",
    "row_tiles",
    "soft_split_bwd",
    "soft_split_fwd",
    "soft_split_ln_bwd_stats",
]

MAX_TILE = 16384  # padded features per row, next_pow2(C) * next_pow2(kh * kw), held in registers
MAX_BATCH = MAX_GRID_YZ  # the fold's grid is (pixel tiles, channel tiles, B)


def padded_row_elements(channels: int, window: int) -> int:
    """Padded elements of one output row in the kernels' (channels, window) tile."""
    return triton.next_power_of_2(channels) * triton.next_power_of_2(window)


def row_tiles(channels: int, window: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, BLOCK_KK, num_warps) of the forward and LayerNorm-statistics kernels: about 4096
    padded elements per program (up to 64 rows), one warp per 512.

    The same under the interpreter (which ignores the warps): tests/test_gpu_compile.py compiles the launches
    recorded there for GPU targets, and one warp on a 4096-element tile spills (sm_90: 23-59 KB per thread)."""
    block_c, block_kk = triton.next_power_of_2(channels), triton.next_power_of_2(window)
    block_r = max(1, min(64, 4096 // (block_c * block_kk)))
    elements = block_r * block_c * block_kk
    return block_r, block_c, block_kk, min(max(elements // 512, 1), 8)


def fold_tiles(channels: int) -> tuple[int, int, int]:
    """(BLOCK_PIX, BLOCK_C, num_warps) of the fold kernel.

    512-element tiles over 8 warps: each of the ceil(k/s)^2 unrolled window positions keeps its gathered
    gradient and row statistics live; sm_90 builds of 1024-4096-element tiles needed 150-255 registers
    or spilled, this one needs about 64. The same under the interpreter, so the launches recorded there
    (tests/test_gpu_compile.py) compile the tile and warps a GPU runs."""
    block_c = min(triton.next_power_of_2(channels), 32)
    return 512 // block_c, block_c, 8


@triton.jit
def _gather_tile(r, c, kk, L, Wo, H, W, sx_b, sx_c, sx_h, sx_w, KW: tl.constexpr,
                 SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):  # fmt: skip
    """Offsets and in-image mask of the (rows, channels, window) tile U[r, c * kh * kw + kk].

    The tile is 3-D so that each axis is an affine function of one index: loads can then be coalesced
    along channels (token input, unit channel stride) or along the window (NCHW), whichever is
    contiguous, and the compiler routes the tile through shared memory to the row-major output."""
    b = r // L
    l_ = r % L
    oh = l_ // Wo
    ow = l_ % Wo
    h = oh[:, None] * SH - PH + (kk // KW)[None, :]  # (rows, window)
    w = ow[:, None] * SW - PW + (kk % KW)[None, :]
    pix = b[:, None] * sx_b + h * sx_h + w * sx_w
    offs = pix[:, None, :] + c.to(tl.int64)[None, :, None] * sx_c
    return offs, ((h >= 0) & (h < H) & (w >= 0) & (w < W))[:, None, :]


@triton.jit
def _row_features(C, KH: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_KK: tl.constexpr):
    """The (channels, window) tile of one output row: (c, kk, feature index c * kh * kw + kk, its mask)."""
    c = tl.arange(0, BLOCK_C)
    kk = tl.arange(0, BLOCK_KK)
    feat_ok = (c < C)[:, None] & (kk < KH * KW)[None, :]
    return c, kk, c[:, None] * (KH * KW) + kk[None, :], feat_ok


@triton.jit
def _load_rows(X, r, r_ok, c, kk, feat_ok, L, Wo, H, W, sx_b, sx_c, sx_h, sx_w, KW: tl.constexpr,
               SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):  # fmt: skip
    """Rows r of U as (rows, channels, window) tiles in x's dtype, zero outside the image and the padding,
    and the mask of the real (row, feature) elements."""
    mask = r_ok[:, None, None] & feat_ok[None, :, :]
    offs, in_img = _gather_tile(r, c, kk, L, Wo, H, W, sx_b, sx_c, sx_h, sx_w, KW, SH, SW, PH, PW)
    return tl.load(X + offs, mask=mask & in_img, other=0.0), mask


@triton.jit
def _soft_split_fwd_kernel(
    X,  # image, strides sx_*
    NW,  # (F,) LayerNorm weight or unused
    NB,  # (F,) LayerNorm bias or unused
    Y,  # (B * L, F) contiguous output
    MEAN,  # (B * L,) fp32, written with LayerNorm
    RSTD,  # (B * L,) fp32, written with LayerNorm
    ROWS, L, Wo, H, W, C,
    sx_b, sx_c, sx_h, sx_w,
    eps,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_LN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_KK: tl.constexpr,
):  # fmt: skip
    F = C * (KH * KW)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < ROWS
    c, kk, feat, feat_ok = _row_features(C, KH, KW, BLOCK_C, BLOCK_KK)
    u, mask = _load_rows(X, r, r_ok, c, kk, feat_ok, L, Wo, H, W, sx_b, sx_c, sx_h, sx_w, KW, SH, SW, PH, PW)
    if HAS_LN:
        u = u.to(tl.float32)
        mean = tl.sum(tl.sum(u, axis=2), axis=1) / F
        diff = tl.where(mask, u - mean[:, None, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(diff * diff, axis=2), axis=1) / F + eps)
        u = diff * rstd[:, None, None] * tl.load(NW + feat, mask=feat_ok, other=0.0).to(tl.float32)[None, :, :]
        if HAS_BIAS:
            u += tl.load(NB + feat, mask=feat_ok, other=0.0).to(tl.float32)[None, :, :]
        tl.store(MEAN + r, mean, mask=r_ok)
        tl.store(RSTD + r, rstd, mask=r_ok)
    tl.store(Y + r[:, None, None] * F + feat[None, :, :], u.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _soft_split_ln_bwd_stats_kernel(
    DY,  # (B * L, F) contiguous upstream gradient
    X,  # image, strides sx_*
    NW,  # (F,) LayerNorm weight
    MEAN,  # (B * L,) fp32
    RSTD,  # (B * L,) fp32
    C1,  # (B * L,) fp32 output: mean(xhat * w * dy)
    C2,  # (B * L,) fp32 output: mean(w * dy)
    DW_PART,  # (programs, F) fp32 partials of dweight
    DB_PART,  # (programs, F) fp32 partials of dbias, or unused
    ROWS, L, Wo, H, W, C,
    sx_b, sx_c, sx_h, sx_w,
    rows_per_program,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_KK: tl.constexpr,
):  # fmt: skip
    F = C * (KH * KW)
    pid = tl.program_id(0).to(tl.int64)
    c, kk, feat, feat_ok = _row_features(C, KH, KW, BLOCK_C, BLOCK_KK)
    w = tl.load(NW + feat, mask=feat_ok, other=0.0).to(tl.float32)[None, :, :]
    acc_dw = tl.zeros((BLOCK_C, BLOCK_KK), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_C, BLOCK_KK), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, ROWS)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < row_end
        u, mask = _load_rows(X, r, r_ok, c, kk, feat_ok, L, Wo, H, W, sx_b, sx_c, sx_h, sx_w, KW, SH, SW, PH, PW)
        u = u.to(tl.float32)
        dy = tl.load(DY + r[:, None, None] * F + feat[None, :, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + r, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (u - mean[:, None, None]) * rstd[:, None, None], 0.0)
        wdy = w * dy
        tl.store(C1 + r, tl.sum(tl.sum(xhat * wdy, axis=2), axis=1) / F, mask=r_ok)
        tl.store(C2 + r, tl.sum(tl.sum(wdy, axis=2), axis=1) / F, mask=r_ok)
        acc_dw += tl.sum(dy * xhat, axis=0)
        acc_db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * F + feat, acc_dw, mask=feat_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * F + feat, acc_db, mask=feat_ok)


@triton.jit
def _soft_split_fold_kernel(
    DY,  # (B * L, F) contiguous upstream gradient (of the LayerNorm output when HAS_LN)
    X,  # image, strides sx_* (read only with LayerNorm)
    NW,  # (F,) LayerNorm weight or unused
    MEAN, RSTD, C1, C2,  # (B * L,) fp32 row statistics, used with LayerNorm
    DX,  # image gradient, strides sd_*
    C, H, W, L, Ho, Wo, F,
    sx_b, sx_c, sx_h, sx_w,
    sd_b, sd_c, sd_h, sd_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_LN: tl.constexpr,
    BLOCK_PIX: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pix = tl.program_id(0) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    pix_ok = pix < H * W
    c_ok = c < C
    h = pix // W
    w = pix % W
    tile_mask = pix_ok[:, None] & c_ok[None, :]
    if HAS_LN:
        xv = tl.load(
            X + b * sx_b + (h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w)[:, None] + c.to(tl.int64)[None, :] * sx_c,
            mask=tile_mask,
            other=0.0,
        ).to(tl.float32)
    acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=tl.float32)
    # Kernel rows ki that land on pixel row h: ki = (h + PH) % SH + i * SH, oh = (h + PH - ki) / SH.
    for i in tl.static_range((KH + SH - 1) // SH):
        ki = (h + PH) % SH + i * SH
        oh = (h + PH - ki) // SH
        row_ok = (ki < KH) & (h + PH - ki >= 0) & (oh < Ho)
        for j in tl.static_range((KW + SW - 1) // SW):
            kj = (w + PW) % SW + j * SW
            ow = (w + PW - kj) // SW
            ok = row_ok & (kj < KW) & (w + PW - kj >= 0) & (ow < Wo) & pix_ok
            r = b * L + (oh * Wo + ow).to(tl.int64)
            f = c[None, :] * (KH * KW) + (ki * KW + kj)[:, None]
            m = ok[:, None] & c_ok[None, :]
            g = tl.load(DY + r[:, None] * F + f, mask=m, other=0.0).to(tl.float32)
            if HAS_LN:
                mean = tl.load(MEAN + r, mask=ok, other=0.0)
                rstd = tl.load(RSTD + r, mask=ok, other=0.0)
                c1 = tl.load(C1 + r, mask=ok, other=0.0)
                c2 = tl.load(C2 + r, mask=ok, other=0.0)
                nw = tl.load(NW + f, mask=m, other=0.0).to(tl.float32)
                xhat = (xv - mean[:, None]) * rstd[:, None]
                g = tl.where(m, rstd[:, None] * (nw * g - xhat * c1[:, None] - c2[:, None]), 0.0)
            acc += g
    offs = b * sd_b + (h.to(tl.int64) * sd_h + w.to(tl.int64) * sd_w)[:, None] + c.to(tl.int64)[None, :] * sd_c
    tl.store(DX + offs, acc.to(DX.dtype.element_ty), mask=tile_mask)


def soft_split_fwd(
    x: torch.Tensor,
    image_strides: tuple[int, int, int, int],
    geometry: tuple[int, int, int, int],
    kernel: tuple[int, int, int, int, int, int],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    eps: float,
    y: torch.Tensor,
    mean: Optional[torch.Tensor],
    rstd: Optional[torch.Tensor],
) -> None:
    """Writes y (B * L, F) and, with LayerNorm, the fp32 row mean / rstd.

    ``image_strides`` are the (b, c, h, w) strides through which ``x`` is read as an image;
    ``geometry`` = (B, C, H, W); ``kernel`` = (kh, kw, sh, sw, ph, pw)."""
    B, C, H, W = geometry
    kh, kw, sh, sw, ph, pw = kernel
    Ho, Wo = unfold_grid(H, W, kernel)
    rows = y.shape[0]
    if rows == 0:
        return
    block_r, block_c, block_kk, warps = row_tiles(C, kh * kw)
    with device_guard(x):
        _soft_split_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x, norm_weight if norm_weight is not None else y, norm_bias if norm_bias is not None else y, y,
            mean if mean is not None else y, rstd if rstd is not None else y,
            rows, Ho * Wo, Wo, H, W, C, *image_strides, eps,
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, HAS_LN=norm_weight is not None, HAS_BIAS=norm_bias is not None,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_KK=block_kk, num_warps=warps,
        )  # fmt: skip


def soft_split_ln_bwd_stats(
    dy: torch.Tensor,
    x: torch.Tensor,
    image_strides: tuple[int, int, int, int],
    geometry: tuple[int, int, int, int],
    kernel: tuple[int, int, int, int, int, int],
    norm_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """LayerNorm backward statistics: returns per-row fp32 (c1, c2) and the fp32 (programs, F) partials
    of dweight and dbias (None without a bias)."""
    B, C, H, W = geometry
    kh, kw, sh, sw, ph, pw = kernel
    Ho, Wo = unfold_grid(H, W, kernel)
    rows, F = dy.shape
    programs = num_programs(dy, rows)
    c1 = torch.empty((rows,), device=dy.device, dtype=torch.float32)
    c2 = torch.empty((rows,), device=dy.device, dtype=torch.float32)
    dw_part = torch.zeros((programs, F), device=dy.device, dtype=torch.float32)
    db_part = torch.zeros((programs, F), device=dy.device, dtype=torch.float32) if has_bias else None
    if rows == 0:
        return c1, c2, dw_part, db_part
    block_r, block_c, block_kk, warps = row_tiles(C, kh * kw)
    with device_guard(dy):
        _soft_split_ln_bwd_stats_kernel[(programs,)](
            dy, x, norm_weight, mean, rstd, c1, c2, dw_part, db_part if db_part is not None else dw_part,
            rows, Ho * Wo, Wo, H, W, C, *image_strides, triton.cdiv(rows, programs),
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, HAS_BIAS=has_bias,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_KK=block_kk, num_warps=warps,
        )  # fmt: skip
    return c1, c2, dw_part, db_part


def soft_split_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    image_strides: tuple[int, int, int, int],
    geometry: tuple[int, int, int, int],
    kernel: tuple[int, int, int, int, int, int],
    dx: torch.Tensor,
    dx_strides: tuple[int, int, int, int],
    norm_weight: Optional[torch.Tensor] = None,
    stats: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> None:
    """The fold: writes every element of dx (read through ``dx_strides`` as an image). With LayerNorm,
    ``stats`` = (mean, rstd, c1, c2) and dy is the gradient of the normalised rows."""
    B, C, H, W = geometry
    kh, kw, sh, sw, ph, pw = kernel
    Ho, Wo = unfold_grid(H, W, kernel)
    F = dy.shape[1]
    if B * C * H * W == 0:
        return
    block_pix, block_c, warps = fold_tiles(C)
    has_ln = norm_weight is not None
    mean, rstd, c1, c2 = stats if has_ln else (dy, dy, dy, dy)
    grid = (triton.cdiv(H * W, block_pix), triton.cdiv(C, block_c), B)
    with device_guard(dy):
        _soft_split_fold_kernel[grid](
            dy, x, norm_weight if has_ln else dy, mean, rstd, c1, c2, dx,
            C, H, W, Ho * Wo, Ho, Wo, F, *image_strides, *dx_strides,
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, HAS_LN=has_ln,
            BLOCK_PIX=block_pix, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip

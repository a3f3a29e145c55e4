"""Triton LayerNorm with an optional fused residual add, forward and backward.

Forward, one program per ROWS rows (a (ROWS, BLOCK_N) tile in registers, weight and bias loaded once per
program; rows up to ``MAX_COLS`` wide):
    z = x + residual   (rounded to x's dtype and stored: the transformer's residual stream)
    y = (z - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var(z) + eps), statistics in fp32

Backward, 8 programs per SM each walk a contiguous chunk of rows (a software-pipelined loop: the next
rows' loads are in flight while one row is reduced) and keep fp32 running sums of
dweight = sum(dy * xhat) and dbias = sum(dy) in registers, written once as a partial row; the launcher
reduces the (programs, cols) partials. dz = rstd * (w*dy - xhat*mean(w*dy*xhat) - mean(w*dy)) plus the
incoming gradient of the residual stream is both dx and dresidual.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastvit._geometry import num_programs
from fastvit.kernels._common import device_guard

__all__ = ["MAX_COLS", "layer_norm_bwd", "layer_norm_fwd"]

MAX_COLS = 32768  # one row in registers: 32768 fp32 values is the most a program holds sensibly


def _num_warps(block: int) -> int:
    """Warps for a tile of ``block`` values: 8 values per thread, 1 to 16 warps. The same under the
    interpreter (which ignores it), so tests/test_gpu_compile.py compiles recorded launches as a GPU runs them."""
    return min(max(block // 256, 1), 16)


def _rows_per_program(block_n: int) -> int:
    """Forward rows per program: a tile of up to 4096 values (4 rows at C = 768 / 1024, 2 at 1280), at
    most 8 rows; wide rows (C > 4096) one at a time."""
    return max(1, min(8, 4096 // block_n))


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x
    R,  # (M, N) residual or unused, row stride stride_r
    W,  # (N,) weight
    B,  # (N,) bias or unused
    Y,  # (M, N) output, row stride stride_y
    RO,  # (M, N) x + residual, written when HAS_RESIDUAL
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    M,
    N,
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program: one (ROWS, BLOCK_N) tile, weight and bias loaded once for them
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z_stored = (z + r).to(RO.dtype.element_ty)
        tl.store(RO + rows[:, None] * stride_ro + cols[None, :], z_stored, mask=mask)
        z = z_stored.to(tl.float32)
    mean = tl.sum(z, axis=1) / N
    diff = tl.where(col_mask[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
    y = diff * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rows < M)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # (M, N) upstream gradient of y, row stride stride_dy
    DRO,  # (M, N) upstream gradient of x + residual, or unused
    Z,  # (M, N) the normalised input (x + residual), row stride stride_z
    W,  # (N,) weight
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    DZ,  # (M, N) output: dx (= dresidual)
    DW_PART,  # (programs, N) fp32 partial sums of dweight
    DB_PART,  # (programs, N) fp32 partial sums of dbias, or unused
    M,
    N,
    stride_dy,
    stride_dro,
    stride_z,
    stride_dz,
    rows_per_program,
    HAS_DRO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # row-loop pipeline depth
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in tl.range(row_start, row_end, num_stages=NUM_STAGES):
        z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (z - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dz = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DRO:
            dz += tl.load(DRO + row * stride_dro + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DZ + row * stride_dz + cols, dz.to(DZ.dtype.element_ty), mask=mask)
        acc_dw += dy * xhat
        acc_db += dy
    tl.store(DW_PART + pid * N + cols, acc_dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, acc_db, mask=mask)


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    eps: float,
    y: torch.Tensor,
    residual_out: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> None:
    """Launches the forward on 2-D row views (unit last stride); writes y, residual_out, mean, rstd."""
    M, N = x.shape
    if M == 0:
        return
    block_n = triton.next_power_of_2(N)
    rows = _rows_per_program(block_n)
    with device_guard(x):
        _layer_norm_fwd_kernel[(triton.cdiv(M, rows),)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            y, residual_out if residual_out is not None else y, mean, rstd,
            M, N, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            residual_out.stride(0) if residual_out is not None else 0, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, ROWS=rows, BLOCK_N=block_n,
            num_warps=_num_warps(rows * block_n),
        )  # fmt: skip


def layer_norm_bwd(
    dy: torch.Tensor,
    dresidual_out: Optional[torch.Tensor],
    z: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dz: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launches the backward; writes dz and returns the fp32 (programs, N) partials of dweight, dbias."""
    M, N = z.shape
    programs = num_programs(z, M, per_sm=8 if z.is_cuda else 4)  # 4 under the CPU interpreter, as before
    dw_part = torch.empty((programs, N), device=z.device, dtype=torch.float32)
    db_part = torch.empty((programs, N), device=z.device, dtype=torch.float32) if has_bias else None
    if M == 0:
        dw_part.zero_()
        if db_part is not None:
            db_part.zero_()
        return dw_part, db_part
    block_n = triton.next_power_of_2(N)
    rows_per_program = triton.cdiv(M, programs)
    with device_guard(z):
        _layer_norm_bwd_kernel[(programs,)](
            dy, dresidual_out if dresidual_out is not None else dy, z, weight, mean, rstd, dz,
            dw_part, db_part if db_part is not None else dw_part,
            M, N, dy.stride(0), dresidual_out.stride(0) if dresidual_out is not None else 0,
            z.stride(0), dz.stride(0), rows_per_program,
            HAS_DRO=dresidual_out is not None, HAS_BIAS=has_bias, BLOCK_N=block_n,
            NUM_STAGES=3, num_warps=_num_warps(block_n),
        )  # fmt: skip
    return dw_part, db_part

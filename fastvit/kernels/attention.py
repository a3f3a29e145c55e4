"""Triton flash attention for ViT shapes: forward and backward, online softmax, fp32 accumulation.

Layout: every tensor is a (B, H, N, D) view with a unit last stride and arbitrary batch/head/token
strides, so q, k, v can be read straight out of a packed (B, N, 3*H*D) qkv and the output (and dq/dk/dv)
written straight into (B, N, H*D) / (B, N, 3*H*D) buffers. Grids are (token blocks, H, B) so programs
of one head run next to each other and share K/V in L2; batch and head offsets are int64.

Forward, one program per BLOCK_M queries of one (b, h): loop over BLOCK_N keys keeping the running max
m and sum l of exp2(scale*log2(e) * q.k - m) (base-2 exponentials fold the log2(e) into the scale; the
row max is taken on the raw scores, so each score's scale and shift is one FFMA), the fp32 accumulator
rescaled by exp2(m_old - m_new). Full key blocks are mask-free; the ragged rest runs in bounds-checked
blocks of BLOCK_TAIL = 16 keys, so any N works and N = 197 computes 208 keys, not 256. Stores out in
the input dtype and lse = m + log(l) (natural log, fp32) for the backward.

Backward (FlashAttention-2 structure): a pre-pass stores Delta = rowsum(dout * out) in fp32; then one
launch whose first programs each own BLOCK_N keys and loop over all queries to accumulate dk, dv, and
whose remaining programs each own BLOCK_M queries and loop over all keys to accumulate dq. P is
recomputed from lse. That visits every score twice: 7 matmuls and 2 exponentials per score.
On sm_90, short sequences (Nq, Nk <= 256, a power-of-two D, a next_power_of_2(Nq) x D fp32 dq of at
most 256 x 64) instead run
:func:`_attn_bwd_short_kernel`, one program per (b, h): all queries in one tile, the program walks the key
blocks once, each key block's dk and dv are finished in that one visit, and dq accumulates on chip and is
written once: 5 matmuls (S, dP, dV, dK, dQ) and 1 exponential per score. Dropout is supported by both.
No atomics: the backward is deterministic (bitwise reproducible) by construction.

Head dims: any D with D % 8 == 0 and 16 <= D <= 128, split into a power-of-two part BLOCK_D0 and a
masked tail BLOCK_D1 (0 when D is a power of two): D=80 runs as 64 + 16 and D=96 as 64 + 32, so
ViT-H/14 pays for 80 columns, not 128. Each matmul over D is two tl.dot calls.

Dropout: keep(b, h, i, j) = rand(key + b*H + h, i*Nk + j) >= p with Triton's Philox ``tl.rand``; the
(1,) int64 key tensor is drawn from torch's generator by the caller and loaded in the kernel (no host
sync, CUDA-graph safe). :func:`dropout_keep_mask` materialises the same mask for tests.

fp32 inputs: ``input_precision`` is "ieee" (exact fp32 products, no tensor cores) or "tf32", chosen by
the caller from ``torch.get_float32_matmul_precision()``; fp16/bf16 always use tensor cores.

Autotuning: small config lists keyed on (N bucket = next power of two of max(Nq, Nk), D, dtype), pruned
by N; one config under the interpreter. Inside CUDA-graph capture the autotuner never runs: the config
already chosen for that key (or the first config that survives pruning) is launched directly.
"""

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from fastvit.kernels import INTERPRET
from fastvit.kernels._common import (
    MAX_GRID_YZ,
    LazyAutotune,
    device_guard,
    launch_autotuned,
    lazy_autotune,
    target_capability,
)

__all__ = [
    "MAX_HEAD_DIM",
    "attention_bwd",
    "attention_fwd",
    "dropout_keep_mask",
    "head_dim_blocks",
    "unsupported_reasons",
    "uses_short_backward",
]

SHORT_MAX_TOKENS = 256  # the short backward holds every query (<= 256) of one (b, h) in one tile
SHORT_MAX_DQ = 256 * 64  # and at most this many fp32 dq elements (256 x 64: 64 KB, 64 registers at 8 warps)
MAX_HEAD_DIM = 128  # q, k, v, acc tiles of BLOCK x 128 already fill the register file
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)
_INT32_MAX = 2**31 - 1


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the largest power of two <= D, and the masked tail (0, or >= 16 for tl.dot)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    tail = head_dim - d0
    return d0, (max(16, triton.next_power_of_2(tail)) if tail else 0)


def unsupported_reasons(
    head_dim: int, q_tokens: int, k_tokens: int, dropout_p: float = 0.0, batch: int = 1, heads: int = 1
) -> list[str]:
    """Why the Triton kernels cannot serve these sizes (empty list: they can)."""
    reasons = []
    if batch > MAX_GRID_YZ or heads > MAX_GRID_YZ:  # grid = (token blocks, H, B)
        reasons.append(
            f"batch {batch} or heads {heads} exceeds {MAX_GRID_YZ}, the CUDA grid's y/z limit the kernels launch "
            "heads and batch on; split the batch"
        )
    if k_tokens == 0:
        reasons.append("k and v have no tokens: the kernels' softmax needs at least one key")
    if head_dim % 8 != 0 or not 16 <= head_dim <= MAX_HEAD_DIM:
        reasons.append(
            f"head_dim {head_dim} is not supported by the Triton attention kernels (needs a multiple of 8 "
            f"between 16 and {MAX_HEAD_DIM})"
        )
    if dropout_p > 0 and q_tokens * k_tokens > _INT32_MAX:
        reasons.append(
            f"dropout with {q_tokens} x {k_tokens} tokens exceeds the kernels' int32 Philox counter (Nq * Nk < 2**31)"
        )
    return reasons


# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_tile(base, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
    """A (rows, cols) tile of a (N, D) matrix with unit column stride; zeros outside N (and D if MASK_COLS)."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)


@triton.jit
def _store_tile(base, tile, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tile = tile.to(base.dtype.element_ty)
    if MASK_COLS:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)


@triton.jit
def _dropout_keep(SEED, bh, counters, dropout_p):
    """True where the attention weight survives: one Philox stream per (batch, head), counter i*Nk + j."""
    key = tl.load(SEED) + bh
    return tl.rand(key, counters) >= dropout_p


@triton.jit
def _bwd_products(
    a0, a1, b0, b1,  # the tiles the program holds (two head-dim parts each; the second unread if BLOCK_D1 == 0)
    x_base, y_base, rows, cols0, cols1, stride_x, stride_y, n_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D1: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The backward's two products against the tiles it walks over: loads rows of x and y (both head-dim
    parts) and returns (a @ x^T, b @ y^T, x0, y0, x1, y1). The key-block pass holds (k, v) and walks
    (q, dout) for S^T and dP^T; the query-block pass holds (q, dout) and walks (k, v) for S and dP."""
    x0 = _load_tile(x_base, rows, cols0, stride_x, n_rows, HEAD_DIM, False)
    y0 = _load_tile(y_base, rows, cols0, stride_y, n_rows, HEAD_DIM, False)
    ax = tl.dot(a0, tl.trans(x0), input_precision=PRECISION)
    by = tl.dot(b0, tl.trans(y0), input_precision=PRECISION)
    if BLOCK_D1 > 0:
        x1 = _load_tile(x_base, rows, cols1, stride_x, n_rows, HEAD_DIM, True)
        y1 = _load_tile(y_base, rows, cols1, stride_y, n_rows, HEAD_DIM, True)
        ax += tl.dot(a1, tl.trans(x1), input_precision=PRECISION)
        by += tl.dot(b1, tl.trans(y1), input_precision=PRECISION)
    else:  # placeholders so the return holds; the caller never reads them when BLOCK_D1 == 0
        x1, y1 = x0, y0
    return ax, by, x0, y0, x1, y1


@triton.jit
def _fwd_key_block(
    acc0, acc1, m_i, l_i,  # running output (two head-dim parts), max and sum for BLOCK_M queries
    q0, q1, k_base, v_base, start_n, offs_m, cols0, cols1, stride_kn, stride_vn,
    N_K, qk_scale, SEED, bh, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D1: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, NEG_SCALE: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over keys [start_n, start_n + BLOCK_N). Only the tail block masks keys
    (MASK_KEYS); m_i is the running max of the scaled base-2 scores, so each score costs one FFMA
    (qk * scale - m) before its exp2: the row max is taken on the raw scores and scaled once per row."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k0 = _load_keys(k_base, offs_n, cols0, stride_kn, N_K, HEAD_DIM, False, MASK_KEYS)
    qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    if BLOCK_D1 > 0:
        k1 = _load_keys(k_base, offs_n, cols1, stride_kn, N_K, HEAD_DIM, True, MASK_KEYS)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
    # A negative scale turns the smallest raw score into the largest scaled one. In the tail block the keys
    # past N_K (zero rows: finite scores) are left out of the row statistic and their weights zeroed.
    valid = offs_n[None, :] < N_K
    if NEG_SCALE:
        stat = tl.min(tl.where(valid, qk, float("inf")) if MASK_KEYS else qk, 1)
    else:
        stat = tl.max(tl.where(valid, qk, float("-inf")) if MASK_KEYS else qk, 1)
    m_new = tl.maximum(m_i, stat * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    if MASK_KEYS:
        p = tl.where(valid, p, 0.0)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(SEED, bh, offs_m[:, None] * N_K + offs_n[None, :], dropout_p)
        p = tl.where(keep, p, 0.0)
    v0 = _load_keys(v_base, offs_n, cols0, stride_vn, N_K, HEAD_DIM, False, MASK_KEYS)
    acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
    if BLOCK_D1 > 0:
        v1 = _load_keys(v_base, offs_n, cols1, stride_vn, N_K, HEAD_DIM, True, MASK_KEYS)
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _load_keys(base, rows, cols, stride_row, n_rows, HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr,
               MASK_ROWS: tl.constexpr):  # fmt: skip
    """A key / value tile; rows are bounds-checked only in the tail block."""
    if MASK_ROWS:
        return _load_tile(base, rows, cols, stride_row, n_rows, HEAD_DIM, MASK_COLS)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if MASK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, Nq, D) strides (stride_qb, stride_qh, stride_qn, 1)
    K,  # (B, H, Nk, D)
    V,  # (B, H, Nk, D)
    OUT,  # (B, H, Nq, D) output
    LSE,  # (B, H, Nq) fp32 output, contiguous: natural-log logsumexp of the scaled scores
    SEED,  # (1,) int64 Philox key (read only with DROPOUT)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N_Q, N_K,
    N_BUCKET,  # autotune key only
    scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, NEG_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(q_base, offs_m, cols0, stride_qn, N_Q, HEAD_DIM, False)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    if BLOCK_D1 > 0:
        cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(q_base, offs_m, cols1, stride_qn, N_Q, HEAD_DIM, True)
        acc1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
    else:  # placeholders so the helper's signature holds; it never reads them when BLOCK_D1 == 0
        cols1, q1, acc1 = cols0, q0, acc0
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qk_scale = scale * _LOG2E
    bh = b * H + h
    # Full key blocks run mask-free; the ragged rest runs in blocks of BLOCK_TAIL (<= BLOCK_N) keys with the
    # bounds check, so N = 197 at BLOCK_N = 64 computes 192 + 16 keys, not 256.
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _fwd_key_block(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, offs_m, cols0, cols1, stride_kn, stride_vn,
            N_K, qk_scale, SEED, bh, dropout_p,
            HEAD_DIM, BLOCK_D1, DROPOUT, PRECISION, BLOCK_N, False, NEG_SCALE,
        )  # fmt: skip
    for start_n in range(n_full, N_K, BLOCK_TAIL):
        acc0, acc1, m_i, l_i = _fwd_key_block(
            acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, start_n, offs_m, cols0, cols1, stride_kn, stride_vn,
            N_K, qk_scale, SEED, bh, dropout_p,
            HEAD_DIM, BLOCK_D1, DROPOUT, PRECISION, BLOCK_TAIL, True, NEG_SCALE,
        )  # fmt: skip
    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    o_base = OUT + b * stride_ob + h * stride_oh
    _store_tile(o_base, acc0 * inv_l[:, None], offs_m, cols0, stride_on, N_Q, HEAD_DIM, False)
    if BLOCK_D1 > 0:
        _store_tile(o_base, acc1 * inv_l[:, None], offs_m, cols1, stride_on, N_Q, HEAD_DIM, True)
    lse = (m_i + tl.log2(l_i)) * _LN2  # back to natural log
    tl.store(LSE + (b * H + h) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_delta_kernel(
    OUT,  # (B, H, Nq, D) forward output
    DO,  # (B, H, Nq, D) upstream gradient
    DELTA,  # (B, H, Nq) fp32 output, contiguous: rowsum(dout * out)
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    o_base = OUT + b * stride_ob + h * stride_oh
    do_base = DO + b * stride_dob + h * stride_doh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_D0)
    o = _load_tile(o_base, offs_m, cols0, stride_on, N_Q, HEAD_DIM, False).to(tl.float32)
    do = _load_tile(do_base, offs_m, cols0, stride_don, N_Q, HEAD_DIM, False).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if BLOCK_D1 > 0:
        cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        o = _load_tile(o_base, offs_m, cols1, stride_on, N_Q, HEAD_DIM, True).to(tl.float32)
        do = _load_tile(do_base, offs_m, cols1, stride_don, N_Q, HEAD_DIM, True).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + (b * H + h) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V,  # (B, H, N, D) forward inputs
    DO,  # (B, H, Nq, D) upstream gradient
    LSE, DELTA,  # (B, H, Nq) fp32, contiguous
    DQ, DK, DV,  # (B, H, N, D) outputs (any strides with unit last stride, e.g. views of one dqkv)
    SEED,  # (1,) int64 Philox key (read only with DROPOUT)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N_Q, N_K,
    N_BUCKET,  # autotune key only
    scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh * N_Q
    delta_base = DELTA + bh * N_Q
    qk_scale = scale * _LOG2E
    inv_keep = 1.0 / (1.0 - dropout_p)
    cols0 = tl.arange(0, BLOCK_D0)
    if BLOCK_D1 > 0:
        cols1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    else:  # placeholder for _bwd_products' signature
        cols1 = cols0
    num_kv_blocks = tl.cdiv(N_K, BLOCK_N)
    if pid < num_kv_blocks:
        # dk, dv for BLOCK_N keys; scores are computed transposed, (keys, queries).
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = _load_tile(k_base, offs_n, cols0, stride_kn, N_K, HEAD_DIM, False)
        v0 = _load_tile(v_base, offs_n, cols0, stride_vn, N_K, HEAD_DIM, False)
        dk0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
        dv0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
        if BLOCK_D1 > 0:
            k1 = _load_tile(k_base, offs_n, cols1, stride_kn, N_K, HEAD_DIM, True)
            v1 = _load_tile(v_base, offs_n, cols1, stride_vn, N_K, HEAD_DIM, True)
            dk1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
            dv1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
        else:
            k1, v1 = k0, v0
        for start_m in range(0, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            valid_m = offs_m < N_Q
            qkT, dpT, q0, do0, q1, do1 = _bwd_products(
                k0, k1, v0, v1, q_base, do_base, offs_m, cols0, cols1, stride_qn, stride_don, N_Q,
                HEAD_DIM, BLOCK_D1, PRECISION,
            )  # fmt: skip
            lse = tl.load(lse_base + offs_m, mask=valid_m, other=0.0) * _LOG2E
            delta = tl.load(delta_base + offs_m, mask=valid_m, other=0.0)
            pT = tl.where(valid_m[None, :], tl.exp2(qkT * qk_scale - lse[None, :]), 0.0)
            if DROPOUT:
                keep = _dropout_keep(SEED, bh, offs_m[None, :] * N_K + offs_n[:, None], dropout_p)
                p_dropped = tl.where(keep, pT * inv_keep, 0.0)
                dpT = tl.where(keep, dpT * inv_keep, 0.0)
            else:
                p_dropped = pT
            dsT = pT * (dpT - delta[None, :])
            dv0 += tl.dot(p_dropped.to(do0.dtype), do0, input_precision=PRECISION)
            dk0 += tl.dot(dsT.to(q0.dtype), q0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dv1 += tl.dot(p_dropped.to(do1.dtype), do1, input_precision=PRECISION)
                dk1 += tl.dot(dsT.to(q1.dtype), q1, input_precision=PRECISION)
        dk_base = DK + b * stride_dkb + h * stride_dkh
        dv_base = DV + b * stride_dvb + h * stride_dvh
        _store_tile(dk_base, dk0 * scale, offs_n, cols0, stride_dkn, N_K, HEAD_DIM, False)
        _store_tile(dv_base, dv0, offs_n, cols0, stride_dvn, N_K, HEAD_DIM, False)
        if BLOCK_D1 > 0:
            _store_tile(dk_base, dk1 * scale, offs_n, cols1, stride_dkn, N_K, HEAD_DIM, True)
            _store_tile(dv_base, dv1, offs_n, cols1, stride_dvn, N_K, HEAD_DIM, True)
    else:
        # dq for BLOCK_M queries, looping over all keys (its own pass: no atomics).
        offs_m = (pid - num_kv_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid_m = offs_m < N_Q
        q0 = _load_tile(q_base, offs_m, cols0, stride_qn, N_Q, HEAD_DIM, False)
        do0 = _load_tile(do_base, offs_m, cols0, stride_don, N_Q, HEAD_DIM, False)
        dq0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
        if BLOCK_D1 > 0:
            q1 = _load_tile(q_base, offs_m, cols1, stride_qn, N_Q, HEAD_DIM, True)
            do1 = _load_tile(do_base, offs_m, cols1, stride_don, N_Q, HEAD_DIM, True)
            dq1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
        else:
            q1, do1 = q0, do0
        lse = tl.load(lse_base + offs_m, mask=valid_m, other=0.0) * _LOG2E
        delta = tl.load(delta_base + offs_m, mask=valid_m, other=0.0)
        for start_n in range(0, N_K, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk, dp, k0, v0, k1, v1 = _bwd_products(
                q0, q1, do0, do1, k_base, v_base, offs_n, cols0, cols1, stride_kn, stride_vn, N_K,
                HEAD_DIM, BLOCK_D1, PRECISION,
            )  # fmt: skip
            p = tl.where(offs_n[None, :] < N_K, tl.exp2(qk * qk_scale - lse[:, None]), 0.0)
            if DROPOUT:
                keep = _dropout_keep(SEED, bh, offs_m[:, None] * N_K + offs_n[None, :], dropout_p)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = p * (dp - delta[:, None])
            dq0 += tl.dot(ds.to(k0.dtype), k0, input_precision=PRECISION)
            if BLOCK_D1 > 0:
                dq1 += tl.dot(ds.to(k1.dtype), k1, input_precision=PRECISION)
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        _store_tile(dq_base, dq0 * scale, offs_m, cols0, stride_dqn, N_Q, HEAD_DIM, False)
        if BLOCK_D1 > 0:
            _store_tile(dq_base, dq1 * scale, offs_m, cols1, stride_dqn, N_Q, HEAD_DIM, True)


@triton.jit
def _bwd_short_key_block(
    dq,  # (BLOCK_Q, HEAD_DIM) fp32 dq of every query, kept on chip across key blocks
    q, do, lse, delta, offs_q, k_base, v_base, dk_base, dv_base, start_n, cols,
    stride_kn, stride_vn, stride_dkn, stride_dvn, N_K, scale, qk_scale, inv_keep, SEED, bh, dropout_p,
    HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr,
):  # fmt: skip
    """Keys [start_n, start_n + BLOCK_N) against every query at once: 5 matmuls (S, dP, dV, dK, dQ) and one
    exp2 per score. dk and dv of these keys are complete after it and are stored; dq accumulates.
    On sm_90 all of it fits in registers next to dq (q, dout as wgmma operands in shared memory)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_keys(k_base, offs_n, cols, stride_kn, N_K, HEAD_DIM, False, MASK_KEYS)
    v = _load_keys(v_base, offs_n, cols, stride_vn, N_K, HEAD_DIM, False, MASK_KEYS)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    # Query rows past N_Q carry lse = +inf, so their weights are exp2(-inf) = 0 with no mask; keys past N_K
    # (zero rows) are masked only in the tail block.
    p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASK_KEYS:
        p = tl.where(offs_n[None, :] < N_K, p, 0.0)
    if DROPOUT:
        keep = _dropout_keep(SEED, bh, offs_q[:, None] * N_K + offs_n[None, :], dropout_p)
        p_dropped = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        p_dropped = p
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dv = tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=PRECISION)
    dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    _store_tile(dk_base, dk * scale, offs_n, cols, stride_dkn, N_K, HEAD_DIM, False)
    _store_tile(dv_base, dv, offs_n, cols, stride_dvn, N_K, HEAD_DIM, False)
    return dq


@triton.jit
def _attn_bwd_short_kernel(
    Q, K, V,  # (B, H, N, D) forward inputs
    DO,  # (B, H, Nq, D) upstream gradient
    LSE, DELTA,  # (B, H, Nq) fp32, contiguous
    DQ, DK, DV,  # (B, H, N, D) outputs (any strides with unit last stride, e.g. views of one dqkv)
    SEED,  # (1,) int64 Philox key (read only with DROPOUT)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N_Q, N_K,
    N_BUCKET,  # autotune key only
    scale, dropout_p,
    HEAD_DIM: tl.constexpr,  # a power of two (split head dims keep the blocked backward)
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # next power of two >= N_Q (<= SHORT_MAX_TOKENS): every query in one tile
    BLOCK_N: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):  # fmt: skip
    """Backward for short sequences, one program per (b, h): q, dout, lse, Delta and the fp32 dq of all
    queries stay on chip while the program walks the key blocks once; each key block's dk and dv are
    finished by that single visit. dq is written once at the end. No atomics, deterministic."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dk_base = DK + b * stride_dkb + h * stride_dkh
    dv_base = DV + b * stride_dvb + h * stride_dvh
    qk_scale = scale * _LOG2E
    inv_keep = 1.0 / (1.0 - dropout_p)
    offs_q = tl.arange(0, BLOCK_Q)
    valid_q = offs_q < N_Q
    cols = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_q, cols, stride_qn, N_Q, HEAD_DIM, False)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_q, cols, stride_don, N_Q, HEAD_DIM, False)
    dq = tl.zeros((BLOCK_Q, HEAD_DIM), dtype=tl.float32)
    lse = tl.load(LSE + bh * N_Q + offs_q, mask=valid_q, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + bh * N_Q + offs_q, mask=valid_q, other=0.0)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _bwd_short_key_block(
            dq, q, do, lse, delta, offs_q, k_base, v_base, dk_base, dv_base, start_n, cols,
            stride_kn, stride_vn, stride_dkn, stride_dvn, N_K, scale, qk_scale, inv_keep, SEED, bh, dropout_p,
            HEAD_DIM, DROPOUT, PRECISION, BLOCK_N, False,
        )  # fmt: skip
    for start_n in range(n_full, N_K, BLOCK_TAIL):
        dq = _bwd_short_key_block(
            dq, q, do, lse, delta, offs_q, k_base, v_base, dk_base, dv_base, start_n, cols,
            stride_kn, stride_vn, stride_dkn, stride_dvn, N_K, scale, qk_scale, inv_keep, SEED, bh, dropout_p,
            HEAD_DIM, DROPOUT, PRECISION, BLOCK_TAIL, True,
        )  # fmt: skip
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    _store_tile(dq_base, dq * scale, offs_q, cols, stride_dqn, N_Q, HEAD_DIM, False)


@triton.jit
def _dropout_mask_kernel(
    SEED,  # (1,) int64 Philox key
    MASK,  # (B, H, Nq, Nk) int8 output, contiguous: 1 = keep
    H, N_Q, N_K, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = MASK + bh * N_Q * N_K
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        counters = offs_m[:, None] * N_K + offs_n[None, :]
        keep = _dropout_keep(SEED, bh, counters, dropout_p)
        tl.store(base + counters, keep.to(tl.int8), mask=(offs_m[:, None] < N_Q) & (offs_n[None, :] < N_K))


# -------------------------------------------------------------------------------- autotune configs


def _config(block_m: int, block_n: int, warps: int, stages: int, **extra: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, **extra}, num_warps=warps, num_stages=stages)


def _fwd_config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    """Forward tiles also name the tail's key block: 16 keys (the smallest tensor-core tile)."""
    return _config(block_m, block_n, warps, stages, BLOCK_TAIL=min(block_n, 16))


# One small config under the interpreter: 32 x 32 tiles so even the tiny test shapes cross block edges.
_INTERPRET_CONFIGS = [_config(32, 32, 1, 1)]
_INTERPRET_FWD_CONFIGS = [_fwd_config(32, 32, 1, 1)]
# Candidates for Ampere/Hopper. Static facts behind the pruning (sm_90 cubins, ptxas resource report, bf16):
# the forward at 128 x 64 with 4 warps spills for D > 64 (8 warps does not); the backward holds k, v, dk, dv
# for its key block plus q, dout for the query block, so at D = 128 only tiles of <= 32 x 64 avoid spills,
# at D = 96 only 64 x 64 with 8 warps; below 64 rows per warpgroup wgmma cannot be used, which made the
# 32-row tiles spill at D = 80/96.
# Timings on an H100/H200 (benchmarks/bench_attention.py) are still to decide between the survivors.
_FWD_CONFIGS = [
    _fwd_config(128, 64, 4, 3),
    _fwd_config(128, 64, 8, 3),
    _fwd_config(128, 128, 8, 3),
    _fwd_config(128, 64, 8, 2),
    _fwd_config(64, 64, 4, 3),
    _fwd_config(64, 32, 4, 2),
]
_BWD_CONFIGS = [
    _config(64, 64, 4, 2),
    _config(64, 64, 8, 3),
    _config(64, 128, 8, 2),
    _config(32, 64, 8, 2),
    _config(64, 32, 8, 2),
    _config(32, 32, 4, 2),
]


def _fits(config: triton.Config, head_dim: int, backward: bool, capability: int = 90) -> bool:
    """False for the (tile, warps) choices that spill registers at this head dim (see the table's comment)."""
    m, n, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
    if backward:
        if head_dim > 96:
            return m * n <= 32 * 64
        if head_dim > 80:
            return m == n == 64 and warps == 8
        if capability < 90 and m * n // warps > 64 * 64 // 8:
            # sm_80's mma.sync fragments (no wgmma): 64 x 64 with 4 warps and 64 x 128 with 8 warps spill
            # (8-60 bytes per thread at D = 64 / 80, ptxas -v); 64 x 64 with 8 warps does not.
            return False
        return m >= 64 and n >= 64
    if (head_dim > 64 or capability < 90) and m == 128 and warps == 4:
        return False  # sm_80 at D = 64 too: 255 registers, 8 spill bytes (ptxas -v) with the peeled tail loop
    return not (head_dim > 96 and m * n > 128 * 64)


def _prune(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Keep the configs that fit the head dim, with tiles no larger than the sequence needs (N=50 does not
    need 128-row tiles; 64 is the smallest row count Hopper's wgmma takes per warpgroup).

    Triton passes only the positional arguments in ``named_args``; the launchers' keyword arguments
    (HEAD_DIM among them) arrive as ``kwargs``."""
    named_args = {**named_args, **kwargs}
    n_pow2 = triton.next_power_of_2(max(named_args["N_Q"], named_args["N_K"], 1))
    head_dim = named_args["HEAD_DIM"]
    backward = "DQ" in named_args
    cap = max(64, n_pow2)
    capability = target_capability(named_args["Q"])
    kept = [
        c for c in configs
        if _fits(c, head_dim, backward, capability) and c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap
    ]  # fmt: skip
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _autotuned(kernel: Any, configs: list, interpret_configs: list) -> LazyAutotune:
    if INTERPRET:
        return lazy_autotune(configs=interpret_configs, key=["N_BUCKET", "HEAD_DIM"])(kernel)
    return lazy_autotune(
        configs=configs, key=["N_BUCKET", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune}
    )(kernel)


def _short_config(block_n: int, warps: int, stages: int) -> triton.Config:
    """Short-backward tiles: BLOCK_N keys per step (all queries at once), a 16-key tail."""
    return triton.Config({"BLOCK_N": block_n, "BLOCK_TAIL": 16}, num_warps=warps, num_stages=stages)


# The short-sequence backward: BLOCK_Q (all queries) is set by the launcher; configs pick the key block.
# Under the interpreter 32-key blocks and a 16-key tail, so N = 33 runs one full block and one tail block.
_INTERPRET_SHORT_CONFIGS = [_short_config(32, 1, 1)]
# sm_90 only (see uses_short_backward). Static facts (ptxas -v, bf16, ViT-B/16's 256 x 64 dq, the largest
# allowed): 8 warps with 16 / 32-key blocks use 171-172 registers, 16 warps with 16 keys 96, none spill;
# 4 warps (255 registers, 124-1024 spill bytes), 8 warps with 64 keys (172 B) and 16 warps with 32 / 64
# keys (8 / 592 B) spill and are left out; at 128 x 128 (D = 128) the kept four use 125-174 registers,
# no spills. Shared memory is 146-176 KB (q, dout, k, v tiles), one CTA per
# SM, more than sm_80 / sm_86 allow (163 / 99 KB). On sm_80 every tile spills (mma.sync keeps q and dout
# in two operand layouts next to dq: 255 registers, 48-1344 B at 4 / 8 / 16 warps, reloading q and dout
# per key block did not help), so sm_80 keeps the blocked backward.
# Timings on an H100/H200 (benchmarks/bench_attention.py) are still to decide between the survivors.
_SHORT_CONFIGS = [
    _short_config(32, 8, 1),
    _short_config(32, 8, 2),
    _short_config(16, 8, 1),
    _short_config(16, 16, 1),
]


def _prune_short(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Key blocks no larger than the keys need (N = 7 does not need 32-key blocks)."""
    named_args = {**named_args, **kwargs}
    n_cap = max(16, triton.next_power_of_2(max(named_args["N_K"], 1)))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


_attn_fwd = _autotuned(_attn_fwd_kernel, _FWD_CONFIGS, _INTERPRET_FWD_CONFIGS)
_attn_bwd = _autotuned(_attn_bwd_kernel, _BWD_CONFIGS, _INTERPRET_CONFIGS)
if INTERPRET:
    _attn_bwd_short = lazy_autotune(configs=_INTERPRET_SHORT_CONFIGS, key=["N_BUCKET", "HEAD_DIM"])(
        _attn_bwd_short_kernel
    )
else:
    _attn_bwd_short = lazy_autotune(
        configs=_SHORT_CONFIGS, key=["N_BUCKET", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _prune_short},
    )(_attn_bwd_short_kernel)  # fmt: skip


# ---------------------------------------------------------------------------------------- launchers


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_views(**views: torch.Tensor) -> None:
    for name, t in views.items():
        if t.stride(-1) != 1:
            raise ValueError(f"fastvit attention kernels: {name} needs a unit last stride, got strides {t.stride()}")
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] > _INT32_MAX:
            raise ValueError(
                f"fastvit attention kernels: {name} spans more than 2**31 elements within one (batch, head) "
                f"(shape {tuple(t.shape)}, strides {t.stride()}); token offsets are int32"
            )


def _n_bucket(n_q: int, n_k: int) -> int:
    return triton.next_power_of_2(max(n_q, n_k, 16))


def _launch_geometry(q: torch.Tensor, k: torch.Tensor, **views: torch.Tensor) -> tuple[int, ...]:
    """(B, H, N_Q, N_K, D, BLOCK_D0, BLOCK_D1, N_BUCKET) of a launch on (B, H, N, D) views, after checking
    q's, k's and every other view's strides."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    _check_views(q=q, k=k, **views)
    d0, d1 = head_dim_blocks(D)
    return B, H, N_Q, N_K, D, d0, d1, _n_bucket(N_Q, N_K)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    fp32_precision: str = "ieee",
) -> None:
    """Writes ``out`` (B, H, Nq, D view) and ``lse`` ((B, H, Nq) contiguous fp32) from (B, H, N, D) views."""
    if out.numel() == 0:
        return
    B, H, N_Q, N_K, D, d0, d1, n_bucket = _launch_geometry(q, k, v=v, out=out)
    grid = lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), H, B)  # noqa: E731
    with device_guard(q):
        launch_autotuned(
            _attn_fwd, grid,
            q, k, v, out, lse, seed if seed is not None else lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
            H, N_Q, N_K, n_bucket, float(scale), float(dropout_p),
            HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, DROPOUT=dropout_p > 0,
            PRECISION=fp32_precision if q.dtype == torch.float32 else "tf32", NEG_SCALE=scale < 0,
        )  # fmt: skip


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    fp32_precision: str = "ieee",
) -> None:
    """Writes dq, dk, dv ((B, H, N, D) views, e.g. of one dqkv buffer)."""
    if dq.numel() == 0 and dk.numel() == 0:
        return
    B, H, N_Q, N_K, D, d0, d1, n_bucket = _launch_geometry(q, k, dout=dout, v=v, out=out, dq=dq, dk=dk, dv=dv)
    delta = torch.empty((B, H, N_Q), device=q.device, dtype=torch.float32)
    delta_block = 32 if INTERPRET else 64
    short = uses_short_backward(N_Q, N_K, D, target_capability(q))
    if short:  # one program per (b, h) holding every query's dq
        grid = lambda meta: (1, H, B)  # noqa: E731
        kernel, extra = _attn_bwd_short, {"BLOCK_Q": max(16, triton.next_power_of_2(N_Q))}
    else:
        grid = lambda meta: (triton.cdiv(N_K, meta["BLOCK_N"]) + triton.cdiv(N_Q, meta["BLOCK_M"]), H, B)  # noqa: E731
        kernel, extra = _attn_bwd, {"BLOCK_D0": d0, "BLOCK_D1": d1}
    with device_guard(q):
        _attn_bwd_delta_kernel[(max(1, triton.cdiv(N_Q, delta_block)), H, B)](
            out, dout, delta, *_strides3(out), *_strides3(dout), H, N_Q,
            HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, BLOCK_M=delta_block, num_warps=1 if INTERPRET else 4,
        )  # fmt: skip
        launch_autotuned(
            kernel, grid,
            q, k, v, dout, lse, delta, dq, dk, dv, seed if seed is not None else lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout),
            *_strides3(dq), *_strides3(dk), *_strides3(dv),
            H, N_Q, N_K, n_bucket, float(scale), float(dropout_p),
            HEAD_DIM=D, DROPOUT=dropout_p > 0, PRECISION=fp32_precision if q.dtype == torch.float32 else "tf32",
            **extra,
        )  # fmt: skip


def uses_short_backward(q_tokens: int, k_tokens: int, head_dim: int, capability: int = 90) -> bool:
    """Whether :func:`attention_bwd` runs the one-program-per-(b, h) backward: a Hopper-class target
    (``capability`` >= 90; under the interpreter any), both sequences at most SHORT_MAX_TOKENS long, a
    power-of-two head dim and the on-chip dq (next_power_of_2(Nq) x D fp32) within SHORT_MAX_DQ.

    Split head dims (D = 48, 80, 96: a masked second column block) spill on sm_90 in every short config
    (68-2528 bytes at N = 64..256, ptxas -v), so they keep the blocked backward."""
    d0, d1 = head_dim_blocks(head_dim)
    block_q = max(16, triton.next_power_of_2(q_tokens))
    fits = max(q_tokens, k_tokens) <= SHORT_MAX_TOKENS and d1 == 0 and block_q * d0 <= SHORT_MAX_DQ
    return fits and (INTERPRET or capability >= 90)


def dropout_keep_mask(
    seed: torch.Tensor, batch: int, heads: int, q_tokens: int, k_tokens: int, dropout_p: float
) -> torch.Tensor:
    """The kernels' keep mask, (B, H, Nq, Nk) bool, for the (1,) int64 Philox key ``seed``."""
    mask = torch.empty((batch, heads, q_tokens, k_tokens), device=seed.device, dtype=torch.int8)
    if mask.numel():
        with device_guard(seed):
            _dropout_mask_kernel[(triton.cdiv(q_tokens, 32), heads, batch)](
                seed, mask, heads, q_tokens, k_tokens, float(dropout_p), BLOCK_M=32, BLOCK_N=32
            )
    return mask.bool()

"""Triton patch embedding: conv(kernel = stride = patch) as GEMMs that gather patches from the image.

Shapes: image x (B, C, H, W) with any strides (NCHW or channels_last), patch p, grid Hp x Wp
(``ceil`` when padding), N = Hp * Wp patches, K = C * p * p, D = embedding width, P prefix tokens.
Patch m = ph * Wp + pw and feature (c, ki, kj) (the conv weight's (D, C, p, p) order) read pixel
x[b, c, ph * p + ki, pw * p + kj]; pixels past the bottom/right edge read as 0, which is exactly
timm's ``dynamic_img_pad`` (zero padding right/bottom) without materialising a padded copy.

The reduction runs over a padded feature index k = (c * p + ki) * ROW_PAD + kj, ROW_PAD =
next_pow2(p), kj >= p masked off: kj is then ``k % power of two``, which the compiler can see is
contiguous, so patch rows load as vectors (patch 16/32: ROW_PAD = p, no padding at all; patch 14:
16-wide rows, 12.5% masked MMA work for 4-byte vector loads instead of scalar gathers).

Kernels (fp32 accumulation in every one):
    forward   out[b, P + m, :] = A[b, m, :] @ W^T + bias + pos[P' + m]     (P' = P if pos covers the
              out[b, :P, :]    = prefix + pos[:P]                            prefix rows, else 0)
              one launch writes the whole (B, P + N, D) output: the programs of the first row tile
              of each image also store the prefix rows.
    dx        dA[b, m, :] = dout[b, P + m, :] @ W, stored straight into the image layout (the patches
              do not overlap, so every pixel inside the grid is written exactly once: no atomics);
              pixels in the padding region are dropped.
    dweight   dW = sum over (b, m) of dout[b, P + m, :]^T A[b, m, :], split over row chunks into fp32
              partials that the launcher sums (deterministic, enough programs for a 768 x 768 weight).

Every kernel is autotuned per (N, D, K, p, dtype); inside CUDA-graph capture the autotuner never runs
(``launch_autotuned``): the config chosen earlier for the key, or the first that fits, is launched.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fastvit._geometry import sm_count
from fastvit.kernels import INTERPRET
from fastvit.kernels._common import (
    MAX_GRID_YZ,
    device_guard,
    launch_autotuned,
    lazy_autotune,
    shared_memory_limit,
    target_capability,
)

__all__ = ["MAX_BATCH", "int32_extent_ok", "patch_embed_dweight", "patch_embed_dx", "patch_embed_fwd"]

# The forward and dx grids are (tiles, B).
MAX_BATCH = MAX_GRID_YZ


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) -> Configs; one small config under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Built offline for sm_90 (fp16/bf16/fp32; patch 1, 14, 16):
# none spills registers in fp16/bf16. fp32 doubles the staged tiles, so _fits_shared_memory drops the
# configs a GPU cannot hold for the dtype at hand before autotuning.
_GEMM_SHAPES = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 3),
]


# (target capability, element bytes, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the dweight configs that spill
# registers (ptxas -v, benchmarks/kernel_report.py and tests/test_gpu_compile.py):
# * bf16 / fp16 on sm_80 (mma.sync, operands through registers) at the goal shapes (ViT-B/16, ViT-L/16@384,
#   DeiT-S at batch 256): the 128-row gathered reduction tile over 4 warps, 4 stages, needs 128 registers and
#   24 bytes of spill; sm_90 (wgmma) builds it in 142 registers without spill.
# * fp32 (TF32) on sm_90 with short row chunks (test_gpu_compile's 4-row launch, chunks not a multiple of 16):
#   64 x 128 x 64 over 4 warps, 4 stages: 255 registers, 12400 bytes of spill (207-212 registers, none, at the
#   goal shapes' chunk lengths). The config fits only sm_90's shared memory in fp32.
_DWEIGHT_SPILLS = {(80, 2, 128, 64, 64, 4, 4), (90, 4, 64, 128, 64, 4, 4)}


def _fits_shared_memory(operands: str, spills: frozenset = frozenset()):
    """An autotune ``early_config_prune`` keeping the configs whose pipelined operand tiles fit the GPU's
    shared memory per block in the launch's dtype. ``operands`` names the two staged tiles' shapes:
    "MK,NK" (forward), "MN,NK" (dx) or "NM,MK" (dweight). ``spills``: (capability, element bytes, BLOCK_M,
    BLOCK_N, BLOCK_K, warps, stages) tuples dropped on that target and dtype (measured to spill there)."""
    dims = {"M": "BLOCK_M", "N": "BLOCK_N", "K": "BLOCK_K"}

    def prune(configs: list, named_args: dict, **_: object) -> list:
        if len(configs) <= 1:
            return configs
        first = next(a for a in named_args.values() if isinstance(a, torch.Tensor))
        # the GPU's opt-in limit per block; off a GPU (the compile report) the compile target's
        limit = shared_memory_limit(first)
        elem = first.element_size()

        def staged_bytes(cfg: triton.Config) -> int:
            tiles = sum(cfg.kwargs[dims[a]] * cfg.kwargs[dims[b]] for a, b in operands.split(","))
            return cfg.num_stages * tiles * elem

        cc = target_capability(first)

        def spill_free(cfg: triton.Config) -> bool:
            key = (cc, elem, *(cfg.kwargs[dims[d]] for d in "MNK"), cfg.num_warps, cfg.num_stages)
            return key not in spills

        candidates = [cfg for cfg in configs if spill_free(cfg)] or configs
        return [cfg for cfg in candidates if staged_bytes(cfg) <= limit] or [min(candidates, key=staged_bytes)]

    return prune


@triton.jit
def _output_tile(pid, ROWS, COLS, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Program ``pid``'s tile of a (ROWS, COLS) output, tiles ordered row-major: (tile row, row indices,
    column indices, row mask, column mask)."""
    num_cols = tl.cdiv(COLS, BLOCK_COLS)
    pid_row = pid // num_cols
    pid_col = pid % num_cols
    rows = pid_row * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_col * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return pid_row, rows, cols, rows < ROWS, cols < COLS


@triton.jit
def _feature_coords(k, PATCH: tl.constexpr, ROW_PAD: tl.constexpr):
    """(c, ki, kj, valid) of the padded feature index k = (c * PATCH + ki) * ROW_PAD + kj."""
    row_index = k // ROW_PAD
    kj = k % ROW_PAD
    return row_index // PATCH, row_index % PATCH, kj, kj < PATCH


@triton.jit
def _pixel_offsets(m, k, Wp, H, W, sx_c, sx_h, sx_w, PATCH: tl.constexpr, ROW_PAD: tl.constexpr,
                   FLAT_PIXELS: tl.constexpr):  # fmt: skip
    """Offsets (within one image, int32: the launcher checks one image spans < 2^31 elements) and
    in-image mask of A[m, k] for row vector m and padded-feature vector k.

    FLAT_PIXELS (patch 1 on an image whose rows and columns merge, e.g. the hybrid models' 1x1
    projection of a CNN feature map): A is the plain strided matrix x[b].view(C, H * W).T, addressed
    without the div/mod that would hide its contiguity from the compiler."""
    if FLAT_PIXELS:
        offs = k[None, :] * sx_c + m[:, None] * sx_w
        inside = (m >= 0)[:, None] & (k >= 0)[None, :]  # every patch is one in-image pixel
    else:
        c, ki, kj, valid = _feature_coords(k, PATCH, ROW_PAD)
        row = (m // Wp)[:, None] * PATCH + ki[None, :]
        col = (m % Wp)[:, None] * PATCH + kj[None, :]
        offs = c[None, :] * sx_c + row * sx_h + col * sx_w
        inside = (row < H) & (col < W) & valid[None, :]
    return offs, inside


@triton.jit
def _weight_offsets(n, k, sw_d, sw_c, sw_h, sw_w, PATCH: tl.constexpr, ROW_PAD: tl.constexpr):
    """Offsets of W[n, k] (the (D, C, p, p) conv weight, any strides, < 2^31 elements) for row vector n and
    padded-feature vector k, and the mask of real features."""
    c, ki, kj, valid = _feature_coords(k, PATCH, ROW_PAD)
    return n[:, None] * sw_d + (c * sw_c + ki * sw_h + kj * sw_w)[None, :], valid


@lazy_autotune(
    configs=_configs(_GEMM_SHAPES), key=["N", "D", "K", "PATCH"],
    prune_configs_by={"early_config_prune": _fits_shared_memory("MK,NK")},
)  # fmt: skip
@triton.jit
def _patch_embed_fwd_kernel(
    X,  # (B, C, H, W) image, strides sx_*
    Wt,  # (D, C, p, p) conv weight, strides sw_*
    BIAS,  # (D,) or unused
    POS,  # (R, D) position embedding (R = N or P + N), row stride s_pos, or unused
    PREFIX,  # (P, D) prefix tokens, row stride s_pre, or unused
    OUT,  # (B, P + N, D) contiguous output
    N, D, K, P, Wp, H, W,
    sx_b, sx_c, sx_h, sx_w,
    sw_d, sw_c, sw_h, sw_w,
    s_pos, s_pre,
    PATCH: tl.constexpr,
    ROW_PAD: tl.constexpr,
    FLAT_PIXELS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    POS_COVERS_PREFIX: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_m, m, n, m_ok, n_ok = _output_tile(pid, N, D, BLOCK_M, BLOCK_N)
    x_img = X + b * sx_b
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a_offs, a_in = _pixel_offsets(m, k, Wp, H, W, sx_c, sx_h, sx_w, PATCH, ROW_PAD, FLAT_PIXELS)
        a = tl.load(x_img + a_offs, mask=a_in & m_ok[:, None] & k_ok[None, :], other=0.0)
        w_offs, w_real = _weight_offsets(n, k, sw_d, sw_c, sw_h, sw_w, PATCH, ROW_PAD)
        w = tl.load(Wt + w_offs, mask=n_ok[:, None] & (k_ok & w_real)[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos_row = m + P if POS_COVERS_PREFIX else m
        pos_offs = pos_row.to(tl.int64)[:, None] * s_pos + n[None, :]
        acc += tl.load(POS + pos_offs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    out_img = OUT + b * (N + P) * D
    out_offs = (m + P).to(tl.int64)[:, None] * D + n[None, :]
    tl.store(out_img + out_offs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if HAS_PREFIX:
        if pid_m == 0:
            # The class / distillation tokens: written by the first row tile of each image.
            p = tl.arange(0, BLOCK_P)
            p_mask = (p < P)[:, None] & n_ok[None, :]
            tok = tl.load(PREFIX + p.to(tl.int64)[:, None] * s_pre + n[None, :], mask=p_mask, other=0.0).to(tl.float32)
            if HAS_POS:
                if POS_COVERS_PREFIX:
                    prefix_pos_offs = p.to(tl.int64)[:, None] * s_pos + n[None, :]
                    tok += tl.load(POS + prefix_pos_offs, mask=p_mask, other=0.0).to(tl.float32)
            tl.store(out_img + p.to(tl.int64)[:, None] * D + n[None, :], tok.to(OUT.dtype.element_ty), mask=p_mask)


@lazy_autotune(
    configs=_configs(_GEMM_SHAPES), key=["N", "D", "K", "PATCH"],
    prune_configs_by={"early_config_prune": _fits_shared_memory("MN,NK")},
)  # fmt: skip
@triton.jit
def _patch_embed_dx_kernel(
    DOUT,  # (B, P + N, D) contiguous upstream gradient
    Wt,  # (D, C, p, p) conv weight, strides sw_*
    DX,  # (B, C, H, W) gradient of the image, strides sx_*
    N, D, K, P, Wp, H, W,
    sx_b, sx_c, sx_h, sx_w,
    sw_d, sw_c, sw_h, sw_w,
    PATCH: tl.constexpr,
    ROW_PAD: tl.constexpr,
    FLAT_PIXELS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # patches
    BLOCK_N: tl.constexpr,  # reduction over D
    BLOCK_K: tl.constexpr,  # patch features
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    _, m, k, m_ok, k_ok = _output_tile(pid, N, K, BLOCK_M, BLOCK_K)
    dout_img = DOUT + b * (N + P) * D + (m + P).to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < D
        g = tl.load(dout_img + n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w_offs, w_real = _weight_offsets(n, k, sw_d, sw_c, sw_h, sw_w, PATCH, ROW_PAD)
        w = tl.load(Wt + w_offs, mask=n_ok[:, None] & (k_ok & w_real)[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
    offs, in_img = _pixel_offsets(m, k, Wp, H, W, sx_c, sx_h, sx_w, PATCH, ROW_PAD, FLAT_PIXELS)
    tl.store(DX + b * sx_b + offs, acc.to(DX.dtype.element_ty), mask=in_img & m_ok[:, None] & k_ok[None, :])


@lazy_autotune(
    configs=_configs(_GEMM_SHAPES), key=["N", "D", "K", "PATCH", "rows_per_split"],
    prune_configs_by={"early_config_prune": _fits_shared_memory("NM,MK", frozenset(_DWEIGHT_SPILLS))},
)  # fmt: skip
@triton.jit
def _patch_embed_dweight_kernel(
    DOUT,  # (B, P + N, D) contiguous upstream gradient
    X,  # (B, C, H, W) image, strides sx_*
    DW_PART,  # (splits, D, C * p * p) fp32 partial sums
    ROWS, N, D, K, K_REAL, P, Wp, H, W,
    sx_b, sx_c, sx_h, sx_w,
    rows_per_split,
    PATCH: tl.constexpr,
    ROW_PAD: tl.constexpr,
    FLAT_PIXELS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # reduction over the B * N patch rows
    BLOCK_N: tl.constexpr,  # D
    BLOCK_K: tl.constexpr,  # patch features
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    _, n, k, n_ok, k_ok = _output_tile(pid, D, K, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, ROWS)
    for r0 in range(row_start, row_end, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)  # global patch row over (b, m)
        r_ok = r < row_end
        b = r // N
        m = r % N
        g = tl.load(
            DOUT + (b * (N + P) + P + m)[None, :] * D + n[:, None], mask=r_ok[None, :] & n_ok[:, None], other=0.0
        )  # (BLOCK_N, BLOCK_M): dout^T
        a_offs, a_in = _pixel_offsets(m, k, Wp, H, W, sx_c, sx_h, sx_w, PATCH, ROW_PAD, FLAT_PIXELS)
        a = tl.load(X + b[:, None] * sx_b + a_offs, mask=a_in & r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g, a, acc, input_precision=INPUT_PRECISION)
    _, _, kj, real = _feature_coords(k, PATCH, ROW_PAD)
    k_real = (k // ROW_PAD) * PATCH + kj  # the weight's own (c, ki, kj) order, padding dropped
    part_offs = split * D * K_REAL + n.to(tl.int64)[:, None] * K_REAL + k_real[None, :]
    tl.store(DW_PART + part_offs, acc, mask=n_ok[:, None] & (k_ok & real)[None, :])


def int32_extent_ok(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether every offset of a tensor region (one image, or the weight) fits the kernels' int32 arithmetic."""
    return sum((n - 1) * abs(s) for n, s in zip(sizes, strides) if n > 0) < 2**31


def _input_precision(x: torch.Tensor) -> Optional[str]:
    """fp32 follows torch's conv: TF32 tensor cores when cuDNN would use them (torch's default), else
    full fp32; fp16 / bf16 use the dot's native precision (None)."""
    if x.dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cudnn.allow_tf32 and not INTERPRET else "ieee"


def _flat_pixels(x: torch.Tensor, patch: int) -> bool:
    return patch == 1 and (x.shape[2] == 1 or x.stride(2) == x.shape[3] * x.stride(3))


def _gemm_geometry(x: torch.Tensor, patch: int) -> tuple[int, int, int, int]:
    """(N patches, Wp grid columns, padded reduction length C * p * ROW_PAD, ROW_PAD) for image x."""
    row_pad = triton.next_power_of_2(patch)
    Wp = triton.cdiv(x.shape[3], patch)
    return triton.cdiv(x.shape[2], patch) * Wp, Wp, x.shape[1] * patch * row_pad, row_pad


def patch_embed_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos: Optional[torch.Tensor],
    prefix: Optional[torch.Tensor],
    out: torch.Tensor,
) -> None:
    """Writes ``out`` (B, P + N, D): x (B, C, H, W) any strides; pos (R, D) and prefix (P, D) with unit
    last stride; the grid is ``ceil(H / p) x ceil(W / p)`` (the caller checked divisibility or padding)."""
    B, C, H, W = x.shape
    D, patch = weight.shape[0], weight.shape[2]
    N, Wp, K, row_pad = _gemm_geometry(x, patch)
    P = prefix.shape[0] if prefix is not None else 0
    if B == 0 or D == 0:
        return

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]), B

    with device_guard(x):
        launch_autotuned(
            _patch_embed_fwd_kernel, grid,
            x, weight, bias if bias is not None else weight, pos if pos is not None else weight,
            prefix if prefix is not None else weight, out,
            N, D, K, P, Wp, H, W, *x.stride(), *weight.stride(),
            pos.stride(0) if pos is not None else 0, prefix.stride(0) if prefix is not None else 0,
            PATCH=patch, ROW_PAD=row_pad, FLAT_PIXELS=_flat_pixels(x, patch), HAS_BIAS=bias is not None,
            HAS_POS=pos is not None,
            POS_COVERS_PREFIX=pos is not None and pos.shape[0] == N + P, HAS_PREFIX=P > 0,
            BLOCK_P=triton.next_power_of_2(max(P, 1)), INPUT_PRECISION=_input_precision(x),
        )  # fmt: skip


def patch_embed_dx(dout: torch.Tensor, weight: torch.Tensor, num_prefix: int, dx: torch.Tensor) -> None:
    """Writes every pixel of ``dx`` (B, C, H, W, any strides): dout (B, P + N, D) contiguous."""
    B, C, H, W = dx.shape
    D, patch = weight.shape[0], weight.shape[2]
    N, Wp, K, row_pad = _gemm_geometry(dx, patch)
    if dx.numel() == 0:
        return

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]), B

    with device_guard(dx):
        launch_autotuned(
            _patch_embed_dx_kernel, grid,
            dout, weight, dx, N, D, K, num_prefix, Wp, H, W, *dx.stride(), *weight.stride(),
            PATCH=patch, ROW_PAD=row_pad, FLAT_PIXELS=_flat_pixels(dx, patch), INPUT_PRECISION=_input_precision(dx),
        )  # fmt: skip


def _num_splits(x: torch.Tensor, rows: int, tiles: int) -> int:
    """Row chunks for the weight gradient: about two waves of programs, each chunk >= 512 rows."""
    programs = 2 * sm_count(x)
    return max(1, min(triton.cdiv(programs, tiles), triton.cdiv(rows, 512)))


def patch_embed_dweight(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Returns the fp32 (D, C, p, p) weight gradient: dout (B, P + N, D) contiguous, x as in the forward."""
    B, C, H, W = x.shape
    D, patch = weight.shape[0], weight.shape[2]
    N, Wp, K, row_pad = _gemm_geometry(x, patch)
    k_real = C * patch * patch
    rows = B * N
    splits = _num_splits(x, rows, triton.cdiv(D, 128) * triton.cdiv(K, 128))
    rows_per_split = triton.cdiv(max(rows, 1), splits)
    part = torch.empty((splits, D, k_real), device=x.device, dtype=torch.float32)
    if rows == 0 or D == 0 or K == 0:
        return part.zero_().sum(0).view(D, C, patch, patch)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(D, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), splits

    with device_guard(x):
        launch_autotuned(
            _patch_embed_dweight_kernel, grid,
            dout, x, part, rows, N, D, K, k_real, num_prefix, Wp, H, W, *x.stride(), rows_per_split,
            PATCH=patch, ROW_PAD=row_pad, FLAT_PIXELS=_flat_pixels(x, patch), INPUT_PRECISION=_input_precision(x),
        )  # fmt: skip
    return (part[0] if splits == 1 else part.sum(0)).view(D, C, patch, patch)

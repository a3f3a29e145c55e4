"""Persistent Triton GEMM ``y = act(x @ weight.T + bias) + residual`` with TMA tensor descriptors (Hopper).

The same result as the pointer kernel's forward (fastvit/kernels/linear.py: fp32 accumulation, the same
epilogue helpers imported from there, one rounding to the output dtype) with a different main loop:

* a persistent grid of min(SMs, tiles) programs, each looping over the (BLOCK_M, BLOCK_N) output tiles
  ``start, start + programs, ...`` (grouped by GROUP_M rows of tiles as the pointer kernel groups its
  programs), the loop nest flattened (``tl.range(..., flatten=True)``) so the next tile's loads are issued
  while the current tile's epilogue runs, the structure of Triton's persistent-matmul tutorial;
* the x and weight tiles loaded through device-side tensor descriptors (``tl.make_tensor_descriptor``:
  TMA on sm_90, zero fill past M, N and K, so no clamping or K masks);
* the epilogue (bias, activation, residual, masked store) by ``linear._epilogue`` in column sub-tiles.

TMA needs sm_90+, fp16 / bf16 operands here, unit last strides, 16-byte aligned base pointers and row
strides: :func:`reasons` lists what a call lacks. It is used by :func:`linear_fwd_dispatch` (the hook in
``linear.linear_fwd``) only where it measured faster, through measured dispatch
(``fastvit.ops.dispatch.measured_entry``, the machinery of the ops' auto dispatch): the first time a
(GPU, M, N, K, dtype, epilogue) key is seen on a GPU, outside CUDA-graph capture and ``torch.compile``
tracing, both kernels are timed by the dispatch timer (``dispatch.set_timer``; CUDA events by default,
the warm-up calls autotuning each) into a scratch output and the faster is kept: for the process (it
never changes) and in the per-machine dispatch cache (``FASTVIT_DISPATCH_CACHE``; keys
``linear_tma|<GPU> sm_XY|<dtype>|M=..|N=..|K=..|act=..|bias=..|residual=..``, listed by
``python -m fastvit.info``), so later processes, captures included, start from it. A kernel that raises
while timed is recorded as refused with the reason. ``FASTVIT_DISPATCH=static`` never times and runs the
static choice, the pointer kernel (unmeasured: no GPU has timed the two against each other yet,
2026-12-02). ``FASTVIT_LINEAR_TMA=0`` turns the TMA path off (read at each call).

Device-side descriptors need a per-launch global scratch buffer (128 bytes per descriptor and program):
when no Triton allocator is set, one that allocates through torch on the launch's stream is installed.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from fastvit.kernels import INTERPRET
from fastvit.kernels._common import (
    device_guard,
    graph_capturing,
    launch_autotuned,
    lazy_autotune,
    shared_memory_limit,
    target_capability,
)
from fastvit.kernels.linear import ACTIVATION_CODES, _config, _epilogue, _epilogue_split, _halves, _shared_bytes
from fastvit.ops import dispatch

__all__ = ["CHOICES", "ENV_SWITCH", "FAMILY", "HAS_API", "enabled", "linear_fwd_dispatch", "linear_tma_fwd", "reasons"]

ENV_SWITCH = "FASTVIT_LINEAR_TMA"
FAMILY = "linear_tma"  # the first part of this choice's keys in the dispatch cache
# Device-side tensor descriptors and the allocator for their scratch (Triton 3.4+; 3.1 - 3.3 lack them).
HAS_API = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


@triton.jit
def _linear_tma_kernel(
    X,  # (M, K) input, row stride stride_xm, unit column stride, 16-byte aligned
    W,  # (N, K) weight, row stride stride_wn, unit column stride, 16-byte aligned
    B,  # (N,) bias, or unused
    R,  # (M, N) residual added last, strides (stride_rm, stride_rn), or unused
    Y,  # (M, N) output, row stride stride_ym, unit column stride
    M,
    N,
    K,
    M_BUCKET,  # unused in the body: the autotuning key's row bucket (next power of two of M)
    stride_xm,
    stride_wn,
    stride_rm,
    stride_rn,
    stride_ym,
    ACTIVATION: tl.constexpr,  # 0 none, 1 gelu, 2 gelu_tanh, 3 quick_gelu (linear.ACTIVATION_CODES)
    HAS_BIAS: tl.constexpr,
    HAS_R: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # 1, 2 or 4 column sub-tiles for the epilogue (linear._epilogue_split)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    start = tl.program_id(0)
    programs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    pids_per_group = GROUP_M * num_pid_n
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])

    for tile in tl.range(start, num_tiles, programs, flatten=FLATTEN):
        first_pid_m = (tile // pids_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile % pids_per_group) % group_rows
        pid_n = (tile % pids_per_group) // group_rows
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            a = x_desc.load([row0, k * BLOCK_K])  # rows past M, columns past K read as 0
            b = w_desc.load([col0, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        offs_m = row0.to(tl.int64) + tl.arange(0, BLOCK_M)
        n0 = col0.to(tl.int64)
        if EPILOGUE_SPLIT == 1:
            _fwd_epilogue(acc, offs_m, n0 + tl.arange(0, BLOCK_N), B, R, Y, M, N, stride_rm, stride_rn, stride_ym,
                          ACTIVATION, HAS_BIAS, HAS_R)  # fmt: skip
        else:
            half: tl.constexpr = BLOCK_N // 2
            quarter: tl.constexpr = BLOCK_N // 4
            a0, a1 = _halves(acc, BLOCK_M, half)
            if EPILOGUE_SPLIT == 2:
                _fwd_epilogue(a0, offs_m, n0 + tl.arange(0, half), B, R, Y, M, N, stride_rm, stride_rn, stride_ym,
                              ACTIVATION, HAS_BIAS, HAS_R)  # fmt: skip
                _fwd_epilogue(a1, offs_m, n0 + half + tl.arange(0, half), B, R, Y, M, N, stride_rm, stride_rn,
                              stride_ym, ACTIVATION, HAS_BIAS, HAS_R)  # fmt: skip
            else:
                a00, a01 = _halves(a0, BLOCK_M, quarter)
                a10, a11 = _halves(a1, BLOCK_M, quarter)
                _fwd_epilogue(a00, offs_m, n0 + tl.arange(0, quarter), B, R, Y, M, N, stride_rm, stride_rn,
                              stride_ym, ACTIVATION, HAS_BIAS, HAS_R)  # fmt: skip
                _fwd_epilogue(a01, offs_m, n0 + quarter + tl.arange(0, quarter), B, R, Y, M, N, stride_rm, stride_rn,
                              stride_ym, ACTIVATION, HAS_BIAS, HAS_R)  # fmt: skip
                _fwd_epilogue(a10, offs_m, n0 + 2 * quarter + tl.arange(0, quarter), B, R, Y, M, N, stride_rm,
                              stride_rn, stride_ym, ACTIVATION, HAS_BIAS, HAS_R)  # fmt: skip
                _fwd_epilogue(a11, offs_m, n0 + 3 * quarter + tl.arange(0, quarter), B, R, Y, M, N, stride_rm,
                              stride_rn, stride_ym, ACTIVATION, HAS_BIAS, HAS_R)  # fmt: skip


@triton.jit
def _fwd_epilogue(
    acc, offs_m, offs_n, B, R, Y, M, N, stride_rm, stride_rn, stride_ym,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_R: tl.constexpr,
):  # fmt: skip
    """linear._epilogue's forward: bias, activation, residual and the masked store of one column sub-tile
    (no activation gradient, no dbias partials, no saved pre-activation: Y stands in for DB and H)."""
    _epilogue(acc, offs_m, offs_n, 0, B, R, Y, Y, Y, M, N, stride_rm, stride_rn, stride_ym,
              ACTIVATION, HAS_BIAS, False, False, HAS_R, False)  # fmt: skip


# Hopper tiles (wgmma wants BLOCK_M a multiple of 64 per warp group): 128 x 256 x 64 on two warp groups
# (192 KB of operand buffers in 4 stages: sm_90's 227 KB only) and 128 x 128 x 64 on one or two.
_CONFIGS = [
    _config(128, 256, 64, 8, 3),
    _config(128, 256, 64, 8, 4),
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 64, 4, 3),
    _config(128, 128, 64, 4, 4),
]
_INTERPRET_CONFIG = _config(32, 32, 32, 1, 1, group_m=2)


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Tiles whose operand buffers fit the target's shared memory per block (227 KB on sm_90) and whose rows
    do not mostly fall past M; the smallest tile if none is left."""
    elsize = named_args["X"].element_size()
    limit = shared_memory_limit(named_args["X"])
    max_m = max(64, triton.next_power_of_2(named_args["M"]))
    kept = [c for c in configs if _shared_bytes(c, elsize) <= limit and c.kwargs["BLOCK_M"] <= max_m]
    return kept or [min(configs, key=lambda c: _shared_bytes(c, elsize))]


_KEY = ["M_BUCKET", "N", "K", "ACTIVATION", "HAS_BIAS", "HAS_R"]
_heuristics = triton.heuristics(
    {"EPILOGUE_SPLIT": lambda args: _epilogue_split({**args, "ACT_GRAD": False}), "FLATTEN": lambda args: True}
)
_tma_fixed = _heuristics(_linear_tma_kernel)  # launched with an explicit config (the interpreter)
_tma_tuned = lazy_autotune(configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_tma_fixed)


# --------------------------------------------------------------------------------- what TMA needs


def _aligned(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or t.data_ptr() % 16 == 0


def reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
) -> list[str]:
    """Why the TMA kernel cannot compute ``y = act(x @ weight.T + bias) + residual`` here (empty: it can).

    Platform: the installed Triton's tensor-descriptor API, a CUDA tensor (or a CPU one under
    ``TRITON_INTERPRET=1``, or a meta tensor in the compile report) on sm_90+. Layout: fp16 / bf16 x and
    weight of one dtype, 2-D, unit last strides, row strides and base pointers 16-byte aligned (TMA's rules).
    """
    out = []
    if not HAS_API:
        out.append(f"triton {triton.__version__} has no tl.make_tensor_descriptor / triton.set_allocator")
    if x.device.type == "cuda" or x.device.type == "meta":
        cc = target_capability(x)
        if cc < 90:
            out.append(f"sm_{cc} has no TMA (tensor descriptors need sm_90+); the pointer kernel serves it")
    elif not (INTERPRET and x.device.type == "cpu"):
        out.append(f"x is on {x.device}; the TMA kernel runs on CUDA GPUs (or the CPU under TRITON_INTERPRET=1)")
    if x.dtype not in (torch.float16, torch.bfloat16):
        out.append(f"x is {x.dtype}; the TMA kernel takes float16 / bfloat16")
    if weight.dtype != x.dtype:
        out.append(f"weight is {weight.dtype} but x is {x.dtype}; cast them to one dtype")
    for name, t in (("x", x), ("weight", weight)):
        if t.dim() != 2:
            out.append(f"{name} is {t.dim()}-D; pass it as 2-D (rows, features)")
            continue
        if t.shape[0] > 1 and t.stride(1) != 1:
            out.append(f"{name} has last stride {t.stride(1)}; TMA needs 1 (make it .contiguous())")
        if t.shape[0] > 1 and (t.stride(0) * t.element_size()) % 16:
            out.append(f"{name}'s row stride is {t.stride(0) * t.element_size()} bytes; TMA needs a multiple of 16")
        if not _aligned(t):
            out.append(f"{name}'s data pointer is not 16-byte aligned (offset view); TMA needs 16")
    if x.dim() == 2 and weight.dim() == 2 and x.shape[1] != weight.shape[1]:
        out.append(f"x has {x.shape[1]} features but weight {weight.shape[1]}")
    elif x.dim() == 2 and x.shape[1] == 0:
        out.append("K is 0: there is nothing for TMA to load (the pointer kernel writes the epilogue of a 0 product)")
    if y is not None and y.dim() == 2 and y.shape[0] > 1 and y.stride(1) != 1:
        out.append(f"y has column stride {y.stride(1)}; the epilogue stores rows with unit stride")
    return out


def enabled() -> bool:
    """False when ``FASTVIT_LINEAR_TMA=0`` (or ``false`` / ``off`` / ``no``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def _torch_allocator(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Installs the torch-backed allocator for the descriptors' scratch unless one is set (a ContextVar:
    per thread, so checked at every launch)."""
    from triton.runtime import _allocation

    current = getattr(getattr(_allocation, "_allocator", None), "get", lambda: None)()
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_torch_allocator)


def _sm_count(t: torch.Tensor) -> int:
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if index not in _SMS:
            _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return _SMS[index]
    return 132  # H100 / H200 SXM: the grid size recorded for the compile report (not part of the binary)


_SMS: dict[int, int] = {}


def linear_tma_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    activation: Optional[str],
    y: torch.Tensor,
    *,
    checked: bool = False,
) -> None:
    """Writes ``y = act(x @ weight.T + bias) + residual`` with the persistent TMA kernel; x (M, K) and weight
    (N, K) as :func:`reasons` asks, residual (M, N) any strides, y (M, N) with a unit column stride.
    ``checked=True``: the caller has run these checks already (the measured dispatch), so they are skipped."""
    if not checked:
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"linear_tma_fwd: activation {activation!r}; expected one of {list(ACTIVATION_CODES)}")
        problems = reasons(x, weight, bias, residual, y)
        if problems:
            raise ValueError("linear_tma_fwd: " + "; ".join(problems))
    r = residual
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return
    flags = {"ACTIVATION": ACTIVATION_CODES[activation], "HAS_BIAS": bias is not None, "HAS_R": r is not None}
    args = (
        x, weight, bias if bias is not None else weight, r if r is not None else y, y,
        M, N, K, triton.next_power_of_2(M), x.stride(0) if M > 1 else K, weight.stride(0) if N > 1 else K,
        r.stride(0) if r is not None else 0, r.stride(1) if r is not None else 0, y.stride(0),
    )  # fmt: skip
    programs = _sm_count(x)

    def grid(meta: dict) -> tuple[int]:
        return (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    with device_guard(x):
        if INTERPRET:
            config = _INTERPRET_CONFIG
            _tma_fixed[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                             num_stages=config.num_stages)  # fmt: skip
            return
        if x.is_cuda:
            _ensure_allocator()
        launch_autotuned(_tma_tuned, grid, *args, **flags)


# ------------------------------------------------------------------------------ measured dispatch

# (device index, M, N, K, dtype, activation, has bias, has residual) -> "tma" or "pointer": this process's
# memo of the measured entries (dispatch.reset() clears it with the rest).
CHOICES: dict[tuple, str] = {}
dispatch._RESET_HOOKS.append(CHOICES.clear)


def _gpu_device(t: torch.Tensor) -> Optional[torch.device]:
    """The GPU the measured choice is made for, None off CUDA (the tests stand a CPU tensor under the
    interpreter in for a GPU one)."""
    return t.device if t.is_cuda else None


def signature(M: int, N: int, K: int, dtype: torch.dtype, activation: Optional[str], bias: bool, residual: bool) -> str:
    """The key's shape part after the GPU: what the choice depends on."""
    dt = str(dtype).replace("torch.", "")
    return f"{dt}|M={M}|N={N}|K={K}|act={activation}|bias={bias}|residual={residual}"


def linear_fwd_dispatch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    activation: Optional[str],
    y: torch.Tensor,
    pointer: Callable[[torch.Tensor], None],
) -> bool:
    """Launches the TMA kernel for ``linear_fwd`` and returns True where it measured faster than the pointer
    kernel for this key; returns False (the caller launches ``pointer``) everywhere else: TMA off or
    unsupported, a CPU / meta tensor, ``FASTVIT_DISPATCH=static``, pointer measured faster (or TMA refused),
    or a key neither measured nor cached inside CUDA-graph capture or ``torch.compile`` tracing.
    ``pointer(out)`` launches the pointer kernel writing into ``out``."""
    device = _gpu_device(x)
    if device is None or not enabled() or x.dim() != 2 or weight.dim() != 2:
        return False
    if dispatch.current_mode() == "static":
        return False  # the static choice: the pointer kernel, never timed
    M, K = x.shape
    N = weight.shape[0]
    key = (device.index, M, N, K, x.dtype, activation, bias is not None, residual is not None)
    choice = CHOICES.get(key)
    if choice == "pointer" or reasons(x, weight, bias, residual, y):  # alignment may differ call to call
        return False
    if choice is None:
        if torch.compiler.is_compiling():
            return False  # no lock, no file, no trial launches inside a trace
        measure = not graph_capturing(x)  # inside a capture: the cached choice only, no trial launches
        scratch = torch.empty_like(y) if measure else y  # trials never write y (a residual may alias it)
        entry = dispatch.measured_entry(
            FAMILY,
            signature(M, N, K, x.dtype, activation, bias is not None, residual is not None),
            {
                "pointer": lambda: pointer(scratch),
                "tma": lambda: linear_tma_fwd(x, weight, bias, residual, activation, scratch, checked=True),
            },
            device,
            measure=measure,
        )
        if entry is None:
            return False
        choice = CHOICES.setdefault(key, entry["backend"])
    if choice != "tma":
        return False
    # reasons() passed above; linear_fwd's caller checked the rest
    linear_tma_fwd(x, weight, bias, residual, activation, y, checked=True)
    return True

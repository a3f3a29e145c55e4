"""Multi-head scaled-dot-product attention (no mask, non-causal: the ViT encoder's attention).

Math, per batch b and head h, with q (Nq, D), k and v (Nk, D)::

    S   = scale * q @ k.T                    # scale=None means D ** -0.5
    P   = softmax(S, dim=-1)                 # fp32 statistics
    out = (P * Z / (1 - dropout_p)) @ v      # Z: Bernoulli(1 - dropout_p) keep mask, only when dropout_p > 0
    lse = logsumexp(S, dim=-1)               # (natural log, fp32) kept by the kernels for the backward

Gradients (Delta = rowsum(dout * out))::

    dV = (P * Z / (1 - p)).T @ dout
    dP = (dout @ v.T) * Z / (1 - p)
    dS = P * (dP - Delta)
    dQ = scale * dS @ k,   dK = scale * dS.T @ q

Layouts: :func:`attention` takes q, k, v as (B, H, N, D) like ``F.scaled_dot_product_attention`` and
returns a contiguous (B, H, Nq, D). :func:`attention_qkvpacked` takes the qkv Linear's output
(B, N, 3*H*D) (timm's ``reshape(B, N, 3, H, D)`` order) and returns (B, N, H*D) ready for the output
projection; given ``tokens=N`` it takes the same values as (B*N, 3*H*D) rows and returns (B*N, H*D) rows
(a block that runs its GEMMs on rows then needs no view around the attention). The Triton kernels read
q, k and v as strided views of qkv and write the output (and, in the backward, dq/dk/dv into one dqkv
buffer) in place, with no permute or contiguous copy on either side.

Dtypes: fp32, fp16 and bf16, fp32 accumulation, output in the input dtype. Under autocast the inputs are
cast to the autocast dtype (like ``F.linear``), so there q, k and v may come in different dtypes. fp32
matmuls in the Triton kernels follow ``torch.get_float32_matmul_precision()``: "highest" (PyTorch's
default) uses exact fp32 products
(``input_precision="ieee"``), "high"/"medium" use TF32 tensor cores.

Dropout: drawn in the kernels from a Philox key taken from torch's generator (a ``torch.randint`` on the
inputs' device, so ``torch.manual_seed``, the CUDA-graph-safe generator and activation checkpointing's RNG
restore all apply); the backward re-derives the same mask. The mask is not the one
``F.scaled_dot_product_attention`` would draw: :func:`attention_dropout_mask` materialises the kernels'
mask for tests. Like SDPA, the op applies ``dropout_p`` as given; modules pass 0 in eval mode.

Backends: ``torch`` (SDPA) and ``triton``. On CUDA tensors auto dispatch times both per key
(fastvit.ops.dispatch): batch * heads, tokens, head dim, dropout; the static order ``triton`` > ``torch`` is
unmeasured (dispatch.STATIC_ORDER_SOURCE). CPU tensors go to ``torch`` unless ``backend="triton"`` is asked
for under the Triton interpreter.

:func:`attention_probs` is the explicit path that also returns the probabilities P (for attention
rollout and hooks); it is plain torch and materialises the (B, H, Nq, Nk) matrix.
"""

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import kernels
from fastvit.ops._library import (
    FLOAT_DTYPES,
    autocast_dtype,
    check_tensors,
    direct,
    eager_op,
    new_output,
    register_autocast_lower,
)
from fastvit.ops._selftest_spec import SelftestSpec, cap_batch, normal
from fastvit.ops.dispatch import ENV_KEY, OpDispatcher, env_get, is_compiling, no_reasons

if kernels.TRITON_IMPORT_ERROR is None:
    from fastvit.kernels import attention as _triton_kernels

__all__ = [
    "attention",
    "attention_dropout_mask",
    "attention_probs",
    "attention_probs_ref",
    "attention_qkvpacked",
    "attention_ref",
    "split_qkv",
]

# Philox keys are drawn in [0, 2**62) so key + batch*heads never overflows int64.
_SEED_HIGH = 2**62


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    *,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    upcast: bool = False,
) -> Tensor:
    """The specification, in plain torch, on (B, H, N, D) inputs: ``softmax(scale * q @ k.T) @ v``.

    ``upcast=True`` computes in fp32 (or in the inputs' dtype when that is fp64) and returns that dtype;
    otherwise every matmul runs in the inputs' dtype (softmax statistics in fp32) and the result comes back
    in it. ``dropout_mask`` (bool, (B, H, Nq, Nk), True = keep) applies ``P * mask / (1 - dropout_p)``.
    """
    if upcast and q.dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return probs.to(v.dtype) @ v


def attention_probs_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """``(out, probs)`` with probs = softmax(scale * q @ k.T) (fp32 statistics) in the inputs' dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1).to(q.dtype)
    return probs @ v, probs


def split_qkv(qkv: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v as (B, H, N, D) strided views of a packed (B, N, 3*H*D) qkv (no copy)."""
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    q, k, v = qkv.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


# ---------------------------------------------------------------------------------------- checks


def _check_scale_dropout(op: str, scale: Optional[float], dropout_p: float) -> None:
    # comparisons, not math.isfinite: they also take a scale traced as a SymFloat (torch.compile(dynamic=True))
    if scale is not None and (not isinstance(scale, (int, float)) or not -math.inf < scale < math.inf):
        raise ValueError(f"fastvit.ops.{op}: scale must be a finite number or None (D ** -0.5), got {scale!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastvit.ops.{op}: dropout_p must be in [0, 1), got {dropout_p!r}")


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    named = {"q": q, "k": k, "v": v}
    if any(t is None for t in named.values()):
        raise TypeError(f"fastvit.ops.{op}: q, k and v must be tensors, got None")
    check_tensors(f"fastvit.ops.{op}", named)
    kinds = ", ".join(f"{n} {t.dtype}" for n, t in named.items())
    if len({t.dtype for t in named.values()}) > 1 and autocast_dtype(q.device) is None:  # autocast casts them
        raise TypeError(f"fastvit.ops.{op}: q, k and v must share one dtype, got {kinds}; cast them to one")
    if any(t.dtype not in FLOAT_DTYPES for t in named.values()):
        raise TypeError(f"fastvit.ops.{op}: q, k, v must be float32, float16 or bfloat16, got {kinds}")
    for name, t in named.items():
        if t.dim() != 4:
            raise ValueError(
                f"fastvit.ops.{op}: {name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"fastvit.ops.{op}: k shape {tuple(k.shape)} must equal v shape {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"fastvit.ops.{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim "
            "(only the token counts may differ)"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"fastvit.ops.{op}: head_dim must be positive, got shape {tuple(q.shape)}")


def _check_packed(qkv: Tensor, num_heads: int, tokens: Optional[int]) -> None:
    op = "attention_qkvpacked"
    if not isinstance(qkv, Tensor):
        raise TypeError(f"fastvit.ops.{op}: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"fastvit.ops.{op}: num_heads must be a positive int, got {num_heads!r}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastvit.ops.{op}: qkv must be float32, float16 or bfloat16, got {qkv.dtype}")
    if tokens is None:
        if qkv.dim() != 3:
            raise ValueError(
                f"fastvit.ops.{op}: qkv must be 3-D (batch, tokens, 3*heads*head_dim), got {tuple(qkv.shape)}; "
                "for (batch*tokens, 3*heads*head_dim) rows pass tokens=<tokens per image>"
            )
    else:
        if isinstance(tokens, bool) or not isinstance(tokens, (int, torch.SymInt)) or tokens <= 0:  # SymInt: traced
            raise ValueError(f"fastvit.ops.{op}: tokens must be a positive int (tokens per image), got {tokens!r}")
        if qkv.dim() != 2:
            raise ValueError(
                f"fastvit.ops.{op}: with tokens={tokens} qkv must be 2-D (batch*tokens, 3*heads*head_dim) rows, "
                f"got {tuple(qkv.shape)}; pass a 3-D (batch, tokens, 3*heads*head_dim) qkv without tokens"
            )
        if qkv.shape[0] % tokens != 0:
            raise ValueError(
                f"fastvit.ops.{op}: qkv's {qkv.shape[0]} rows are not a whole number of images of tokens={tokens} "
                "tokens; pass the token count N of the (batch*N, 3*heads*head_dim) rows"
            )
    if qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(
            f"fastvit.ops.{op}: qkv's last dimension {qkv.shape[-1]} must be a positive multiple of "
            f"3 * num_heads = {3 * num_heads} (timm's qkv Linear has 3 * dim outputs)"
        )


# -------------------------------------------------------------------------------------- backends


def _triton_reasons(
    q: Optional[Tensor] = None, k: Optional[Tensor] = None, dropout_p: float = 0.0, qkv: Optional[Tensor] = None,
    num_heads: int = 1, tokens: Optional[int] = None, **_: object,
) -> list[str]:  # fmt: skip
    if kernels.TRITON_IMPORT_ERROR is not None:
        return []  # the environment reason already says Triton is missing
    B, H, N_Q, D, N_K = _dims(q, k, qkv, num_heads, tokens)
    return _triton_kernels.unsupported_reasons(D, N_Q, N_K, dropout_p, batch=B, heads=H)


def _dims(
    q: Optional[Tensor], k: Optional[Tensor], qkv: Optional[Tensor], num_heads: int, tokens: Optional[int] = None
) -> Tuple[int, ...]:
    """(B, H, Nq, D, Nk) of a q/k pair or of a packed qkv, 3-D or rows of ``tokens`` (no split computed).
    Rows and their 3-D view share these (and so a measured key): the kernels see the same strides."""
    if qkv is not None:
        if tokens is None:
            B, N, C3 = qkv.shape
        else:
            N, C3 = tokens, qkv.shape[-1]
            B = qkv.shape[0] // N
        return B, num_heads, N, C3 // (3 * num_heads), N
    B, H, N_Q, D = q.shape
    return B, H, N_Q, D, k.shape[-2]


def _signature(
    q: Optional[Tensor] = None, k: Optional[Tensor] = None, dropout_p: float = 0.0, qkv: Optional[Tensor] = None,
    num_heads: int = 1, tokens: Optional[int] = None, **_: object,
) -> str:  # fmt: skip
    B, H, N_Q, D, N_K = _dims(q, k, qkv, num_heads, tokens)
    return f"BH={B * H} Nq={N_Q} Nk={N_K} D={D} dropout={dropout_p > 0} packed={qkv is not None}"


def _dropout_seed(dropout_p: float, like: Tensor) -> Optional[Tensor]:
    """A Philox key from torch's generator for ``like``'s device: (1,) int64, or None without dropout."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, _SEED_HIGH, (1,), device=like.device, dtype=torch.int64)


def _fp32_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastvit::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, seed: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor]:
    """q (B, H, Nq, D), k and v (B, H, Nk, D), unit last stride. Returns out (B, H, Nq, D) and lse (B, H, Nq) fp32."""
    B, H, Nq, D = q.shape
    out = new_output((B, H, Nq, D), q)
    lse = new_output((B, H, Nq), q, torch.float32)
    _triton_kernels.attention_fwd(q, k, v, out, lse, scale, dropout_p, seed, _fp32_precision())
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale, dropout_p, seed, backend):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("fastvit::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, dropout_p: float,
    seed: Optional[Tensor], backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns dq, dk, dv, contiguous, in q's dtype."""
    dq, dk, dv = new_output(q.shape, q), new_output(k.shape, k), new_output(v.shape, v)
    _triton_kernels.attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale, dropout_p, seed, _fp32_precision())
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, dropout_p, seed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _bwd(_unit_last_stride(dout), q, k, v, out, lse, ctx.scale, ctx.dropout_p, seed, ctx.backend)
    return dq, dk, dv, None, None, None, None


_fwd = eager_op(_attention_fwd, _setup_context, _backward)
_bwd = direct(_attention_bwd)
register_autocast_lower(_attention_fwd)


@torch.library.custom_op("fastvit::attention_qkvpacked_fwd", mutates_args=())
def _attention_qkvpacked_fwd(
    qkv: Tensor, num_heads: int, tokens: int, scale: float, dropout_p: float, seed: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor]:
    """qkv (B, N, 3*H*D), or (B*N, 3*H*D) rows of ``tokens`` = N, with unit last stride. Returns out (B, N, H*D)
    (rows: (B*N, H*D)) and lse (B, H, N) fp32."""
    tokens_view = _tokens_view(qkv, tokens)
    B, N, C3 = tokens_view.shape
    q, k, v = split_qkv(tokens_view, num_heads)
    out = new_output((*qkv.shape[:-1], C3 // 3), qkv)
    lse = new_output((B, num_heads, N), qkv, torch.float32)
    out_heads = _heads_view(_tokens_view(out, tokens), num_heads)
    _triton_kernels.attention_fwd(q, k, v, out_heads, lse, scale, dropout_p, seed, _fp32_precision())
    return out, lse


@_attention_qkvpacked_fwd.register_fake
def _(qkv, num_heads, tokens, scale, dropout_p, seed, backend):
    C3 = qkv.shape[-1]
    B = qkv.shape[0] if qkv.dim() == 3 else qkv.shape[0] // tokens
    return qkv.new_empty((*qkv.shape[:-1], C3 // 3)), qkv.new_empty((B, num_heads, tokens), dtype=torch.float32)


def _tokens_view(x: Tensor, tokens: int) -> Tensor:
    """(B, N, C) as it is, (B*N, C) rows of ``tokens`` = N as a (B, N, C) view (inside the ops: no autograd)."""
    return x if x.dim() == 3 else x.view(x.shape[0] // tokens, tokens, x.shape[-1])


def _heads_view(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*D) as a (B, H, N, D) strided view."""
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)


@torch.library.custom_op("fastvit::attention_qkvpacked_bwd", mutates_args=())
def _attention_qkvpacked_bwd(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, tokens: int, scale: float,
    dropout_p: float, seed: Optional[Tensor], backend: str,
) -> Tensor:  # fmt: skip
    """dout and out (B, N, H*D) or (B*N, H*D) rows, unit last stride. Returns dqkv shaped like qkv, written in
    place by the kernels."""
    dqkv = new_output(qkv.shape, qkv)
    q, k, v = split_qkv(_tokens_view(qkv, tokens), num_heads)
    dq, dk, dv = split_qkv(_tokens_view(dqkv, tokens), num_heads)
    dout_heads, out_heads = (_heads_view(_tokens_view(t, tokens), num_heads) for t in (dout, out))
    _triton_kernels.attention_bwd(
        dout_heads, q, k, v, out_heads, lse, dq, dk, dv, scale, dropout_p, seed, _fp32_precision()
    )  # fmt: skip
    return dqkv


@_attention_qkvpacked_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, tokens, scale, dropout_p, seed, backend):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output) -> None:
    qkv, num_heads, tokens, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed)
    ctx.num_heads, ctx.tokens, ctx.scale, ctx.dropout_p, ctx.backend = num_heads, tokens, scale, dropout_p, backend


def _packed_backward(ctx, dout, _dlse):
    qkv, out, lse, seed = ctx.saved_tensors
    dout = _unit_last_stride(dout)  # e.g. the stride-0 gradient of a sum
    dqkv = _packed_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.tokens, ctx.scale, ctx.dropout_p, seed, ctx.backend)
    return dqkv, None, None, None, None, None, None


_packed_fwd = eager_op(_attention_qkvpacked_fwd, _packed_setup_context, _packed_backward)
_packed_bwd = direct(_attention_qkvpacked_bwd)
register_autocast_lower(_attention_qkvpacked_fwd)


def _torch_launch(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], dropout_p: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _triton_launch(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], dropout_p: float) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    out, _ = _fwd(q, k, v, scale, float(dropout_p), _dropout_seed(dropout_p, q), "triton")
    return out


def _torch_packed_launch(
    qkv: Tensor, num_heads: int, scale: Optional[float], dropout_p: float, tokens: Optional[int] = None
) -> Tensor:
    """SDPA on the split views; rows are viewed as (B, N, 3, H, D) directly (one view node, as for 3-D)."""
    C3 = qkv.shape[-1]
    if tokens is None:
        B, N, _ = qkv.shape
    else:
        B, N = qkv.shape[0] // tokens, tokens
    q, k, v = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(*qkv.shape[:-1], C3 // 3)


def _triton_packed_launch(
    qkv: Tensor, num_heads: int, scale: Optional[float], dropout_p: float, tokens: Optional[int] = None
) -> Tensor:
    scale = _default_scale(qkv, num_heads, scale)
    out, _ = _packed_fwd(
        _unit_last_stride(qkv), num_heads, qkv.shape[1] if tokens is None else tokens, scale, float(dropout_p),
        _dropout_seed(dropout_p, qkv), "triton",
    )  # fmt: skip
    return out


def _default_scale(qkv: Tensor, num_heads: int, scale: Optional[float]) -> float:
    return (qkv.shape[-1] // (3 * num_heads)) ** -0.5 if scale is None else float(scale)


def _check_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], dropout_p: float) -> None:
    _check_qkv("attention", q, k, v)
    _check_scale_dropout("attention", scale, dropout_p)


def _check_attention_packed(
    qkv: Tensor, num_heads: int, scale: Optional[float], dropout_p: float, tokens: Optional[int] = None
) -> None:
    _check_packed(qkv, num_heads, tokens)
    _check_scale_dropout("attention_qkvpacked", scale, dropout_p)


# The selftest's cases (fastvit/ops/_selftest_spec.py). Model shapes: label -> (heads, tokens, head_dim).
_SELFTEST_SHAPES = {
    "vit_b16_224": (12, 197, 64),
    "vit_l16_384": (16, 577, 64),
    "vit_h14_224": (16, 257, 80),
    "deit_s16_224": (6, 197, 64),
    "t2t_token_attention": (1, 3136, 64),
}
_SELFTEST_PACKED_LABELS = ("vit_b16_224", "vit_h14_224", "deit_s16_224")


def _selftest_shapes(labels: Tuple[str, ...]) -> Callable[[int], Dict[str, Dict[str, int]]]:
    def shapes(batch: int) -> Dict[str, Dict[str, int]]:  # the batch capped for the fp64 oracle
        picked = {k: _SELFTEST_SHAPES[k] for k in labels}
        return {k: {"B": cap_batch(batch, h * n * n), "H": h, "N": n, "D": d} for k, (h, n, d) in picked.items()}

    return shapes


def _selftest_problem(s: Dict[str, Any], dev: torch.device) -> Any:
    from fastvit import ops

    rn = normal(dev)
    leaves = {n: rn(s["B"], s["H"], s["N"], s["D"]) for n in ("q", "k", "v")}
    return (
        leaves,
        lambda t, b: ops.attention(t["q"], t["k"], t["v"], backend=b),
        lambda t: ops.attention_ref(t["q"], t["k"], t["v"]),
    )


def _selftest_packed_problem(s: Dict[str, Any], dev: torch.device) -> Any:
    from fastvit import ops

    B, H, N, D = s["B"], s["H"], s["N"], s["D"]

    def packed_ref(t: Dict[str, Tensor]) -> Tensor:
        q, k, v = split_qkv(t["qkv"], H)
        return ops.attention_ref(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    return (
        {"qkv": normal(dev)(B, N, 3 * H * D)},
        lambda t, b: ops.attention_qkvpacked(t["qkv"], H, backend=b),
        packed_ref,
    )


def _selftest_sdpa(t: Dict[str, Tensor], s: Dict[str, Any]) -> Callable[[], Tensor]:
    return lambda: F.scaled_dot_product_attention(t["q"], t["k"], t["v"])


def _selftest_packed_sdpa(t: Dict[str, Tensor], s: Dict[str, Any]) -> Callable[[], Tensor]:
    B, H, N, D = s["B"], s["H"], s["N"], s["D"]

    def packed() -> Tensor:
        q, k, v = t["qkv"].view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    return packed


def _selftest_flops(s: Dict[str, Any], t: Dict[str, Tensor], out: Tensor) -> Tuple[str, float]:
    return "tflops", 4.0 * s["B"] * s["H"] * s["N"] ** 2 * s["D"]


def _selftest_sdpa_backend_ms(fn: Callable[[], Any]) -> Dict[str, float]:
    """``fn`` (an SDPA call) timed under each SDPA backend that accepts the input: {"sdpa_<name>_ms": ms}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastvit._timing import median_ms

    times = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue

        def under(b: Any = backend) -> Any:
            with sdpa_kernel(b):
                return fn()

        try:
            under()
        except RuntimeError:  # this SDPA backend refuses the input (dtype, head dim, GPU)
            continue
        times[f"sdpa_{name.split('_')[0].lower()}_ms"] = median_ms(under)
    if not times:
        raise RuntimeError("no SDPA backend (flash, efficient, cudnn) accepts the ViT-B/16 attention input here")
    return times


def _selftest_spec(packed: bool) -> SelftestSpec:
    small = {"B": 1, "H": 2, "N": 17, "D": 32 if packed else 64}
    return SelftestSpec(
        model_shapes=_selftest_shapes(_SELFTEST_PACKED_LABELS if packed else tuple(_SELFTEST_SHAPES)),
        small_shapes={"small": small},
        problem=_selftest_packed_problem if packed else _selftest_problem,
        rule="three_way",
        speed_shape="vit_b16_224",
        composition=_selftest_packed_sdpa if packed else _selftest_sdpa,
        work=_selftest_flops,
        primary_shapes=("vit_b16_224",),
        cpu_torch_shapes=("vit_b16_224",),
        sanitizers=("memcheck",) if packed else ("memcheck", "racecheck"),
        baseline_times=_selftest_sdpa_backend_ms,
        order=1 if packed else 0,
    )


def _dispatcher(packed: bool) -> OpDispatcher:
    """The op-table row of ``attention`` or ``attention_qkvpacked``: one kernel family, one rule set; they
    differ only in the layout-specific launchers, checks and custom ops."""
    return OpDispatcher(
        name="attention_qkvpacked" if packed else "attention",
        kernel_family="attention",
        reasons={"torch": no_reasons, "triton": _triton_reasons},
        preference=("triton", "torch"),
        launchers=(
            {"torch": _torch_packed_launch, "triton": _triton_packed_launch}
            if packed
            else {"torch": _torch_launch, "triton": _triton_launch}
        ),
        reference=attention_ref,
        check=_check_attention_packed if packed else _check_attention,
        forward_op=_attention_qkvpacked_fwd if packed else _attention_fwd,
        backward_op=_attention_qkvpacked_bwd if packed else _attention_bwd,
        autocast="lower",
        signature=_signature,
        selftest=_selftest_spec(packed=packed),
    )


_OP, _PACKED = _dispatcher(packed=False), _dispatcher(packed=True)
_MEMO, _PACKED_MEMO = _OP._memo, _PACKED._memo


# ------------------------------------------------------------------------------------ public API


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """Scaled-dot-product attention with ``F.scaled_dot_product_attention`` semantics (no mask, non-causal).

    Args:
        q: (B, H, Nq, D) queries, fp32 / fp16 / bf16, any strides (a copy is made only when the last
            dimension is not contiguous).
        k: (B, H, Nk, D) keys, same dtype and device as q.
        v: (B, H, Nk, D) values.
        scale: multiplies q @ k.T; None means D ** -0.5. Modules with their own scale (T2T-ViT) pass it.
        dropout_p: probability of dropping an attention weight, applied as given (pass 0.0 in eval mode).
        backend: None (``FASTVIT_BACKEND`` or auto), "torch" (SDPA) or "triton".

    Returns:
        (B, H, Nq, D) contiguous, in q's dtype.

    Raises:
        TypeError / ValueError: bad dtypes, shapes, scale, dropout_p or mixed devices, naming the input.
        fastvit.ops.dispatch.BackendNotSupported: an explicit backend cannot serve the input.
    """
    key = chosen = None
    if not is_compiling():  # traced: the full checks and select run (on values cached outside the trace)
        try:  # the signature: validation and the choice are cached per signature. k's and v's dtypes and
            # devices are left out (reading, hashing and comparing them costs ~0.5 us, an eighth of a tiny
            # SDPA): a hit compares them below before it runs (SDPA: by refusing a mismatch itself)
            key = (q.shape, q.dtype, q.device, k.shape, v.shape, scale, dropout_p, backend, env_get(ENV_KEY))
            chosen = _MEMO.get(key)
        except (AttributeError, TypeError):  # not tensors / unhashable: the checks say what is wrong
            key = None
        if chosen.__class__ is not str:  # a measured (CUDA, auto) or autocast-only entry, or a miss
            chosen = _OP.slot(chosen, (q, k, v))
    if chosen is None:
        _check_attention(q, k, v, scale, dropout_p)

        def run(b, q, k, v, scale, dropout_p):
            return attention(q, k, v, scale=scale, dropout_p=dropout_p, backend=b)

        mixed = k.dtype != q.dtype or v.dtype != q.dtype  # passed the checks: only under autocast
        chosen = _OP.resolve(
            key, backend, q.device, run, autocast_only=mixed, q=q, k=k, v=v, scale=scale, dropout_p=dropout_p
        )
    if chosen == "torch":  # the common CPU case, one frame less
        try:
            if scale is None and not dropout_p:  # SDPA's defaults: parsing no keyword arguments saves ~0.4 us
                return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        except RuntimeError:  # e.g. k or v in another dtype or on another device than a memo hit's q (outside
            _check_attention(q, k, v, scale, dropout_p)  # autocast): the checks' clear error
            raise
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        _check_attention(q, k, v, scale, dropout_p)  # a memo hit on another dtype / device set: it raises but
        # under autocast, where the op casts them all (the registered autocast rule)
    return _OP.launchers[chosen](q, k, v, scale, dropout_p)


def attention_qkvpacked(
    qkv: Tensor,
    num_heads: int,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
    tokens: Optional[int] = None,
) -> Tensor:
    """Attention straight from the qkv Linear's output, returning the input of the output projection.

    Equivalent to ``q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``, then
    ``attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)``, but the Triton backend reads q, k, v
    and writes the output (and dqkv in the backward) through strides, with no copies.

    Args:
        qkv: (B, N, 3*H*D), or with ``tokens`` the same values as (B*N, 3*H*D) rows (a qkv GEMM run on
            rows), fp32 / fp16 / bf16; the last dimension must be contiguous for the no-copy path.
        num_heads: H.
        scale: multiplies q @ k.T; None means D ** -0.5.
        dropout_p: probability of dropping an attention weight, applied as given (pass 0.0 in eval mode).
        backend: None (``FASTVIT_BACKEND`` or auto), "torch" (SDPA) or "triton".
        tokens: N, the tokens per image of a 2-D qkv (rows image-major: row ``b * N + n``); None for 3-D.

    Returns:
        (B, N, H*D) in qkv's dtype; (B*N, H*D) rows for rows (same values, no view in the autograd graph
        between them and the output projection).

    Raises:
        TypeError / ValueError: bad dtype, shape, num_heads, tokens, scale or dropout_p, naming the input.
        fastvit.ops.dispatch.BackendNotSupported: an explicit backend cannot serve the input.
    """
    key = chosen = None
    if not is_compiling():  # traced: the full checks and select run (on values cached outside the trace)
        try:  # the signature: validation and the choice are cached per signature (num_heads and tokens with
            # their types: True == 1 must not share a valid call's key)
            key = (
                (shape := qkv.shape), qkv.dtype, qkv.device, num_heads, num_heads.__class__, scale, dropout_p,
                backend, env_get(ENV_KEY), tokens, tokens.__class__,
            )  # fmt: skip
            chosen = _PACKED_MEMO.get(key)
        except (AttributeError, TypeError):  # not a tensor / unhashable: the checks say what is wrong
            key = None
        if chosen.__class__ is not str:  # a measured (CUDA, auto) or autocast-only entry, or a miss
            chosen = _PACKED.slot(chosen, (qkv,))
    if chosen is None:
        _check_attention_packed(qkv, num_heads, scale, dropout_p, tokens)

        def run(b, qkv, num_heads, scale, dropout_p, tokens):
            return attention_qkvpacked(qkv, num_heads, scale=scale, dropout_p=dropout_p, backend=b, tokens=tokens)

        chosen = _PACKED.resolve(
            key, backend, qkv.device, run, qkv=qkv, num_heads=num_heads, scale=scale, dropout_p=dropout_p,
            tokens=tokens,
        )  # fmt: skip
        shape = qkv.shape
    if chosen == "torch":  # the common CPU case: _torch_packed_launch inlined
        if tokens is None:
            B, N, C3 = shape
        else:  # rows: viewed as (B, N, 3, H, D) at once, and the output reshaped straight back to rows
            M, C3 = shape
            B, N = M // tokens, tokens
        q, k, v = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        if scale is None and not dropout_p:  # SDPA's defaults: parsing no keyword arguments saves ~0.4 us
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        if tokens is None:
            return out.transpose(1, 2).reshape(B, N, C3 // 3)
        return out.transpose(1, 2).reshape(M, C3 // 3)
    return _PACKED.launchers[chosen](qkv, num_heads, scale, dropout_p, tokens)


def attention_probs(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The explicit (unfused) attention that also returns the probabilities, for rollout and hooks.

    Args:
        q: (B, H, Nq, D) queries, fp32 / fp16 / bf16.
        k: (B, H, Nk, D) keys.
        v: (B, H, Nk, D) values.
        scale: multiplies q @ k.T; None means D ** -0.5.

    Returns:
        ``(out, probs)``: out (B, H, Nq, D) and probs = softmax(scale * q @ k.T) (B, H, Nq, Nk), both in
        q's dtype (softmax statistics in fp32). Autograd flows through both.
    """
    _check_qkv("attention_probs", q, k, v)
    _check_scale_dropout("attention_probs", scale, 0.0)
    return attention_probs_ref(q, k, v, scale)


def attention_dropout_mask(
    seed: Tensor, batch: int, heads: int, q_tokens: int, k_tokens: int, dropout_p: float
) -> Tensor:
    """The Triton kernels' dropout keep-mask (bool, (B, H, Nq, Nk), True = keep) for a given Philox key.

    For tests and debugging at small shapes: the kernels never materialise it. ``seed`` is the (1,) int64
    key tensor (on the inputs' device) that :func:`attention` draws with ``torch.randint``.
    """
    if kernels.TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"fastvit.ops.attention_dropout_mask needs Triton ({kernels.TRITON_IMPORT_ERROR})")
    return _triton_kernels.dropout_keep_mask(seed, batch, heads, q_tokens, k_tokens, dropout_p)

"""Linear layer with a fused epilogue: bias, activation and residual add on the GEMM's accumulator.

Math (fp32 accumulation, one rounding to x's dtype at the end)::

    h = x @ weight.T + bias               # the pre-activation, stored only with save_preact (below)
    y = act(h) + residual                 # act: identity, "gelu" (erf, nn.GELU()), "gelu_tanh"
                                          #      (nn.GELU(approximate="tanh")), "quick_gelu" (h * sigmoid(1.702 h))

Gradients (dy is the gradient of y)::

    g         = dy * act'(h)              # the fused part: h is recomputed by a GEMM whose epilogue
                                          # multiplies in dy, so g is the only (M, N) tensor written
                                          # (or, with save_preact, read back from the forward: see below)
    dx        = g @ weight                # plain GEMMs: torch.matmul (cuBLAS)
    dweight   = g.T @ x
    dbias     = sum_rows(g)               # fp32, from per-tile column sums in the same epilogue
    dresidual = dy                        # passes through

Memory choice, ``save_preact`` (activated layers on the "triton" and "cuda" backends):

* recompute (the default, ``save_preact=False``): autograd keeps x, weight and bias; the backward
  recomputes h with one extra GEMM of the forward's size (fc1 of an MLP: 3 GEMMs instead of 2; for a
  ViT block that is 11.1% more than its 12 fwd + dgrad + wgrad linear GEMMs, 10.0% of the total:
  ``benchmarks/kernel_report.py --training-flops``).
* save (``save_preact=True``): the forward's epilogue also stores h (rounded to x's dtype, as timm's
  eager MLP keeps it: F.gelu saves its input) and the backward is one elementwise pass
  g = dy * act'(h) with the dbias column sums, no GEMM. Memory cost: M * N elements of x's dtype per
  activated linear, alive from the forward to its backward: ViT-B/16 at batch 256 in bf16,
  256 * 197 * 3072 * 2 B = 310 MB per block, 3.7 GB for the 12 blocks.
* The flag: ``linear(..., save_preact=True/False)`` per call; ``None`` (what the models' layers pass)
  takes the process default: inside ``with save_preact(enabled):`` that value, else the environment
  variable ``FASTVIT_SAVE_PREACT`` (``1``/``true``/``on``/``yes`` or ``0``/``false``/``off``/``no``,
  any case; unset or empty: off; anything else raises ValueError naming the accepted values), else
  False. Recompute stays the default because it is today's behaviour and memory is what limits
  the batch size of ViT training (3.7 GB on ViT-B/16 at batch 256), while the saving is one GEMM per
  block; turn it on where the memory is spare.
* The "torch" backend is autograd's own composition: F.gelu keeps h whatever the flag says.

With no activation there is nothing to recompute and dy is g; dbias = sum_rows(dy) then comes from the
dW GEMM's own pass over dy (fastvit::linear_wgrad) instead of a separate ``dy.sum(0)``, which read M * N
elements of dy once more (bf16, ViT-B/16 batch 256, qkv + proj + fc2: 387 MB per block; the FLOPs do not
change). "cuda": cuBLASLt's BGRADB epilogue (csrc/linear.cu::linear_wgrad; where cuBLASLt has no
algorithm for it, the separate pair runs). "triton": the Triton dW kernel whose first K-tile programs also
sum the dy tiles they load (kernels/linear.py), chosen per (GPU, M, N, K, dtype) by measurement against
``torch.matmul(dy.T, x)`` + ``dy.sum(0)`` (it replaces a cuBLAS GEMM, so it runs only where it timed
faster; ``FASTVIT_WGRAD_FUSED=0`` turns it off, and on CPU tensors, in static dispatch mode or unmeasured
inside capture / tracing the pair runs). Without dW wanted dbias is the column sum alone. Both column sums
are fp32 and deterministic. Activated layers already get dbias from the pass that computes g (both paths).

Dtypes: x, weight, bias and residual share one dtype: fp16 and bf16 run on the tensor cores with fp32
accumulation. fp32 inputs follow ``torch.get_float32_matmul_precision()`` exactly as ``F.linear`` does:
"high" or "medium" (``torch.backends.cuda.matmul.allow_tf32 = True``) runs them through TF32 on the GPU
(10-bit mantissa products, fp32 accumulation: the fast path for fp32 models); "highest", torch's
default, keeps exact fp32 products (no tensor cores, so slow). Under the Triton interpreter fp32 is
exact. float64 is served by the "torch" backend only. Under autocast the op lowers its floating-point
inputs to the autocast dtype, as ``F.linear`` does (a fp32 residual stream is lowered too).

The ``cuda`` backend (csrc/linear.cu) runs the GEMMs in cuBLASLt: bias (and a residual without
activation) in its epilogue, fp16/bf16 "gelu_tanh" without a residual as its GELU_BIAS epilogue; "gelu"
(erf), "quick_gelu", fp32 and activations followed by a residual take one extra elementwise pass over
the output, and the backward's act'(h) is an elementwise pass over the recomputed h fused with dbias's
column sums. With ``save_preact`` it writes h with the bias epilogue and applies the activation (and
residual) in torch ops from the rounded h; the backward from the saved h is torch ops in fp32 (no csrc
entry point for it), correct but not fused.

Backends: ``torch`` (``F.linear`` + the activation + the add), ``triton``, ``cuda``. On CUDA tensors auto
dispatch times the eligible ones per key (fastvit.ops.dispatch): (M, N, K) exactly (a GEMM's tiling
winner changes with every one of them), the epilogue (bias, activation, residual). The static order
``triton`` > ``cuda`` > ``torch`` is unmeasured (dispatch.STATIC_ORDER_SOURCE).
"""

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvit import kernels
from fastvit.ops import _cuda_backends as _cuda
from fastvit.ops._library import (
    FLOAT_DTYPES,
    autocast_dtype,
    check_tensors,
    direct,
    eager_op,
    new_output,
    register_autocast_lower,
)
from fastvit.ops._selftest_spec import SelftestSpec, normal
from fastvit.ops._validate import check_call, gemm_backend
from fastvit.ops.dispatch import ENV_KEY, OpDispatcher, _env, env_get, is_compiling, no_reasons

if kernels.TRITON_IMPORT_ERROR is None:
    from fastvit.kernels import linear as _triton_kernels

__all__ = ["ACTIVATIONS", "SAVE_PREACT_ENV", "linear", "linear_ref", "save_preact", "save_preact_default"]

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
_LINEAR_DTYPES = (*FLOAT_DTYPES, torch.float64)  # float64 on the "torch" backend only
SAVE_PREACT_ENV = "FASTVIT_SAVE_PREACT"
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


# --------------------------------------------------------------------------- save_preact: the flag

_SAVE_OVERRIDE: list = [None]  # the innermost ``with save_preact(...)`` value, or None


def _check_flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"fastvit.ops.linear: {where} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def save_preact_default() -> bool:
    """Whether ``linear(..., save_preact=None)`` saves the pre-activation: the innermost
    :func:`save_preact` block, else ``FASTVIT_SAVE_PREACT``, else False (recompute).

    Raises:
        ValueError: ``FASTVIT_SAVE_PREACT`` is set to something other than 1/true/on/yes or 0/false/off/no.
    """
    override = _SAVE_OVERRIDE[0]
    if override is not None:
        return override
    value = _env(SAVE_PREACT_ENV)
    if value is None or value in _FALSE:
        return False
    if value in _TRUE:
        return True
    raise ValueError(
        f"fastvit.ops.linear: {SAVE_PREACT_ENV}={value!r} is not understood; set it to 1 (save the activated "
        f"linears' pre-activation for the backward: more memory, one GEMM less) or 0 (recompute it, the default), "
        f"or unset it"
    )


@contextmanager
def save_preact(enabled: bool) -> Iterator[None]:
    """Within the block, ``linear(..., save_preact=None)`` saves (True) or recomputes (False) the activated
    linears' pre-activation, whatever ``FASTVIT_SAVE_PREACT`` says. The choice is made in the forward; the
    backward follows what its forward did. Not thread-local (like torch's global switches).

    Args:
        enabled: True or False (anything else raises TypeError).
    """
    previous, _SAVE_OVERRIDE[0] = _SAVE_OVERRIDE[0], _check_flag(enabled, "save_preact(enabled)")
    try:
        yield
    finally:
        _SAVE_OVERRIDE[0] = previous


def _activate(h: Tensor, activation: Optional[str]) -> Tensor:
    if activation is None:
        return h
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    raise ValueError(_unknown_activation(activation))


def linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    *,
    upcast: bool = False,
) -> Tensor:
    """The specification, in plain torch: ``act(F.linear(x, weight, bias)) + residual``.

    ``upcast=True`` computes in fp32 (fp64 inputs stay fp64) and returns that dtype (the oracle tests
    compare against); otherwise every step rounds to the inputs' dtype, as timm's eager modules do.
    """
    if upcast:

        def up(t: Optional[Tensor]) -> Optional[Tensor]:
            return t if t is None or t.dtype == torch.float64 else t.float()

        x, weight, bias, residual = up(x), up(weight), up(bias), up(residual)
    y = _activate(F.linear(x, weight, bias), activation)
    return y if residual is None else y + residual


# ---------------------------------------------------------------------------------------- checks


def _unknown_activation(activation: object) -> str:
    return (
        f"fastvit.ops.linear: unknown activation {activation!r}; expected None or one of "
        f"{', '.join(repr(a) for a in ACTIVATIONS)}"
    )


def _check_inputs(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], residual: Optional[Tensor]
) -> None:
    named = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    check_tensors("fastvit.ops.linear", named)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(_unknown_activation(activation))
    for name, t in named.items():
        if t is not None and t.dtype not in _LINEAR_DTYPES:
            raise TypeError(f"fastvit.ops.linear: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in named.items():
        # Under autocast the op lowers every input to the autocast dtype first (see the autocast rule).
        if t is not None and t.dtype != x.dtype and autocast_dtype(x.device) is None:
            raise TypeError(
                f"fastvit.ops.linear: {name} dtype {t.dtype} must equal x's dtype {x.dtype} (cast the parameters, "
                f"or run under torch.autocast, which lowers them like F.linear)"
            )
    if x.dim() < 1:
        raise ValueError("fastvit.ops.linear: x must have at least one dimension (..., in_features), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"fastvit.ops.linear: weight must have shape (out_features, {x.shape[-1]}) to match x's last dimension "
            f"(in_features), got {tuple(weight.shape)}"
        )
    out_features = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"fastvit.ops.linear: bias must have shape ({out_features},) (weight's out_features), "
            f"got {tuple(bias.shape)}"
        )
    if residual is not None:
        expected = (*x.shape[:-1], out_features)
        if tuple(residual.shape) != expected:
            raise ValueError(
                f"fastvit.ops.linear: residual shape {tuple(residual.shape)} must equal the output's shape {expected}"
            )


# -------------------------------------------------------------------------------------- backends


def _triton_reasons(x: Tensor, **_: object) -> list[str]:
    if x.dtype not in FLOAT_DTYPES:
        return [f"dtype {x.dtype} is not supported by the Triton GEMM (float32 via TF32, float16, bfloat16)"]
    return []


def _signature(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: Optional[str]
) -> str:
    M = x.numel() // max(x.shape[-1], 1)
    return (
        f"M={M} N={weight.shape[0]} K={weight.shape[1]} bias={bias is not None} act={activation} "
        f"residual={residual is not None}"
    )


# ------------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("fastvit::linear_fwd", mutates_args=())
def _linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: str, backend: str
) -> Tensor:
    """x: (M, K), weight: (N, K), residual: (M, N), any strides; activation "" means none.
    Returns act(x @ weight.T + bias) + residual as a contiguous (M, N) tensor."""
    y = new_output((x.shape[0], weight.shape[0]), x)
    launch = _cuda.linear_fwd if backend == "cuda" else _triton_kernels.linear_fwd
    launch(x, weight, bias, residual, activation or None, y)
    return y


@_linear_fwd.register_fake
def _(x, weight, bias, residual, activation, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastvit::linear_act_grad", mutates_args=())
def _linear_act_grad(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, need_dbias: bool, backend: str
) -> Tuple[Tensor, Tensor]:
    """dy: (M, N). Recomputes h = x @ weight.T + bias and returns g = dy * act'(h), contiguous (M, N), and
    sum_rows(g) in bias's dtype (empty unless need_dbias)."""
    g = new_output(dy.shape, dy)
    launch = _cuda.linear_act_grad if backend == "cuda" else _triton_kernels.linear_act_grad
    dbias = launch(dy, x, weight, bias, activation, g, need_dbias)
    return g, dbias.to(dy.dtype) if dbias is not None else dy.new_empty((0,))


@_linear_act_grad.register_fake
def _(dy, x, weight, bias, activation, need_dbias, backend):
    return dy.new_empty(dy.shape), dy.new_empty((dy.shape[1],) if need_dbias else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation
    ctx.backend = backend
    ctx.has_residual = residual is not None


@torch.library.custom_op("fastvit::linear_wgrad", mutates_args=())
def _linear_wgrad(dy: Tensor, x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """dy (M, N), x (M, K). Returns (dy.T @ x, sum_rows(dy)) in dy's dtype, the column sums fused into the
    dW GEMM where the backend has that: "cuda" cuBLASLt's BGRADB epilogue (where cuBLASLt has an algorithm
    for it), "triton" the fused Triton kernel where it measured faster (kernels/linear.py:
    linear_wgrad_dispatch); everywhere else torch.matmul and the fp32 column sum."""
    if backend == "cuda":
        fused = _cuda.linear_wgrad(dy, x, True)
        if fused is not None:
            return fused
    elif backend == "triton":
        dweight, dbias = _triton_kernels.linear_wgrad_dispatch(dy, x, True)
        return dweight, dbias.to(dy.dtype)
    return torch.matmul(dy.t(), x), dy.sum(0, dtype=torch.float32).to(dy.dtype)


@_linear_wgrad.register_fake
def _(dy, x, backend):
    return dy.new_empty((dy.shape[1], x.shape[1])), dy.new_empty((dy.shape[1],))


def _input_grads(ctx, g: Tensor, x: Tensor, weight: Tensor, dbias: Optional[Tensor], need_dbias: bool):
    """(dx, dweight, dbias) from g = dy * act'(h) (g = dy without activation), for both backwards. ``dbias``
    is the act-grad pass's column sums, or None: then, when wanted, it comes from here, from the dW GEMM's
    pass over g (fastvit::linear_wgrad) when dW is wanted too, else from a column sum."""
    dx = torch.matmul(g, weight) if ctx.needs_input_grad[0] else None
    dweight = None
    if ctx.needs_input_grad[1]:
        if need_dbias and dbias is None:
            dweight, dbias = _wgrad(g, x, ctx.backend)
        else:
            dweight = torch.matmul(g.t(), x)
    elif need_dbias and dbias is None:
        dbias = g.sum(0, dtype=torch.float32).to(g.dtype)
    return dx, dweight, dbias if need_dbias else None


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[2]
    if ctx.activation:
        g, dbias = _act_grad(dy, x, weight, bias, ctx.activation, need_dbias, ctx.backend)
    else:
        g, dbias = dy, None
    dx, dweight, dbias = _input_grads(ctx, g, x, weight, dbias, need_dbias)
    dresidual = dy if ctx.has_residual else None
    return dx, dweight, dbias, dresidual, None, None


_fwd = eager_op(_linear_fwd, _setup_context, _backward)
_act_grad = direct(_linear_act_grad)
_wgrad = direct(_linear_wgrad)
register_autocast_lower(_linear_fwd)


# The save_preact path: a forward that also returns h, and a backward from the saved h (no GEMM).


def _act_grad_saved_torch(dy: Tensor, h: Tensor, activation: str, need_dbias: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """g = dy * act'(h) and sum_rows(g) (fp32) in torch ops, in fp32: the cuda backend's path (csrc has no
    entry point for it) and the formula the Triton kernel follows."""
    hf = h.float()
    if activation == "gelu":
        d = 0.5 * (1.0 + torch.erf(hf * 0.7071067811865476)) + hf * 0.3989422804014327 * torch.exp(-0.5 * hf * hf)
    elif activation == "gelu_tanh":
        u2 = 1.5957691216057308 * (hf + 0.044715 * hf * hf * hf)  # 2u
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * hf * hf)
        d = torch.sigmoid(u2) + 2.0 * hf * torch.sigmoid(u2) * torch.sigmoid(-u2) * du
    elif activation == "quick_gelu":
        s = torch.sigmoid(1.702 * hf)
        d = s + 1.702 * hf * s * torch.sigmoid(-1.702 * hf)
    else:
        raise ValueError(_unknown_activation(activation))
    g = dy.float() * d
    return g.to(dy.dtype), g.sum(0) if need_dbias else None


@torch.library.custom_op("fastvit::linear_fwd_save", mutates_args=())
def _linear_fwd_save(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], activation: str, backend: str
) -> Tuple[Tensor, Tensor]:
    """As fastvit::linear_fwd with an activation, and also returns the pre-activation h = x @ weight.T + bias
    (contiguous (M, N), x's dtype) for the backward."""
    M, N = x.shape[0], weight.shape[0]
    y, h = new_output((M, N), x), new_output((M, N), x)
    if backend == "cuda":  # cuBLASLt writes h (bias in its epilogue); the activation and residual in torch ops
        _cuda.linear_fwd(x, weight, bias, None, None, h)
        out = _activate(h.float(), activation)
        y.copy_(out if residual is None else out + residual.float())
    else:  # one Triton epilogue stores both; y is bit-identical to fastvit::linear_fwd's
        _triton_kernels.linear_fwd(x, weight, bias, residual, activation, y, h)
    return y, h


@_linear_fwd_save.register_fake
def _(x, weight, bias, residual, activation, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastvit::linear_act_grad_saved", mutates_args=())
def _linear_act_grad_saved(
    dy: Tensor, h: Tensor, activation: str, need_dbias: bool, backend: str
) -> Tuple[Tensor, Tensor]:
    """dy, h: (M, N). Returns g = dy * act'(h), contiguous (M, N), and sum_rows(g) in dy's dtype (empty
    unless need_dbias): fastvit::linear_act_grad without the GEMM."""
    if backend == "cuda":
        g, dbias = _act_grad_saved_torch(dy, h, activation, need_dbias)
        g = g.contiguous()
    else:
        g = new_output(dy.shape, dy)
        dbias = _triton_kernels.linear_act_grad_saved(dy, h, activation, g, need_dbias)
    return g, dbias.to(dy.dtype) if dbias is not None else dy.new_empty((0,))


@_linear_act_grad_saved.register_fake
def _(dy, h, activation, need_dbias, backend):
    return dy.new_empty(dy.shape), dy.new_empty((dy.shape[1],) if need_dbias else (0,))


def _setup_context_save(ctx, inputs, output) -> None:
    x, weight, bias, residual, activation, backend = inputs
    h = output[1]
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)  # h gets no gradient: no (M, N) zeros for it
    ctx.save_for_backward(x, weight, h)
    ctx.has_bias = bias is not None
    ctx.activation = activation
    ctx.backend = backend
    ctx.has_residual = residual is not None


def _backward_save(ctx, dy, _dh):
    x, weight, h = ctx.saved_tensors
    need_dbias = ctx.has_bias and ctx.needs_input_grad[2]
    if dy is None:  # y unused by the loss (materialize_grads is off)
        dy = h.new_zeros(h.shape)
    g, dbias = _act_grad_saved(dy, h, ctx.activation, need_dbias, ctx.backend)
    dx, dweight, dbias = _input_grads(ctx, g, x, weight, dbias, need_dbias)
    dresidual = dy if ctx.has_residual else None
    return dx, dweight, dbias, dresidual, None, None


_fwd_save = eager_op(_linear_fwd_save, _setup_context_save, _backward_save)
_act_grad_saved = direct(_linear_act_grad_saved)
register_autocast_lower(_linear_fwd_save)


def _torch_launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], residual):
    return linear_ref(x, weight, bias, activation, residual)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will record this call (else saving h would only cost a write)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_launch(backend: str):
    def launch(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str], residual,
        save: Optional[bool] = False,
    ):  # fmt: skip
        N = weight.shape[0]
        residual2d = residual.reshape(-1, N) if residual is not None else None
        x2d = x.reshape(-1, x.shape[-1])
        if activation and (save_preact_default() if save is None else save) and _needs_grad(x, weight, bias, residual):
            y = _fwd_save(x2d, weight, bias, residual2d, activation, backend)[0]
        else:
            y = _fwd(x2d, weight, bias, residual2d, activation or "", backend)
        return y.view(*x.shape[:-1], N)

    return launch


# The selftest's cases (fastvit/ops/_selftest_spec.py). label -> (in_features, out_features, activation, residual)
# at ViT-B/16's 197 tokens.
_SELFTEST_SHAPES = {
    "vit_b16_qkv": (768, 2304, None, False),
    "vit_b16_fc1_gelu": (768, 3072, "gelu", False),
    "vit_b16_fc2_residual": (3072, 768, None, True),
}


def _selftest_problem(s: Dict[str, Any], dev: torch.device) -> Any:
    from fastvit import ops

    rn = normal(dev)
    M, K, N_out = s["M"], s["K"], s["O"]
    leaves = {"x": rn(M, K), "weight": rn(N_out, K, scale=K**-0.5), "bias": rn(N_out, scale=0.5)}
    if s["res"]:
        leaves["residual"] = rn(M, N_out)
    return (
        leaves,
        lambda t, b: ops.linear(
            t["x"], t["weight"], t["bias"], activation=s["act"], residual=t.get("residual"), backend=b
        ),
        lambda t: ops.linear_ref(t["x"], t["weight"], t["bias"], s["act"], t.get("residual")),
    )


_SELFTEST = SelftestSpec(
    model_shapes=lambda batch: {
        k: {"M": batch * 197, "N": 197, "K": i, "O": o, "act": a, "res": r}
        for k, (i, o, a, r) in _SELFTEST_SHAPES.items()
    },
    small_shapes={
        "small_gelu": {"M": 16, "N": 16, "K": 64, "O": 48, "act": "gelu", "res": False},
        "small_residual": {"M": 16, "N": 16, "K": 48, "O": 64, "act": None, "res": True},
    },
    problem=_selftest_problem,
    rule="three_way",
    speed_shape="vit_b16_fc1_gelu",
    composition=lambda t, s: lambda: F.gelu(F.linear(t["x"], t["weight"], t["bias"])),
    work=lambda s, t, out: ("tflops", 2.0 * s["M"] * s["K"] * s["O"]),
    primary_shapes=tuple(_SELFTEST_SHAPES),
    cpu_torch_shapes=("vit_b16_fc1_gelu", "vit_b16_fc2_residual"),
    sanitizers=("memcheck", "racecheck"),
    order=2,
)


_OP = OpDispatcher(
    name="linear",
    reasons={"torch": no_reasons, "triton": _triton_reasons, "cuda": _cuda.linear_reasons},
    preference=("triton", "cuda", "torch"),
    launchers={"torch": _torch_launch, "triton": _kernel_launch("triton"), "cuda": _kernel_launch("cuda")},
    reference=linear_ref,
    check=_check_inputs,
    forward_op=_linear_fwd,
    backward_op=_linear_act_grad,
    autocast="lower",
    signature=_signature,
    selftest=_SELFTEST,
)
_MEMO = _OP._memo


# ------------------------------------------------------------------------------------ public API


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
    save_preact: Optional[bool] = None,
) -> Tensor:
    """``act(x @ weight.T + bias) + residual`` with bias, activation and residual in the GEMM's epilogue.

    Args:
        x: (..., in_features) activations, fp32 / fp16 / bf16 (fp64 on the "torch" backend); any strides.
        weight: (out_features, in_features), x's dtype (``nn.Linear.weight``).
        bias: (out_features,) like ``weight``, or None.
        activation: None, "gelu" (exact erf, ``nn.GELU()``), "gelu_tanh" (``nn.GELU(approximate="tanh")``)
            or "quick_gelu" (``h * sigmoid(1.702 h)``).
        residual: (..., out_features) added after the activation (the transformer's residual stream), or None.
        backend: None (``FASTVIT_BACKEND`` or auto), "torch", "triton" or "cuda".
        save_preact: with an activation, on the "triton" / "cuda" backends, under grad: True keeps the
            pre-activation h for the backward (M * N elements of x's dtype; the backward skips the GEMM
            that recomputes it), False recomputes it, None (default) takes :func:`save_preact_default`
            (``with save_preact(...)``, else ``FASTVIT_SAVE_PREACT``, else False). See the module docstring.

    Returns:
        (..., out_features) in x's dtype; fp32 accumulation (fp32 inputs: TF32 products on the GPU when
        ``torch.get_float32_matmul_precision()`` allows them, as for ``F.linear``).

    Raises:
        TypeError / ValueError: bad dtypes, shapes, an unknown activation, mixed devices or a ``save_preact``
            that is not a bool / None, naming the input; a bad ``FASTVIT_SAVE_PREACT`` value.
        fastvit.ops.dispatch.BackendNotSupported: an explicit backend cannot serve the input.
    """
    key = chosen = None
    if not is_compiling():  # traced: the full checks and select run (on values cached outside the trace)
        try:  # the signature: validation and the choice are cached per signature
            key = (
                x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device, activation,
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
        check_call("fastvit.ops.linear", {"x": x, "weight": weight}, optional={"bias": bias, "residual": residual})
        _check_inputs(x, weight, bias, activation, residual)
        backend = gemm_backend("fastvit.ops.linear", x.shape[-1], backend)

        def run(b, x, weight, bias, residual):
            return linear(x, weight, bias, activation=activation, residual=residual, backend=b)

        # mixed dtypes pass the checks only under autocast (which lowers them to one): such an entry answers
        # only under autocast, so the key need not carry the autocast state
        mixed = any(t is not None and t.dtype != x.dtype for t in (weight, bias, residual))
        chosen = _OP.resolve(
            key, backend, x.device, run, mixed, x=x, weight=weight, bias=bias, residual=residual, activation=activation
        )
    if save_preact is not None and save_preact is not True and save_preact is not False:
        _check_flag(save_preact, "save_preact")
    if chosen == "torch":  # the common CPU case: linear_ref inlined without an activation (bit-identical)
        if activation is None:
            y = F.linear(x, weight, bias)
            return y if residual is None else y + residual
        return linear_ref(x, weight, bias, activation, residual)  # autograd keeps h whatever save_preact says
    if activation is None:
        return _OP.launchers[chosen](x, weight, bias, activation, residual)
    return _OP.launchers[chosen](x, weight, bias, activation, residual, save_preact)

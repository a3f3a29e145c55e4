"""The fused forwards, once: one function per module kind, shared by fastvit's layers and ``patch_model``.

Each function takes a module laid out with timm's attribute names (``qkv`` / ``q_norm`` / ``k_norm`` /
``attn_drop`` / ``norm`` / ``proj`` / ``proj_drop`` for attention, ``fc1`` / ``act`` / ``drop1`` / ``norm`` /
``fc2`` / ``drop2`` for the MLP, ``norm1`` / ``attn`` / ``ls1`` / ``drop_path1`` / ``norm2`` / ``mlp`` /
``ls2`` / ``drop_path2`` for the block) and runs it on ``fastvit.ops``. ``fastvit.layers`` call them from
their ``forward``; :mod:`fastvit.patch` binds them onto timm's modules. So the fusion rules live here and
nowhere else:

* a Linear's GEMM runs through ``ops.linear`` on its weight, unless forward hooks watch the Linear (then
  the module is called, so the hooks fire: fastvit's ``Linear`` takes the epilogue arguments);
* an optional submodule (``q_norm``, ``k_norm``, ``norm``, a gate) is called only when it computes
  something or hooks watch it (:func:`called`);
* the first residual add is fused into ``norm2`` only when the caller says norm2 is a plain LayerNorm,
  branch and stream share a dtype (under autocast the branch is lowered, timm's stream stays fp32) and no
  hook watches norm2;
* the second residual add is fused into fc2's epilogue only under :func:`mlp_residual_fusable`.

What decides whether a module runs these at all (timm: FX tracing, dtypes, hooks on what a fused forward
skips; fastvit: the explicit-attention switch) stays with the caller.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

try:  # true under torch.fx.symbolic_trace only (not torch.export / torch.compile, which trace the ops themselves)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as fx_symbolic_tracing
except ImportError:  # older torch: one flag for every FX-based tracer
    from torch.fx._symbolic_trace import is_fx_tracing as fx_symbolic_tracing

from fastvit import ops
from fastvit.ops._library import autocast_dtype
from fastvit.ops.attention import split_qkv

__all__ = [
    "MlpPlan",
    "attention",
    "block",
    "called",
    "dropout_active",
    "fx_symbolic_tracing",
    "hooked",
    "layer_norm",
    "linear",
    "mlp",
    "mlp_residual_fusable",
    "patch_embed",
]

# How a block's MLP runs fused: (activation epilogue name or None, backend or None). None: it does not.
MlpPlan = Optional[tuple[Optional[str], Optional[str]]]


def hooked(*modules: Optional[nn.Module]) -> bool:
    """True when a module carries forward hooks that a fused path (which skips calling it) would miss."""
    return any(m is not None and bool(m._forward_hooks or m._forward_pre_hooks) for m in modules)


def called(module: Optional[nn.Module]) -> bool:
    """Whether a fused path must call an optional submodule: it computes something, or hooks watch it."""
    return module is not None and (not isinstance(module, nn.Identity) or hooked(module))


def dropout_active(module: nn.Module) -> bool:
    """A Dropout / DropPath (torch's, timm's or fastvit's) that changes its input in this mode."""
    p = getattr(module, "p", getattr(module, "drop_prob", 0.0)) or 0.0
    return module.training and p > 0.0


def linear(
    module: nn.Module,
    x: Tensor,
    activation: Optional[str] = None,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``module``'s GEMM with the epilogue, straight on ``ops.linear``; a hooked module is called instead.

    Callers only pass an epilogue to a hooked module that takes it (fastvit's ``Linear``): patched timm
    modules fall back to their original forward when a Linear with an epilogue is hooked.
    """
    if hooked(module):
        if activation is None and residual is None:
            return module(x)
        return module(x, activation=activation, residual=residual)
    return ops.linear(x, module.weight, module.bias, activation=activation, residual=residual, backend=backend)


def layer_norm(
    module: nn.Module, x: Tensor, residual: Optional[Tensor] = None, backend: Optional[str] = None
) -> object:
    """A last-dimension LayerNorm module on ``ops.layer_norm``: ``LN(x)``, or ``(LN(x + r), x + r)``."""
    return ops.layer_norm(x, module.weight, module.bias, module.eps, residual=residual, backend=backend)


def attention(module: nn.Module, x: Tensor, scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """timm's ViT attention on the ops: qkv GEMM -> packed flash attention (per-head attention after q/k
    norms) -> the optional output norm and gate -> proj GEMM -> proj_drop. (B, N, C) -> (B, N, C).

    Args:
        module: qkv, proj (Linear), num_heads, attn_drop (its rate is the attention dropout in training),
            proj_drop, and optionally q_norm, k_norm, norm, gate.
        scale: the softmax scale; None is ``head_dim ** -0.5``.
        backend: passed to every op.
    """
    B, N, _ = x.shape
    gate = getattr(module, "gate", None)
    gate = linear(gate, x, backend=backend).sigmoid() if gate is not None else None
    qkv = linear(module.qkv, x, backend=backend)
    dropout_p = module.attn_drop.p if module.training else 0.0
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    if not called(q_norm) and not called(k_norm):
        out = ops.attention_qkvpacked(qkv, module.num_heads, scale=scale, dropout_p=dropout_p, backend=backend)
    else:
        q, k, v = split_qkv(qkv, module.num_heads)
        q = q_norm(q) if called(q_norm) else q
        k = k_norm(k) if called(k_norm) else k
        out = ops.attention(q, k, v, scale=scale, dropout_p=dropout_p, backend=backend)
        out = out.transpose(1, 2).reshape(B, N, qkv.shape[-1] // 3)
    norm = getattr(module, "norm", None)
    if called(norm):
        out = norm(out)
    if gate is not None:
        out = out * gate
    return module.proj_drop(linear(module.proj, out, backend=backend))


def mlp(
    module: nn.Module,
    x: Tensor,
    activation: Optional[str],
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """timm's Mlp on the ops: fc1 with ``activation`` in its epilogue (None, or hooks on ``module.act``:
    the act module runs after the GEMM) -> drop1 -> the optional norm -> fc2, then drop2. With ``residual``
    it is added in fc2's epilogue instead (the caller checked :func:`mlp_residual_fusable`, so drop2 is
    inactive)."""
    if activation is not None and not hooked(module.act):
        h = linear(module.fc1, x, activation=activation, backend=backend)
    else:
        h = module.act(linear(module.fc1, x, backend=backend))
    h = module.drop1(h)
    norm = getattr(module, "norm", None)
    if called(norm):
        h = norm(h)
    if residual is None:
        return module.drop2(linear(module.fc2, h, backend=backend))
    return linear(module.fc2, h, residual=residual, backend=backend)


def mlp_residual_fusable(block_module: nn.Module, residual: Tensor, plan: MlpPlan) -> bool:
    """Whether a block may add its second residual inside fc2's epilogue.

    It may when the MLP runs the fused path (``plan`` is not None) and nothing the fused call skips
    (the MLP's own call, its GEMMs and activation, drop2, ls2, drop_path2) computes or is hooked: no
    LayerScale, no active drop-path or output dropout. Under autocast the epilogue would lower an fp32
    residual stream to the autocast dtype, which timm keeps fp32, so then it may not either. (Under FX
    symbolic tracing dtypes are unknown: the graph records the fused call.)
    """
    if plan is None:
        return False
    tracing = fx_symbolic_tracing()  # dtypes and devices are proxies then: the graph records the fused call
    m = block_module.mlp
    ls2, drop_path2 = block_module.ls2, block_module.drop_path2
    return (
        isinstance(ls2, nn.Identity) and not dropout_active(drop_path2) and not dropout_active(m.drop2)
        and (tracing or autocast_dtype(residual.device) in (None, residual.dtype))
        and not hooked(m, m.fc1, m.act, m.fc2, m.drop2, ls2, drop_path2)
    )  # fmt: skip


def block(module: nn.Module, x: Tensor, fuse_norm2: bool, mlp_plan: MlpPlan, backend: Optional[str] = None) -> Tensor:
    """The pre-norm ViT block: ``x + drop_path1(ls1(attn(norm1(x))))``, then ``+ drop_path2(ls2(mlp(norm2(.))))``
    with the first add fused into norm2 and the second into fc2's epilogue where the rules allow.

    Args:
        module: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2 (the submodules are called as
            modules: each runs its own, possibly fused, forward).
        x: (B, N, C) tokens.
        fuse_norm2: norm2 is a plain last-dimension LayerNorm with a weight (``ops.layer_norm`` computes it).
        mlp_plan: how the MLP runs fused, or None (see :func:`mlp_residual_fusable`).
        backend: passed to the fused norm2 (the MLP's backend is in ``mlp_plan``).
    """
    a = module.drop_path1(module.ls1(module.attn(module.norm1(x))))
    norm2 = module.norm2
    if fuse_norm2 and (fx_symbolic_tracing() or a.dtype == x.dtype) and not hooked(norm2):
        y, x = layer_norm(norm2, a, residual=x, backend=backend)
    else:
        x = x + a
        y = norm2(x)
    if mlp_residual_fusable(module, x, mlp_plan):
        activation, mlp_backend = mlp_plan
        return mlp(module.mlp, y, activation, residual=x, backend=mlp_backend)
    return x + module.drop_path2(module.ls2(module.mlp(y)))


def patch_embed(
    module: nn.Module,
    x: Tensor,
    pos_embed: Optional[Tensor] = None,
    prefix_tokens: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """timm's PatchEmbed projection (``proj``: Conv2d, kernel = stride = p) as one ``ops.patch_embed``:
    (B, C, H, W) -> (B, [P +] h*w, D) tokens, right/bottom zero padding when ``module.dynamic_img_pad``."""
    conv = module.proj
    return ops.patch_embed(
        x, conv.weight, conv.bias, patch_size=conv.kernel_size[0], pos_embed=pos_embed,
        prefix_tokens=prefix_tokens, pad=bool(getattr(module, "dynamic_img_pad", False)), backend=backend,
    )  # fmt: skip

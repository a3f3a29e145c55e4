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
* the second residual add is fused into fc2's epilogue only under :func:`mlp_residual_fusable`;
* a block whose norm1 and attention run these functions unwatched and whose residual adds both fuse runs
  on (B * N, C) rows without calling its submodules (:func:`block`'s ``direct``): the same ops on the same
  values, with no view pair around each GEMM and no view around the packed attention in the autograd graph,
  and no module-call overhead.

What decides whether a module runs these at all (timm: FX tracing, dtypes, hooks on what a fused forward
skips; fastvit: the explicit-attention switch) stays with the caller.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn.modules import module as _module

try:  # true under torch.fx.symbolic_trace only (not torch.export / torch.compile, which trace the ops themselves)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as fx_symbolic_tracing
except ImportError:  # older torch: one flag for every FX-based tracer
    from torch.fx._symbolic_trace import is_fx_tracing as fx_symbolic_tracing

from fastvit import ops
from fastvit.ops._library import autocast_dtype
from fastvit.ops.attention import split_qkv
from fastvit.ops.dispatch import is_compiling

__all__ = [
    "MlpPlan",
    "attention",
    "bare",
    "block",
    "packed_rows_ready",
    "called",
    "dropout_active",
    "fx_symbolic_tracing",
    "hooked",
    "layer_norm",
    "linear",
    "mlp",
    "mlp_residual_fusable",
    "patch_embed",
    "register_dropout",
]

# How a block's MLP runs fused: (activation epilogue name or None, backend or None). None: it does not.
MlpPlan = Optional[tuple[Optional[str], Optional[str]]]


# Host cost: at small batch these functions, not the kernels, set the speed, so they read submodules and
# parameters from ``_modules`` / ``_parameters`` (a dict lookup) rather than through ``nn.Module.__getattr__``
# (a Python call that searches three dicts), and skip Identity modules nobody watches instead of calling them.


def hooked(*modules: Optional[nn.Module]) -> bool:
    """True when a module carries forward hooks that a fused path (which skips calling it) would miss."""
    for m in modules:
        if m is not None and (m._forward_hooks or m._forward_pre_hooks):
            return True
    return False


def called(module: Optional[nn.Module]) -> bool:
    """Whether a fused path must call an optional submodule: it computes something, or hooks watch it.
    An Identity, and a Dropout / DropPath that is inactive in this mode (eval, or rate 0), compute nothing."""
    if module is None:
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return True
    kind = type(module)
    if kind is nn.Identity:
        return False
    inactive_identity = kind is nn.Dropout or kind.__dict__.get(_INACTIVE_IDENTITY, False)
    return not (inactive_identity and not dropout_active(module))


def _apply(module: Optional[nn.Module], x: Tensor) -> Tensor:
    """``module(x)``, or ``x`` when :func:`called` says the call computes nothing."""
    return module(x) if called(module) else x


# Dropout classes whose inactive forward returns its input unchanged (nn.Dropout and the registered ones;
# any other class is always called).
# A class attribute, not a set lookup: torch 2.5's dynamo cannot trace ``cls in some_set`` (compile fullgraph).
_INACTIVE_IDENTITY = "_fastvit_identity_when_inactive"


def register_dropout(cls: type) -> type:
    """Marks a Dropout / DropPath class whose forward is the identity when ``dropout_active`` is False, so
    the fused paths skip calling it then (fastvit's DropPath is registered; any other class is called)."""
    setattr(cls, _INACTIVE_IDENTITY, True)
    return cls


def dropout_active(module: nn.Module) -> bool:
    """A Dropout / DropPath (torch's, timm's or fastvit's) that changes its input in this mode."""
    if not module.training:  # eval: checked first, so the common case reads one attribute
        return False
    d = module.__dict__  # torch's Dropout keeps ``p``, timm's / fastvit's DropPath ``drop_prob`` there
    if "p" in d:
        p = d["p"]
    elif "drop_prob" in d:
        p = d["drop_prob"]
    elif module.__class__ is nn.Identity and not (module._parameters or module._buffers or module._modules):
        return False  # (a block's unused drop_path2 in training) no ``p`` / ``drop_prob`` anywhere: two failing
        # ``nn.Module.__getattr__`` lookups below would cost ~2 us per block
    else:
        p = getattr(module, "p", getattr(module, "drop_prob", 0.0))
    return (p or 0.0) > 0.0


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
    if module._forward_hooks or module._forward_pre_hooks:
        if activation is None and residual is None:
            return module(x)
        return module(x, activation=activation, residual=residual)
    params = module._parameters
    return ops.linear(x, params["weight"], params["bias"], activation=activation, residual=residual, backend=backend)


def layer_norm(
    module: nn.Module, x: Tensor, residual: Optional[Tensor] = None, backend: Optional[str] = None
) -> object:
    """A last-dimension LayerNorm module on ``ops.layer_norm``: ``LN(x)``, or ``(LN(x + r), x + r)``."""
    params = module._parameters
    return ops.layer_norm(x, params["weight"], params.get("bias"), module.eps, residual=residual, backend=backend)


def attention(
    module: nn.Module,
    x: Tensor,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    tokens: Optional[int] = None,
) -> Tensor:
    """timm's ViT attention on the ops: qkv GEMM -> packed flash attention (per-head attention after q/k
    norms) -> the optional output norm and gate -> proj GEMM -> proj_drop. (B, N, C) -> (B, N, C).

    Args:
        module: qkv, proj (Linear), num_heads, attn_drop (its rate is the attention dropout in training),
            proj_drop, and optionally q_norm, k_norm, norm, gate.
        scale: the softmax scale; None is ``head_dim ** -0.5``.
        backend: passed to every op.
        tokens: N when ``x`` comes as (B * N, C) rows (:func:`block`'s row path): the GEMMs and the packed
            attention then run on rows (no view nodes around any of them) and the output is (B * N, C) too.
    """
    sub = module._modules
    if tokens is not None:  # rows: only the packed path (the caller checked: no q/k norm, gate or out norm)
        qkv = linear(sub["qkv"], x, backend=backend)
        dropout_p = sub["attn_drop"].p if module.training else 0.0
        heads = module.num_heads
        out = ops.attention_qkvpacked(qkv, heads, scale=scale, dropout_p=dropout_p, backend=backend, tokens=tokens)
        return _apply(sub["proj_drop"], linear(sub["proj"], out, backend=backend))
    gate = sub.get("gate")
    gate = linear(gate, x, backend=backend).sigmoid() if gate is not None else None
    qkv = linear(sub["qkv"], x, backend=backend)
    dropout_p = sub["attn_drop"].p if module.training else 0.0
    q_norm, k_norm = sub.get("q_norm"), sub.get("k_norm")
    if not called(q_norm) and not called(k_norm):
        out = ops.attention_qkvpacked(qkv, module.num_heads, scale=scale, dropout_p=dropout_p, backend=backend)
    else:
        B, N, _ = x.shape
        q, k, v = split_qkv(qkv, module.num_heads)
        out = ops.attention(_apply(q_norm, q), _apply(k_norm, k), v, scale=scale, dropout_p=dropout_p, backend=backend)
        out = out.transpose(1, 2).reshape(B, N, qkv.shape[-1] // 3)
    out = _apply(sub.get("norm"), out)
    if gate is not None:
        out = out * gate
    return _apply(sub["proj_drop"], linear(sub["proj"], out, backend=backend))


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
    sub = module._modules
    act = sub["act"]
    if activation is not None and not (act._forward_hooks or act._forward_pre_hooks):
        h = linear(sub["fc1"], x, activation=activation, backend=backend)
    else:
        h = act(linear(sub["fc1"], x, backend=backend))
    h = _apply(sub.get("norm"), _apply(sub["drop1"], h))
    if residual is None:
        return _apply(sub["drop2"], linear(sub["fc2"], h, backend=backend))
    return linear(sub["fc2"], h, residual=residual, backend=backend)


def mlp_residual_fusable(block_module: nn.Module, residual: Tensor, plan: MlpPlan) -> bool:
    """Whether a block may add its second residual inside fc2's epilogue.

    It may when the MLP runs the fused path (``plan`` is not None) and nothing the fused call skips
    (the MLP's own call, its GEMMs and activation, drop2, ls2, drop_path2) computes or is hooked: no
    LayerScale, no active drop-path or output dropout. Under autocast the epilogue would lower an fp32
    residual stream to the autocast dtype, which timm keeps fp32, so then it may not either. (Under FX
    symbolic tracing dtypes are unknown: the graph records the fused call.)
    """
    return _mlp_unwatched(block_module, plan) and (
        fx_symbolic_tracing() or autocast_dtype(residual.device) in (None, residual.dtype)
    )


def _mlp_unwatched(block_module: nn.Module, plan: MlpPlan) -> bool:
    """:func:`mlp_residual_fusable` but for the dtype rule."""
    if plan is None:
        return False
    sub = block_module._modules
    m, ls2, drop_path2 = sub["mlp"], sub["ls2"], sub["drop_path2"]
    msub = m._modules
    if not isinstance(ls2, nn.Identity):
        return False
    if dropout_active(drop_path2) or dropout_active(msub["drop2"]):
        return False
    return not hooked(m, msub["fc1"], msub["act"], msub["fc2"], msub["drop2"], ls2, drop_path2)


def _global_hooks() -> bool:
    """Global module hooks (``torch.nn.modules.module.register_module_forward_hook`` ...): every module call
    must then go through ``nn.Module.__call__``."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def bare(module: nn.Module) -> bool:
    """No forward or backward hook of ``module`` itself watches it (global hooks: the caller checks them):
    running its forward without the module call is then the same as calling it."""
    return not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def packed_rows_ready(attn: nn.Module) -> bool:
    """Whether :func:`attention` may run ``attn`` on (B * N, C) rows: the packed path (no q/k norm, out norm
    or gate computes anything) and no hook on the attention module or on the submodules that would see
    rows instead of tokens (qkv, attn_drop, proj, proj_drop)."""
    sub = attn._modules
    return (
        bare(attn)
        and sub.get("gate") is None
        and not hooked(sub["qkv"], sub["attn_drop"], sub["proj"], sub["proj_drop"])
        and not called(sub.get("q_norm"))
        and not called(sub.get("k_norm"))
        and not called(sub.get("norm"))
    )


def _rows_of(x: Tensor, M: int, C: int) -> Tensor:
    """``x`` (B, N, C) as (M, C) rows. Without grad, when ``x`` is the (B, N, C) view a previous row-path
    block returned of its (M, C) rows (same memory), those rows themselves (one view op less per block).
    Not when ``x`` requires grad: a hook or ``retain_grad`` on ``x`` (Grad-CAM on a block output) must see
    the gradient the next block sends back through ``x``."""
    if x.requires_grad or is_compiling():  # compiled: the graph's own view handling, no ``_base`` probing
        return x.reshape(M, C)
    base = x._base
    if (
        base is not None
        and not base.requires_grad
        and base.shape == (M, C)
        and base.is_contiguous()
        and x.is_contiguous()
        and base.data_ptr() == x.data_ptr()
    ):
        return base
    return x.reshape(M, C)


def block(
    module: nn.Module,
    x: Tensor,
    fuse_norm2: bool,
    mlp_plan: MlpPlan,
    backend: Optional[str] = None,
    direct: Optional[tuple[Optional[str], Optional[float], Optional[str]]] = None,
) -> Tensor:
    """The pre-norm ViT block: ``x + drop_path1(ls1(attn(norm1(x))))``, then ``+ drop_path2(ls2(mlp(norm2(.))))``
    with the first add fused into norm2 and the second into fc2's epilogue where the rules allow.

    Args:
        module: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2 (the submodules are called as
            modules: each runs its own, possibly fused, forward; unwatched Identities are skipped).
        x: (B, N, C) tokens.
        fuse_norm2: norm2 is a plain last-dimension LayerNorm with a weight (``ops.layer_norm`` computes it).
        mlp_plan: how the MLP runs fused, or None (see :func:`mlp_residual_fusable`).
        backend: passed to the fused norm2 (the MLP's backend is in ``mlp_plan``).
        direct: (norm1's backend, the attention scale, the attention's backend) when the caller checked that
            ``norm1`` computes :func:`layer_norm` and ``attn`` the packed :func:`attention` (no q/k norm,
            out norm or gate) and that nothing hooks them or what their forwards skip, else None. Then,
            when the residual adds fuse too (no LayerScale, drop-path or hooks between the ops, no autocast
            lowering, not FX tracing), the block runs on (B * N, C) rows without calling its submodules:
            the same ops on the same values, with fewer autograd nodes (no view pair around each GEMM)
            and no module-call overhead.
    """
    sub = module._modules
    if (
        direct is not None
        and fuse_norm2
        and not called(sub["ls1"])
        and not called(sub["drop_path1"])
        and not hooked(sub["norm2"], sub["mlp"]._modules.get("drop1"), sub["mlp"]._modules.get("norm"))
        and not _global_hooks()
        and not fx_symbolic_tracing()
        and x.dim() == 3
        and _mlp_unwatched(module, mlp_plan)
        and autocast_dtype(x.device) in (None, x.dtype)  # the branch keeps the stream's dtype: both adds fuse
    ):
        B, N, C = x.shape
        rows = _rows_of(x, B * N, C)
        a = attention(sub["attn"], layer_norm(sub["norm1"], rows, backend=direct[0]), direct[1], direct[2], N)
        y, rows = layer_norm(sub["norm2"], a, residual=rows, backend=backend)
        activation, mlp_backend = mlp_plan
        return mlp(sub["mlp"], y, activation, residual=rows, backend=mlp_backend).view(B, N, C)
    a = _apply(sub["drop_path1"], _apply(sub["ls1"], sub["attn"](sub["norm1"](x))))
    norm2 = sub["norm2"]
    if fuse_norm2 and (fx_symbolic_tracing() or a.dtype == x.dtype) and not hooked(norm2):
        y, x = layer_norm(norm2, a, residual=x, backend=backend)
    else:
        x = x + a
        y = norm2(x)
    if mlp_residual_fusable(module, x, mlp_plan):
        activation, mlp_backend = mlp_plan
        return mlp(sub["mlp"], y, activation, residual=x, backend=mlp_backend)
    return x + _apply(sub["drop_path2"], _apply(sub["ls2"], sub["mlp"](y)))


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

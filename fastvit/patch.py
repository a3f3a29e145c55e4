"""``fastvit.patch_model(timm_model)``: the fused kernels inside the timm ViTs people already have.

The patch works at the instance level (Liger-Kernel's pattern): for every supported module it binds a new
``forward`` on that module instance (``module.__dict__["forward"]``) and keeps the previous one for
:func:`unpatch_model`. Parameters, buffers, state-dict keys, the module tree and ``pretrained_cfg`` are
never touched, so checkpoints, ``timm.models.load_checkpoint`` and converters keep working, and
``unpatch_model`` gives back the original forwards (the very same function objects).

What is replaced (each with the module's own scale, eps, activation and dropout rates), by the functions of
:mod:`fastvit.layers.fused` that fastvit's own layers run too (so both follow one set of fusion rules):

========================  ======================================================================
timm class                patched forward
========================  ======================================================================
``Attention``             ``ops.linear`` (qkv) -> ``ops.attention_qkvpacked`` (``ops.attention``
                          after q/k norms) -> scale-norm / gate modules -> ``ops.linear`` (proj)
``Mlp``                   ``ops.linear`` fc1 with the GELU (erf / tanh / quick) in its epilogue ->
                          drop1 -> norm -> ``ops.linear`` fc2 -> drop2
``Block`` (ViT)           the first residual add fused into norm2 (``ops.layer_norm(residual=)``),
                          the second into fc2's epilogue when nothing sits between them
``LayerNorm``             ``ops.layer_norm`` (``nn.LayerNorm`` and ``timm.layers.LayerNorm``; this
                          covers ``norm_pre``, ``norm`` and ``fc_norm`` too)
``PatchEmbed``            ``ops.patch_embed`` (conv k = s = p as one GEMM), NLC or NHWC output
``HybridEmbed``           the CNN backbone unchanged, its k = s projection through ``ops.patch_embed``
========================  ======================================================================

Detection is by class name, defining module and forward signature, so it covers timm up to 1.0.15
(``Attention`` in ``timm.models.vision_transformer``, ``forward(x)``) and from 1.0.16
(``timm.layers.attention``, ``forward(x, attn_mask=None[, is_causal=False])``). Anything it cannot run
exactly stays unpatched and is listed in the :class:`PatchReport` with its module path and the reason
(other block classes such as ``ParallelScalingBlock`` / ``ResPostBlock`` / ``EvaBlock``, rotary or pooling
attention, GLU MLPs, channels-first norms, ...). A call that passes ``attn_mask`` or ``is_causal``, or that
finds forward hooks on a submodule the fused path would skip (``timm.utils.AttentionExtract`` hooks
``attn_drop``; hooks on ``mlp.drop2`` or an Identity ``q_norm`` / ``norm`` are honoured too), runs the original
forward for that call (or, for an Identity, calls it). So does every call under FX symbolic tracing
(``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor``, timm's FX feature extraction and
``AttentionExtract(method="fx")``: the graph records timm's own math) and every call with an input dtype the
kernels do not serve (float64: logged once per class and dtype). Models built with ``fused_attn=False`` are
patched too: both timm paths compute the same softmax attention, the kernel computes it once more in fp32.
The attention scale is read at patch time (patch again after changing ``attn.scale``).

A patched model pickles (``torch.save(model)``) and loads in a fresh process still patched; ``copy.deepcopy``
(EMA copies) gives an independent patched copy; ``unpatch_model`` works on both.

In timm's scriptable mode (``set_layer_config(scriptable=True)``) nothing is patched and the report says why:
TorchScript cannot compile instance-bound forwards (``torch.compile`` and ``torch.export`` can).
``torch.jit.script`` of a patched model raises :class:`PatchError` saying to unpatch first.

Under ``torch.autocast`` a patched LayerNorm returns its input's dtype (``F.layer_norm`` returns fp32 there),
as fastvit's own layers do; the block's residual adds are fused only when branch and stream dtypes agree,
so timm's fp32 residual stream stays fp32. Patch before ``torch.compile(model)``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from fastvit._geometry import patch_grid
from fastvit.layers import fused
from fastvit.layers.attention import Attention as FastvitAttention
from fastvit.layers.fused import fx_symbolic_tracing
from fastvit.layers.fused import hooked as _hooked
from fastvit.layers.mlp import fused_activation_name
from fastvit.ops.dispatch import BACKENDS

__all__ = [
    "PatchError",
    "PatchReport",
    "PatchedModule",
    "SkippedModule",
    "patch_model",
    "return_attention",
    "unpatch_model",
]

# Where timm defines the classes the patch understands (old and new layouts).
_TIMM_ATTENTION = {"timm.layers.attention", "timm.models.vision_transformer"}
_TIMM_MLP = {"timm.layers.mlp", "timm.models.layers.mlp"}
_TIMM_BLOCK = {"timm.models.vision_transformer"}
_TIMM_NORM = {"timm.layers.norm", "timm.models.layers.norm"}
_TIMM_PATCH_EMBED = {"timm.layers.patch_embed", "timm.models.layers.patch_embed"}
_TIMM_HYBRID_EMBED = {"timm.layers.hybrid_embed", "timm.models.vision_transformer_hybrid"}
# Optional call-time arguments of timm's Attention / Block forwards (both fall back when they are used).
_MASK_ARGS = ("attn_mask", "is_causal")
_STATE = "_fastvit_patch"
_log = logging.getLogger("fastvit.patch")
# timm's own activation modules (timm.layers.create_act) that equal an ops.linear epilogue.
_TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}
_TIMM_ACTIVATION_MODULES = {"timm.layers.activations", "timm.models.layers.activations"}


class PatchError(RuntimeError):
    """``patch_model(..., on_unsupported="raise")`` found modules it cannot patch; the message lists them."""


@dataclass(frozen=True)
class PatchedModule:
    """One module whose forward now runs fastvit ops."""

    path: str
    kind: str  # "attention", "mlp", "block", "norm" or "patch_embed"
    class_name: str


@dataclass(frozen=True)
class SkippedModule:
    """One module left on its original forward, and why."""

    path: str
    kind: str  # as PatchedModule.kind, or "model" when the whole model was left stock
    class_name: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`patch_model` did. ``print(report)`` shows a short table.

    Attributes:
        patched: the patched modules (path, kind, class name), in ``named_modules`` order.
        skipped: the candidate modules left unpatched, each with its reason.
        backend: the backend the patched forwards pass to the ops (None: auto).
    """

    patched: list[PatchedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    backend: Optional[str] = None

    @property
    def num_patched(self) -> int:
        return len(self.patched)

    def counts(self) -> dict[str, int]:
        """Patched modules per kind."""
        out: dict[str, int] = {}
        for p in self.patched:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [
            f"fastvit.patch_model: {self.num_patched} modules patched, {len(self.skipped)} skipped "
            f"(backend: {self.backend or 'auto'})",
            f"  {'kind':<12} {'patched':>7} {'skipped':>7}",
        ]
        skipped_counts: dict[str, int] = {}
        for s in self.skipped:
            skipped_counts[s.kind] = skipped_counts.get(s.kind, 0) + 1
        for kind in _KINDS:
            n, m = self.counts().get(kind, 0), skipped_counts.get(kind, 0)
            if n or m:
                lines.append(f"  {kind:<12} {n:>7} {m:>7}")
        if self.skipped:
            lines.append("  skipped:")
            for s in self.skipped:
                lines.append(f"    {s.path or '<root>'} ({s.class_name}): {s.reason}")
        return "\n".join(lines)


_KINDS = ("attention", "mlp", "block", "norm", "patch_embed")


@dataclass
class _PatchState:
    """Kept on a patched module (``module._fastvit_patch``): how to run it and what to restore.

    Holds no bound method (only module-level functions and plain values), so a patched model pickles, loads
    in a fresh process and deep-copies with its state intact.
    """

    kind: str
    backend: Optional[str]
    saved_forward: Any = None  # the instance-level forward that was there before, or None (the class's)
    activation: Optional[str] = None  # Mlp: the fused activation name
    fuse_norm2: bool = False  # Block: add the first residual inside norm2
    # Attention: the scale frozen at patch time as repr(float); None = the ops' default head_dim ** -0.5. A str
    # because torch.compile turns a float attribute symbolic on recompile (a second model with another scale),
    # which the ops' finite-scale check cannot take, while float(str) folds to a guarded constant.
    scale_repr: Optional[str] = None


class _PatchedForward:
    """``func`` bound to ``module`` like a method, but picklable and deep-copyable: it reduces to
    (func, module), and ``func`` is a module-level function found by name on load."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Callable[..., Any], module: nn.Module):
        self.__func__ = func
        self.__self__ = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return _PatchedForward, (self.__func__, self.__self__)

    def __repr__(self) -> str:
        return f"<fastvit patched forward {self.__func__.__name__} of {type(self.__self__).__name__}>"


def _original(module: nn.Module) -> Callable[..., Any]:
    """The forward a patched module runs on fallback calls: the one it had before patching."""
    state: _PatchState = module._fastvit_patch
    if state.saved_forward is not None:
        return state.saved_forward
    return types.MethodType(type(module).forward, module)


# ------------------------------------------------------------------------------------ helpers


def _defined_in(module: nn.Module, name: str, where: set[str]) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ in where


def _is_plain(module: nn.Module, base: type) -> bool:
    """``module`` runs ``base.forward`` (nn.Linear / nn.Conv2d, no subclass with its own math such as LoRA)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _mask_args_used(args: tuple, kwargs: dict) -> bool:
    """Whether a forward(x, attn_mask=None, is_causal=False) call asked for anything beyond plain attention."""
    if not args and not kwargs:
        return False
    if any(k not in _MASK_ARGS for k in kwargs):
        return True
    mask = args[0] if len(args) > 0 else kwargs.get("attn_mask")
    causal = args[1] if len(args) > 1 else kwargs.get("is_causal", False)
    return mask is not None or bool(causal) or len(args) > 2


def _signature_reason(module: nn.Module) -> Optional[str]:
    """None when ``forward`` takes (x) plus at most timm's attn_mask / is_causal."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[2:]  # self, x
    except (TypeError, ValueError):
        return "its forward signature cannot be inspected"
    extra = [p.name for p in params if p.name not in _MASK_ARGS]
    if extra:
        return f"forward takes arguments the fused path does not know ({', '.join(extra)})"
    return None


def _plain_layer_norm(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm or _defined_in(module, "LayerNorm", _TIMM_NORM)


def _norm_reason(module: nn.Module) -> Optional[str]:
    if not _plain_layer_norm(module):
        return (
            f"{type(module).__name__} is not nn.LayerNorm / timm.layers.LayerNorm (other math, dtype or "
            "channels-first layout)"
        )
    if len(module.normalized_shape) != 1:
        return f"normalises over {tuple(module.normalized_shape)}; the op normalises the last dimension only"
    if module.weight is None:
        return "elementwise_affine=False (the op needs a weight)"
    return None


def _attention_reason(module: nn.Module) -> Optional[str]:
    for name in ("qkv", "proj", "attn_drop", "proj_drop"):
        if not isinstance(getattr(module, name, None), nn.Module):
            return f"no {name} submodule (not timm's ViT attention layout)"
    if not _is_plain(module.qkv, nn.Linear) or not _is_plain(module.proj, nn.Linear):
        return "qkv / proj are not plain nn.Linear (e.g. a LoRA or quantized wrapper)"
    heads = getattr(module, "num_heads", None)
    if not isinstance(heads, int) or module.qkv.out_features % (3 * heads):
        return f"qkv width {module.qkv.out_features} is not 3 * num_heads * head_dim"
    head_dim = getattr(module, "head_dim", module.qkv.out_features // (3 * heads))
    if head_dim * heads * 3 != module.qkv.out_features:
        return f"head_dim {head_dim} does not match the qkv width {module.qkv.out_features}"
    gate = getattr(module, "gate", None)
    if gate is not None and not _is_plain(gate, nn.Linear):
        return "the attention gate is not a plain nn.Linear"
    return _signature_reason(module)


def _explicit_scale(module: nn.Module) -> Optional[str]:
    """repr of the attention's scale, or None when it is the ops' default head_dim ** -0.5 (see _PatchState)."""
    heads = module.num_heads
    head_dim = getattr(module, "head_dim", module.qkv.out_features // (3 * heads))
    scale = getattr(module, "scale", None)
    if scale is None or float(scale) == head_dim**-0.5:
        return None
    return repr(float(scale))


def _activation_name(act: nn.Module) -> Optional[str]:
    """The ``ops.linear`` epilogue equal to ``act``: torch's GELU modules (via the layers' helper) and timm's."""
    name = fused_activation_name(act)
    if name is None and type(act).__module__ in _TIMM_ACTIVATION_MODULES:
        name = _TIMM_ACTIVATIONS.get(type(act).__name__)
    return name


def _mlp_reason(module: nn.Module) -> Optional[str]:
    for name in ("fc1", "act", "drop1", "fc2", "drop2"):
        if not isinstance(getattr(module, name, None), nn.Module):
            return f"no {name} submodule (not timm's Mlp layout)"
    if not _is_plain(module.fc1, nn.Linear) or not _is_plain(module.fc2, nn.Linear):
        return "fc1 / fc2 are not plain nn.Linear (use_conv=True or a wrapper)"
    if _activation_name(module.act) is None:
        return (
            f"activation {type(module.act).__name__} has no fused epilogue (supported: nn.GELU erf / tanh, QuickGELU)"
        )
    return None


def _block_reason(module: nn.Module) -> Optional[str]:
    for name in ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"):
        if not isinstance(getattr(module, name, None), nn.Module):
            return f"no {name} submodule (not timm's pre-norm ViT Block)"
    return _signature_reason(module)


def _conv_patch(conv: nn.Module) -> Optional[int]:
    """The patch size p when ``conv`` is a plain Conv2d with kernel = stride = p (square), else None."""
    if not _is_plain(conv, nn.Conv2d):
        return None
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if k != s or k[0] != k[1] or conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        return None
    if conv.padding_mode != "zeros" or (isinstance(conv.padding, str) and conv.padding != "valid"):
        return None
    if not isinstance(conv.padding, str) and tuple(conv.padding) != (0, 0):
        return None
    return int(k[0])


def _output_layout(module: nn.Module) -> Optional[str]:
    if getattr(module, "flatten", False):
        return "NLC"
    fmt = getattr(module, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)
    return "NHWC" if fmt == "NHWC" else None


def _patch_embed_reason(module: nn.Module) -> Optional[str]:
    if _conv_patch(getattr(module, "proj", None)) is None:
        return "proj is not a plain Conv2d with kernel = stride (square, no padding, groups 1)"
    if _output_layout(module) is None:
        return "output format is NCHW (flatten=False); the op produces tokens"
    return None


# ------------------------------------------------------------------------------- patched forwards


# Input dtypes the fused kernels serve; any other (float64, ...) runs the original forward.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_logged_fallbacks: set[tuple[str, str]] = set()


def _falls_back(module: nn.Module, x: Any, *skipped: Optional[nn.Module]) -> bool:
    """Whether this call runs the module's original forward instead of the fused path.

    It does under FX symbolic tracing (the graph then records timm's own, traceable math), for an input
    dtype the kernels do not serve (logged once per class and dtype, with the reason), and when one of the
    ``skipped`` submodules, which the fused path never calls, carries hooks.
    """
    if fx_symbolic_tracing():
        return True
    if isinstance(x, Tensor) and x.dtype not in _KERNEL_DTYPES:
        key = (type(module).__name__, str(x.dtype))
        if key not in _logged_fallbacks:
            _logged_fallbacks.add(key)
            _log.warning(
                "fastvit.patch: %s runs its original forward for %s input: the fused kernels serve %s only "
                "(cast the model and inputs to one of those for the fused path)",
                key[0], key[1], ", ".join(str(d).replace("torch.", "") for d in _KERNEL_DTYPES),
            )  # fmt: skip
        return True
    return _hooked(*skipped)


def _attention_forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    state: _PatchState = self._fastvit_patch
    sub = self._modules  # a dict lookup each, not nn.Module.__getattr__ (host cost; see fastvit.layers.fused)
    if _mask_args_used(args, kwargs) or _falls_back(
        self, x, sub["qkv"], sub["proj"], sub["attn_drop"], sub.get("gate")
    ):
        return _original(self)(x, *args, **kwargs)
    scale = None if state.scale_repr is None else float(state.scale_repr)
    return fused.attention(self, x, scale=scale, backend=state.backend)


def _mlp_plan(mlp: nn.Module) -> fused.MlpPlan:
    """(activation, backend) when ``mlp`` is a patched Mlp whose fused forward is bound, else None."""
    state = mlp.__dict__.get(_STATE)  # a dict lookup: a miss through nn.Module.__getattr__ raises inside
    if state is None or state.kind != "mlp" or mlp.__dict__.get("forward") is None:
        return None
    return (state.activation, state.backend)


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    sub = self._modules
    if _falls_back(self, x, sub["fc1"], sub["act"], sub["fc2"]):
        return _original(self)(x)
    state: _PatchState = self._fastvit_patch
    return fused.mlp(self, x, state.activation, backend=state.backend)


def _block_forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    if _mask_args_used(args, kwargs) or _falls_back(self, x):
        return _original(self)(x, *args, **kwargs)
    state: _PatchState = self._fastvit_patch
    sub = self._modules
    return fused.block(
        self, x, fuse_norm2=state.fuse_norm2, mlp_plan=_mlp_plan(sub["mlp"]), backend=state.backend,
        direct=_block_direct(sub["norm1"], sub["attn"]),
    )  # fmt: skip


def _block_direct(norm1: nn.Module, attn: nn.Module) -> Optional[tuple[Optional[str], Optional[float], Optional[str]]]:
    """``fused.block``'s ``direct``: when norm1 and attn are patched (their fused forwards bound), unwatched,
    and attn runs the packed path, (norm1's backend, attn's scale, attn's backend); else None (the block
    calls them as modules)."""
    f1, fa = norm1.__dict__.get("forward"), attn.__dict__.get("forward")
    if f1.__class__ is not _PatchedForward or f1.__func__ is not _layer_norm_forward or not fused.bare(norm1):
        return None
    if fa.__class__ is not _PatchedForward or fa.__func__ is not _attention_forward:
        return None
    if not fused.packed_rows_ready(attn):
        return None
    state: _PatchState = attn.__dict__[_STATE]
    scale = None if state.scale_repr is None else float(state.scale_repr)
    return (norm1.__dict__[_STATE].backend, scale, state.backend)


def _layer_norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    if _falls_back(self, x):
        return _original(self)(x)
    return fused.layer_norm(self, x, backend=self._fastvit_patch.backend)


def _embed_tokens(module: nn.Module, x: Tensor) -> Tensor:
    """Shared by PatchEmbed and HybridEmbed: (B, C, H, W) features -> NLC or NHWC tokens via the op."""
    state: _PatchState = module._fastvit_patch
    conv = module.proj
    p = conv.kernel_size[0]
    pad = bool(getattr(module, "dynamic_img_pad", False))
    H, W = x.shape[-2:]
    if not pad and (H % p or W % p):
        x = x[..., : H - H % p, : W - W % p]  # a k = s conv ignores the remainder rows/columns
    tokens = fused.patch_embed(module, x, backend=state.backend)
    if _output_layout(module) == "NHWC":
        tokens = tokens.view(x.shape[0], *patch_grid(x.shape[-2], x.shape[-1], p), tokens.shape[-1])
    return tokens


def _check_patch_embed_size(module: nn.Module, x: Tensor) -> None:
    """timm PatchEmbed's own input checks (same conditions, same AssertionError)."""
    _, _, H, W = x.shape
    img_size = getattr(module, "img_size", None)
    if img_size is None:
        return
    ph, pw = module.patch_size
    if getattr(module, "strict_img_size", True):
        torch._assert(H == img_size[0], f"Input height ({H}) doesn't match model ({img_size[0]}).")
        torch._assert(W == img_size[1], f"Input width ({W}) doesn't match model ({img_size[1]}).")
    elif not getattr(module, "dynamic_img_pad", False):
        torch._assert(H % ph == 0, f"Input height ({H}) should be divisible by patch size ({ph}).")
        torch._assert(W % pw == 0, f"Input width ({W}) should be divisible by patch size ({pw}).")


def _patch_embed_forward(self: nn.Module, x: Tensor) -> Tensor:
    if _falls_back(self, x, self.proj):
        return _original(self)(x)
    _check_patch_embed_size(self, x)
    return self.norm(_embed_tokens(self, x))


def _hybrid_embed_forward(self: nn.Module, x: Tensor) -> Tensor:
    if _falls_back(self, x, self.proj):
        return _original(self)(x)
    x = self.backbone(x)
    if isinstance(x, (list, tuple)):
        x = x[-1]  # timm takes the last feature map of a multi-output backbone
    return _embed_tokens(self, x)


# --------------------------------------------------------------------------------- classification


@dataclass
class _Candidate:
    kind: str
    forward: Optional[Callable[..., Any]]  # None: unsupported
    reason: Optional[str] = None


def _classify(module: nn.Module) -> Optional[_Candidate]:
    """What :func:`patch_model` makes of ``module``: a patchable kind, an unsupported candidate, or None."""
    cls = type(module)
    if cls.__module__.startswith("fastvit."):
        return None  # fastvit's own layers already run the ops
    name = cls.__name__
    if _defined_in(module, "Attention", _TIMM_ATTENTION):
        reason = _attention_reason(module)
        return _Candidate("attention", None if reason else _attention_forward, reason)
    if _defined_in(module, "Mlp", _TIMM_MLP):
        reason = _mlp_reason(module)
        return _Candidate("mlp", None if reason else _mlp_forward, reason)
    if _defined_in(module, "Block", _TIMM_BLOCK):
        reason = _block_reason(module)
        return _Candidate("block", None if reason else _block_forward, reason)
    if _defined_in(module, "PatchEmbed", _TIMM_PATCH_EMBED):
        reason = _patch_embed_reason(module)
        return _Candidate("patch_embed", None if reason else _patch_embed_forward, reason)
    if _defined_in(module, "HybridEmbed", _TIMM_HYBRID_EMBED):
        reason = _patch_embed_reason(module)
        return _Candidate("patch_embed", None if reason else _hybrid_embed_forward, reason)
    if isinstance(module, nn.LayerNorm) or "LayerNorm" in name:
        reason = (
            _norm_reason(module)
            if isinstance(module, nn.LayerNorm)
            else (f"{name} is not nn.LayerNorm / timm.layers.LayerNorm")
        )
        return _Candidate("norm", None if reason else _layer_norm_forward, reason)
    # Look-alikes with other math: named in the report so nobody assumes they run the kernels.
    if "Attention" in name or name.endswith("Attn"):
        return _Candidate(
            "attention",
            None,
            f"{name} is not timm's ViT Attention (other math: rotary, pooling, relative position, ...)",
        )
    if ("Mlp" in name or "GLU" in name) and hasattr(module, "fc1"):
        return _Candidate("mlp", None, f"{name} is not timm's Mlp (gated / packed MLP)")
    if name.endswith("Block") and (cls.__module__.startswith("timm.") or hasattr(module, "attn")):
        return _Candidate("block", None, f"{name} is not timm's pre-norm ViT Block (other residual structure)")
    if "PatchEmbed" in name or (name.endswith("Embed") and hasattr(module, "proj")):
        return _Candidate("patch_embed", None, f"{name} is not timm's PatchEmbed / HybridEmbed")
    return None


def _refuse_scripting(module: nn.Module) -> nn.Module:
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on every submodule first: a patched one stops it."""
    raise PatchError(
        f"fastvit: torch.jit.script cannot compile a patched model ({type(module).__name__} runs fastvit's "
        "fused forward, bound on the instance). Unpatch first: fastvit.unpatch_model(model), then script it "
        "(or script a stock copy); torch.compile and torch.export take the patched model as it is"
    )


def _bind(module: nn.Module, state: _PatchState, fn: Callable[..., Any]) -> None:
    module.__dict__[_STATE] = state
    module.__dict__["forward"] = _PatchedForward(fn, module)
    module.__dict__["__prepare_scriptable__"] = _PatchedForward(_refuse_scripting, module)


def _restore(module: nn.Module) -> bool:
    state = module.__dict__.pop(_STATE, None)
    if state is None:
        return False
    module.__dict__.pop("__prepare_scriptable__", None)
    if state.saved_forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = state.saved_forward
    return True


def _scripting_reason() -> Optional[str]:
    """Why the whole model must stay stock: TorchScript cannot compile instance-bound forwards."""
    try:
        from timm.layers import is_scriptable
    except ImportError:  # timm absent or too old for layer config: nothing asked for scripting
        return None
    if is_scriptable():
        return (
            "timm's scriptable mode is on (timm.layers.set_layer_config(scriptable=True)); TorchScript cannot "
            "compile the patched forwards: script the stock model, or use torch.compile / torch.export"
        )
    return None


# ------------------------------------------------------------------------------------ public API


def patch_model(
    model: nn.Module,
    *,
    attention: bool = True,
    mlp: bool = True,
    norm: bool = True,
    patch_embed: bool = True,
    backend: Optional[str] = None,
    on_unsupported: str = "fallback",
) -> PatchReport:
    """Swaps fastvit's fused ops into a timm ViT-family model, in place (see the module docstring).

    Idempotent: patching a patched model re-binds with the new options (e.g. another backend) and
    reports the same modules.

    Args:
        model: any module tree built from timm's ViT ``Attention``, ``Mlp``, ``Block``, ``LayerNorm``,
            ``PatchEmbed`` / ``HybridEmbed`` (vit_*, deit_* incl. distilled and deit3, the R50 / R26
            hybrids, CLIP / SigLIP towers, ...). fastvit's own models already run the ops and are left alone.
        attention: patch ``Attention``.
        mlp: patch ``Mlp`` (and fuse the block's second residual into fc2).
        norm: patch ``LayerNorm`` (and fuse the block's first residual into norm2).
        patch_embed: patch ``PatchEmbed`` / ``HybridEmbed``'s projection.
        backend: passed to every op: None (``FASTVIT_BACKEND`` or auto), "torch", "triton" or "cuda".
        on_unsupported: "fallback" leaves unsupported candidates on their original forward and lists
            them in the report; "raise" raises :class:`PatchError` listing them and patches nothing.

    Returns:
        A :class:`PatchReport` (``print`` it for a table; ``.patched``, ``.skipped``, ``.num_patched``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``backend`` or ``on_unsupported``.
        PatchError: ``on_unsupported="raise"`` and some candidate module cannot be patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastvit.patch_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fastvit.patch_model: backend must be None or one of {BACKENDS}, got {backend!r}")
    if on_unsupported not in ("fallback", "raise"):
        raise ValueError(f"fastvit.patch_model: on_unsupported must be 'fallback' or 'raise', got {on_unsupported!r}")
    wanted = {"attention": attention, "mlp": mlp, "block": norm or mlp, "norm": norm, "patch_embed": patch_embed}
    report = PatchReport(backend=backend)
    plan: list[tuple[str, nn.Module, _Candidate]] = []
    scripting = _scripting_reason()
    if scripting is not None:
        report.skipped.append(SkippedModule("", "model", type(model).__name__, scripting))
    for path, module in model.named_modules() if scripting is None else ():
        cand = _classify(module)
        if cand is None or not wanted[cand.kind]:
            continue
        if cand.forward is None:
            report.skipped.append(SkippedModule(path, cand.kind, type(module).__name__, cand.reason or ""))
        else:
            plan.append((path, module, cand))
    if report.skipped and on_unsupported == "raise":
        listing = "\n".join(f"  {s.path} ({s.class_name}): {s.reason}" for s in report.skipped)
        raise PatchError(
            f"fastvit.patch_model: {len(report.skipped)} modules cannot be patched exactly:\n{listing}\n"
            "Pass on_unsupported='fallback' to patch the rest and run these unchanged."
        )
    if report.skipped:
        _log.info("%s", report)
    for path, module, cand in plan:
        _restore(module)  # idempotence: a second call re-binds from the original state
        state = _PatchState(
            kind=cand.kind,
            backend=backend,
            saved_forward=module.__dict__.get("forward"),
        )
        if cand.kind == "attention":
            state.scale_repr = _explicit_scale(module)
        if cand.kind == "mlp":
            state.activation = _activation_name(module.act)
        if cand.kind == "block":
            state.fuse_norm2 = norm and _norm_reason(module.norm2) is None
            if not state.fuse_norm2 and not mlp:
                continue  # nothing this block could fuse with the options given
        _bind(module, state, cand.forward)
        report.patched.append(PatchedModule(path, cand.kind, type(module).__name__))
    return report


def unpatch_model(model: nn.Module) -> int:
    """Restores every forward :func:`patch_model` replaced (the original function objects).

    Args:
        model: a model patched in place (unpatched modules are left as they are).

    Returns:
        The number of modules restored.
    """
    return sum(_restore(m) for m in model.modules())


def _records_attention(module: nn.Module) -> bool:
    if isinstance(module, FastvitAttention):
        return True
    return _defined_in(module, "Attention", _TIMM_ATTENTION) and isinstance(
        getattr(module, "attn_drop", None), nn.Module
    )


@contextlib.contextmanager
def return_attention(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collects every attention layer's softmax probabilities while the block is active.

    Works on fastvit models and on timm ViTs, patched or not: each ViT attention module
    (``fastvit.layers.Attention``, timm's ``Attention``) runs its explicit path for the duration
    (``fused_attn = False``; a patched timm module falls back to its original forward) and the
    probabilities entering ``attn_drop`` are appended, detached, to the yielded list in call order: one
    (B, H, N, N) tensor per block per forward. ``fused_attn`` is restored on exit.

    Example::

        with fastvit.return_attention(model) as maps:
            logits = model(x)
        # maps[i]: block i's probabilities

    Args:
        model: the model to run.

    Raises:
        ValueError: ``model`` has no attention module of those classes.
    """
    targets = [m for m in model.modules() if _records_attention(m)]
    if not targets:
        raise ValueError(
            f"fastvit.return_attention: {type(model).__name__} has no fastvit.layers.Attention or timm ViT "
            "Attention module to read probabilities from"
        )
    maps: list[Tensor] = []

    def record(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        maps.append(inputs[0].detach())

    saved = [m.fused_attn for m in targets]
    handles = [m.attn_drop.register_forward_hook(record) for m in targets]
    try:
        for m in targets:
            m.fused_attn = False
        yield maps
    finally:
        for m, fused, handle in zip(targets, saved, handles):
            handle.remove()
            m.fused_attn = fused
            if isinstance(m, FastvitAttention):
                m.last_attn = None

"""What makes fastvit's models drop-in by timm's own definition (timm's ``tests/test_models.py``).

- :class:`TimmCfgMixin`: ``default_cfg``, timm's alias of ``pretrained_cfg``;
- :func:`pop_factory_options` / :func:`finish_model`: ``create_model(name, features_only=True, out_indices=...,
  feature_cls=..., device=..., dtype=...)`` as timm offers them (the model wrapped in timm's own
  ``FeatureGetterNet`` / ``FeatureGraphNet``, which read ``forward_intermediates`` / ``feature_info``);
- :func:`scriptable_timm_model`: in timm's scriptable mode (``timm.set_scriptable(True)`` /
  ``set_layer_config(scriptable=True)``) ``create_model`` builds what timm builds for the name, as
  ``patch_model`` leaves a model stock there: the fused ops are torch.library ops that TorchScript cannot
  compile;
- FX: the public ``fastvit.ops`` functions are registered with ``torch.fx.wrap``, so symbolic tracing records
  each op as one ``call_function`` node (the op runs as it is when the graph runs) instead of tracing into
  its input checks; the embedding layers skip their shape checks while tracing
  (``fastvit.layers.patch_embed.traced_grid``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch
from torch import nn

from fastvit import ops
from fastvit.ops.dispatch import registered_ops

__all__ = [
    "TimmCfgMixin",
    "finish_model",
    "pop_factory_options",
    "scriptable_timm_model",
]

_log = logging.getLogger("fastvit.models")

# The public ops the layers call: FX records each as a leaf call (see the module docstring). Every op-table row,
# read from the table so a new op needs no line here, plus attention_probs (a composition with no row).
_FX_LEAF_OPS = (*registered_ops(), "attention_probs")
for _name in _FX_LEAF_OPS:
    if callable(getattr(ops, _name, None)):
        # torch.fx.wrap registers a name in the calling module's globals; run it as module-level code of ops.
        exec(f"__import__('torch').fx.wrap({_name!r})", vars(ops))  # noqa: S102
del _name

_FEATURE_OPTIONS = ("features_only", "out_indices", "feature_cls", "output_fmt", "feature_cfg")
_FACTORY_OPTIONS = ("device", "dtype")


class TimmCfgMixin:
    """``default_cfg``: timm's name for ``pretrained_cfg`` (kept as an alias by timm; its tests read it)."""

    pretrained_cfg: dict[str, Any]

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg


def pop_factory_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """Removes timm's factory options (features, device, dtype) from ``overrides`` and returns them."""
    return {k: overrides.pop(k) for k in (*_FEATURE_OPTIONS, *_FACTORY_OPTIONS) if k in overrides}


@contextlib.contextmanager
def build_context(options: dict[str, Any]):
    """Builds the model's tensors directly on ``device`` (``meta`` included), as timm's factory does."""
    device = options.get("device")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        yield


def scriptable_timm_model(name: str, kwargs: dict[str, Any]) -> Optional[nn.Module]:
    """timm's own model for ``name`` (random init) when timm's scriptable mode is on, else None.

    Raises:
        RuntimeError: scriptable mode is on and timm has no model of that name (T2T-ViT, the segmentors).
    """
    try:
        import timm
        from timm.layers import is_scriptable
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if not is_scriptable():
        return None
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise RuntimeError(
            f"fastvit.create_model({name!r}): timm's scriptable mode is on, and fastvit's fused ops cannot be "
            f"compiled by TorchScript, nor does timm build {arch!r}. Use torch.compile / torch.export, or create "
            "the model outside timm.set_scriptable(True)"
        )
    _log.info("fastvit.create_model(%r): timm's scriptable mode is on, building timm's model", name)
    from timm.models._factory import create_model as timm_create_model  # the factory, never a wrapper of it

    return timm_create_model(arch, pretrained=False, **kwargs)


def finish_model(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """Applies ``dtype`` and wraps the model for ``features_only`` (timm's FeatureGetterNet by default)."""
    dtype = options.get("dtype")
    if dtype is not None:
        model = model.to(dtype=dtype)
    if not options.get("features_only", False):
        unused = [k for k in _FEATURE_OPTIONS if k in options and k != "features_only"]
        if unused:
            raise TypeError(f"fastvit.create_model: {', '.join(unused)} need features_only=True")
        return model
    if not hasattr(model, "forward_intermediates"):
        raise TypeError(
            f"fastvit.create_model: features_only=True needs forward_intermediates, which "
            f"{type(model).__name__} does not have; use its forward_features / extract_feat instead"
        )
    from timm.models._builder import pretrained_cfg_for_features
    from timm.models._features import FeatureGetterNet
    from timm.models._features_fx import FeatureGraphNet

    cfg = dict(options.get("feature_cfg") or {})
    cfg["out_indices"] = options.get("out_indices", cfg.get("out_indices", 3))  # timm's ViT default: last 3 blocks
    if "output_fmt" in options:
        cfg["output_fmt"] = options["output_fmt"]
    feature_cls = options.get("feature_cls", cfg.pop("feature_cls", "getter"))
    classes = {"getter": FeatureGetterNet, "fx": FeatureGraphNet}
    if isinstance(feature_cls, str):
        if feature_cls.lower() not in classes:
            raise ValueError(
                f"fastvit.create_model: feature_cls={feature_cls!r} is not supported for ViT models; "
                "use 'getter' (forward_intermediates, the default) or 'fx'"
            )
        feature_cls = classes[feature_cls.lower()]
    pretrained_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    wrapped = feature_cls(model, **cfg)
    wrapped.pretrained_cfg = pretrained_cfg
    wrapped.default_cfg = pretrained_cfg
    return wrapped

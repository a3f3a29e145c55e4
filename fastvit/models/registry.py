"""The model registry: timm-style entrypoints, ``create_model`` and ``list_models``.

An entrypoint is a function ``name(pretrained=False, **kwargs) -> nn.Module`` decorated with
:func:`register_model`; its ``__name__`` is the model name (timm's names, e.g. ``vit_base_patch16_224``).
Entrypoints build the architecture only. ``create_model`` owns the rest: the ``num_classes`` /
``img_size`` overrides and, for ``pretrained``, handing the model to
``fastvit.checkpoints.load_pretrained`` (which resolves weights from the local caches or a path).
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Callable, Optional, Union

from torch import nn

from fastvit.models._timm_compat import build_context, finish_model, pop_factory_options, scriptable_timm_model

__all__ = [
    "create_model",
    "is_model",
    "list_models",
    "load_weights",
    "model_entrypoint",
    "register_model",
    "register_variant",
]

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers ``fn`` under ``fn.__name__`` and returns it unchanged (use as a decorator).

    Raises:
        ValueError: another entrypoint already has that name.
    """
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(
            f"fastvit: model name {name!r} is registered twice ({_ENTRYPOINTS[name].__module__} and {fn.__module__})"
        )
    _ENTRYPOINTS[name] = fn
    return fn


def register_variant(name: str, build: Callable[..., nn.Module], doc: str, module: str) -> Callable[..., nn.Module]:
    """Registers the entrypoint ``name(pretrained=False, **kwargs)`` of one configuration of an architecture:
    the one way every model family (ViT / DeiT, the R50 hybrid, T2T-ViT, the segmentors) registers.

    ``build(**kwargs)`` builds the architecture with the caller's overrides; ``pretrained`` is honoured (or
    refused) for every family alike by :func:`load_weights`.

    Args:
        name: the model name (timm's, where timm has the model).
        build: builds the random-init model from the overrides.
        doc: the entrypoint's docstring (what the configuration is).
        module: the defining module's ``__name__``, so the entrypoint reports where it lives.
    """

    def entrypoint(pretrained: Union[bool, str, os.PathLike, None] = False, **kwargs: Any) -> nn.Module:
        return load_weights(build(**kwargs), name, pretrained)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    entrypoint.__module__ = module
    return register_model(entrypoint)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching a shell-style ``pattern`` (``"vit_*"``, ``"*distilled*"``).

    Args:
        pattern: fnmatch pattern; a name with a ``.tag`` suffix is matched on its architecture part.
    """
    pattern = pattern.split(".", 1)[0] if "." in pattern else pattern
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    """True when ``name`` (optionally with a ``.tag`` suffix) is a registered architecture."""
    return name.split(".", 1)[0] in _ENTRYPOINTS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entrypoint registered for ``name`` (a ``.tag`` suffix is ignored).

    Raises:
        ValueError: unknown name, with the closest registered names as a hint.
    """
    arch = name.split(".", 1)[0]
    if arch not in _ENTRYPOINTS:
        import difflib

        close = difflib.get_close_matches(arch, list(_ENTRYPOINTS), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"fastvit: unknown model {name!r}.{hint} See fastvit.list_models() for all {len(_ENTRYPOINTS)} names."
        )
    return _ENTRYPOINTS[arch]


def _tag_num_classes(name: str) -> Optional[int]:
    """The class count of the weights ``name``'s ``.tag`` picks (``vit_base_patch16_224.augreg_in21k``: 21843),
    or None when no pretrained config says."""
    from fastvit.checkpoints.pretrained import pretrained_cfg_for  # lazy: fastvit.checkpoints imports the models

    num_classes = (pretrained_cfg_for(name) or {}).get("num_classes")
    return None if num_classes is None else int(num_classes)


def create_model(
    name: str,
    pretrained: Union[bool, str, os.PathLike] = False,
    num_classes: Optional[int] = None,
    img_size: Optional[Union[int, tuple[int, int]]] = None,
    **overrides: Any,
) -> nn.Module:
    """Builds a registered model, optionally with pretrained weights.

    Args:
        name: a registered name (``fastvit.list_models()``), optionally with a timm pretrained tag
            (``"vit_base_patch16_224.orig_in21k_ft_in1k"``); the tag selects weights (and, as in timm, the
            default ``num_classes``).
        pretrained: False (random init), True (weights for ``name`` from the local timm / Hugging Face
            cache; an error names the file looked for when none is cached) or a checkpoint path
            (any format ``fastvit.load_checkpoint`` reads).
        num_classes: classifier size; 0 builds no head. None keeps timm's default for the name: the class
            count of its default weights (1000 for most; 0 for ``vit_huge_patch14_224``,
            ``vit_large_patch32_224`` and ``vit_base_r50_s16_224``, whose default weights are in21k
            feature extractors), or with a ``.tag`` that tag's weights' count (21843 for ``.augreg_in21k``).
        img_size: input resolution the position embedding is built for. None keeps the default.
        **overrides: further constructor arguments of the architecture (``drop_path_rate=0.1``,
            ``global_pool="avg"``, ``dynamic_img_size=True``, ...), and timm's factory options:
            ``features_only=True`` (with ``out_indices``, ``feature_cls="getter" | "fx"``, ``output_fmt``)
            returns timm's feature wrapper around the model; ``device`` / ``dtype`` place the tensors (built
            directly on ``device``, ``"meta"`` included). In timm's scriptable mode the model is timm's own
            (see ``fastvit.models._timm_compat``).

    Returns:
        The model in train mode (like timm); call ``.eval()`` for inference.

    Raises:
        ValueError: unknown name.
        TypeError: an override the architecture does not accept.
        FileNotFoundError / RuntimeError: from the weight loader when ``pretrained`` cannot be honoured.
    """
    entrypoint = model_entrypoint(name)
    kwargs = dict(overrides)
    factory_options = pop_factory_options(kwargs)
    if num_classes is None and "." in name:
        num_classes = _tag_num_classes(name)  # timm: the tag's weights set the default head size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    check_pretrained(name, pretrained)  # a bad value fails before the (possibly large) model is built
    with build_context(factory_options):
        model = scriptable_timm_model(name, kwargs) or entrypoint(**kwargs)
    model = load_weights(model, name, pretrained)
    return finish_model(model, factory_options)


def check_pretrained(name: str, pretrained: Any) -> None:
    """TypeError unless ``pretrained`` is a bool, None or a checkpoint path."""
    if pretrained is None or isinstance(pretrained, (bool, str, os.PathLike)):
        return
    raise TypeError(
        f"fastvit.create_model({name!r}): pretrained must be True, False or a checkpoint path, "
        f"got {type(pretrained).__name__}"
    )


def load_weights(model: nn.Module, name: str, pretrained: Union[bool, str, os.PathLike, None]) -> nn.Module:
    """What every entrypoint does with its ``pretrained=`` argument: nothing for False / None, else the
    weights through ``fastvit.checkpoints.load_pretrained`` (True: the local cache, or a path), which raises
    when they cannot be found or do not fit, so ``pretrained=True`` never returns random weights."""
    check_pretrained(name, pretrained)
    if pretrained is False or pretrained is None:
        return model
    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    from fastvit.checkpoints import load_pretrained

    return load_pretrained(model, name, pretrained)

"""Loading a checkpoint into a model: position-embedding resampling by the source's convention, classifier
and input-channel adaptation, strict key checks (:func:`load_checkpoint`, :func:`load_pretrained`)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from fastvit.checkpoints._common import CheckpointError, StateDict, shorten
from fastvit.checkpoints.pretrained import (
    pretrained_cfg_for,
    resolve_pretrained_file,
)
from fastvit.checkpoints.reader import PathLike, _describe_keys, _log, read_checkpoint
from fastvit.layers.pos_embed import resample_abs_pos_embed

# How each source resamples a position embedding to another grid (fastvit.layers.pos_embed conventions):
# timm / DeiT bicubic with antialias; Google npz bilinear; mmseg / mmpretrain / official T2T bicubic
# without antialias. jeonsworld only resamples when reading Google npz files (scipy zoom, order 1): its
# .bin files get the npz convention.
_RESAMPLE: dict[str, str] = {
    "npz": "npz",
    "timm": "timm",
    "deit": "timm",
    "t2t_official": "mmpretrain",
    "mmpretrain": "mmpretrain",
    "mmseg": "mmseg",
    "vit_pytorch": "npz",
}

# How Google's ViT weights (and jeonsworld fine-tunes of them) expect images: resized to the square
# input without a crop, scaled to [-1, 1] (google-research/vision_transformer#39).
GOOGLE_PREPROCESSING: dict[str, Any] = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "squash",
    "interpolation": "bilinear",
}
_PREPROCESSING = {"npz": GOOGLE_PREPROCESSING, "vit_pytorch": GOOGLE_PREPROCESSING}


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did. With ``strict=True`` the three key lists are empty."""

    format: str
    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[str]
    ignored_keys: list[str]
    reset_classifier_keys: list[str]
    resampled_pos_embed: bool


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(names, str):
        return (names,)
    return tuple(names) if names else ("head", "head_dist")


def _num_prefix_tokens(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> int:
    if getattr(model, "no_embed_class", False):
        return 0
    if isinstance(getattr(model, "num_prefix_tokens", None), int):
        return model.num_prefix_tokens
    count = sum(1 for k in ("cls_token", "dist_token") if k in sd)
    return count + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)


def _grid(model: nn.Module, num_tokens: int) -> Optional[tuple[int, int]]:
    # The token grid lives on patch_embed (ViT, hybrid) or tokens_to_token (T2T-ViT).
    for embed in ("patch_embed", "tokens_to_token"):
        grid = getattr(getattr(model, embed, None), "grid_size", None)
        if grid is not None and len(grid) == 2 and grid[0] * grid[1] == num_tokens:
            return int(grid[0]), int(grid[1])
    side = int(round(num_tokens**0.5))
    return (side, side) if side * side == num_tokens else None


def _fit_pos_embed(
    model: nn.Module,
    sd: StateDict,
    target: Mapping[str, torch.Tensor],
    interp: str,
    source: str,
    old_grid: Optional[tuple[int, int]] = None,
) -> bool:
    have, want = sd.get("pos_embed"), target.get("pos_embed")
    if have is None or want is None or have.shape == want.shape:
        return False
    if have.ndim != 3 or want.ndim != 3 or have.shape[-1] != want.shape[-1]:
        return False  # another architecture: reported as a shape mismatch
    prefix = _num_prefix_tokens(model, sd)
    new_grid = _grid(model, want.shape[1] - prefix)
    if new_grid is None:
        return False
    rows = have.shape[1] - prefix
    if old_grid is not None and not (
        isinstance(old_grid, (tuple, list))
        and len(old_grid) == 2
        and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in old_grid)
    ):
        raise TypeError(f"pos_embed_grid must be an (h, w) pair of positive ints, got {old_grid!r}")
    if old_grid is None:
        side = int(round(rows**0.5))
        if side * side != rows:
            raise CheckpointError(
                f"{source}: pos_embed {tuple(have.shape)} holds {rows} grid positions (+{prefix} prefix), not a square "
                f"grid, so the grid it was trained on is unknown and it cannot be resampled to the model's "
                f"{new_grid[0]}x{new_grid[1]}. Pass pos_embed_grid=(h, w) with h*w={rows} (the checkpoint's grid)"
            )
        old_grid = (side, side)
    elif old_grid[0] * old_grid[1] != rows:
        raise CheckpointError(
            f"{source}: pos_embed_grid={tuple(old_grid)} has {old_grid[0] * old_grid[1]} positions but the "
            f"checkpoint's pos_embed {tuple(have.shape)} holds {rows} (+{prefix} prefix): pass the grid it was "
            "trained on"
        )
    sd["pos_embed"] = resample_abs_pos_embed(have, new_grid, old_grid, num_prefix_tokens=prefix, interp=interp)
    return True


def check_dtypes(source: str, sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> None:
    """Integer, bool or complex tensors for floating-point parameters would be cast without a word: refuse."""

    def wrong(have: torch.Tensor, want: torch.Tensor) -> bool:
        if have.is_complex():
            return not want.is_complex()
        return want.is_floating_point() and not have.is_floating_point()

    bad = [f"{k}: {sd[k].dtype} for {target[k].dtype}" for k in sorted(sd) if k in target and wrong(sd[k], target[k])]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensors are not floating point where the model's parameters are "
            f"{shorten(bad, limit=6)}; casting would change their values. The file is not a checkpoint of these "
            "weights (or was damaged): convert those tensors yourself if they really are weights"
        )


def _check_loaded_enough(source: str, loaded: int, target: Mapping[str, torch.Tensor], missing: list[str]) -> None:
    """``strict=False`` that loaded nothing is an error; loading under half of the model's tensors warns."""
    total = len(target)
    if total and loaded == 0:
        raise CheckpointError(
            f"{source}: strict=False loaded 0 of the model's {total} tensors (missing {_describe_keys(missing)}): "
            "the checkpoint is for another model or another key layout; check the model name and format="
        )
    if total and loaded * 2 < total:
        warnings.warn(
            f"{source}: strict=False loaded only {loaded} of the model's {total} tensors; the other "
            f"{len(missing)} keep their random init (missing {_describe_keys(missing)})",
            stacklevel=3,
        )


def _fit_input_channels(model: nn.Module, sd: StateDict, target: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Adapt the first conv of another input-channel count (timm's ``adapt_input_conv``); return its key."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    key = f"{cfg.get('first_conv') or 'patch_embed.proj'}.weight"
    have, want = sd.get(key), target.get(key)
    if have is None or want is None or have.ndim != 4 or have.shape[1] == want.shape[1]:
        return None
    if (have.shape[0], *have.shape[2:]) != (want.shape[0], *want.shape[2:]):
        return None  # another architecture: reported as a shape mismatch
    from timm.models import adapt_input_conv

    sd[key] = adapt_input_conv(want.shape[1], have)
    return key


def _set_preprocessing(model: nn.Module, values: Mapping[str, Any]) -> None:
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = dict(cfg) if isinstance(cfg, Mapping) else {}
    cfg.update(values)
    model.pretrained_cfg = cfg


def load_checkpoint(
    model: nn.Module,
    path: Union[PathLike, Mapping[str, Any]],
    format: str = "auto",
    strict: bool = True,
    *,
    use_ema: bool = True,
    adapt_classifier: bool = False,
    adapt_input_channels: bool = False,
    pos_embed_grid: Optional[tuple[int, int]] = None,
) -> LoadResult:
    """Load a checkpoint of any supported format into ``model``.

    Args:
        model: a fastvit model (or a timm ViT: the names are the same).
        path: checkpoint file (``.npz``, ``.pth``, ``.pth.tar``, ``.bin``, ``.safetensors``) or a loaded dict.
        format: ``"auto"`` to sniff it, or a key of :data:`FORMATS`.
        strict: raise :class:`CheckpointError` on any missing, unexpected or mis-shaped key (default).
            With ``False`` the matching keys are loaded and the rest reported in the result.
        use_ema: prefer ``state_dict_ema`` when a training checkpoint has both.
        adapt_classifier: a classifier (``head`` / ``head_dist``) whose shape differs from the model's is
            skipped and the model keeps its own (as ``create_model(..., pretrained=True, num_classes=K)``
            does); all other keys stay strict.
        adapt_input_channels: a first conv (``pretrained_cfg['first_conv']``, default ``patch_embed.proj``)
            trained for another number of input channels is adapted as timm does (summed for 1 channel,
            tiled and rescaled otherwise), for models built with ``in_chans != 3``.
        pos_embed_grid: the (h, w) token grid the checkpoint's position table was trained on, needed to
            resample a table from a non-square grid (without it the grid is assumed square, and a row count
            that is not a square is refused).

    Returns:
        A :class:`LoadResult`. A position embedding of another grid is resampled the way its source
        does, and a fastvit model's ``pos_embed_interp`` is set to that convention for later
        resampling (``dynamic_img_size``). Google ``.npz`` and jeonsworld weights also set the model's
        ``pretrained_cfg`` preprocessing to Google's (resize without crop, mean = std = 0.5), which
        :func:`fastvit.inference_model` uses.

    Raises:
        CheckpointError: unreadable / truncated / corrupt (CRC) / unknown file, a forced ``format`` its keys
            contradict, non-float tensors for float parameters, keys that do not fit the model, or
            ``strict=False`` that loaded none of the model's tensors (under half only warns).
        FileNotFoundError: ``path`` does not exist.
    """
    ckpt = read_checkpoint(path, format, use_ema=use_ema)
    sd = dict(ckpt.state_dict)
    target = model.state_dict()
    check_dtypes(ckpt.source, sd, target)
    resampled = _fit_pos_embed(model, sd, target, _RESAMPLE[ckpt.format], ckpt.source, pos_embed_grid)
    if adapt_input_channels:
        _fit_input_channels(model, sd, target)

    reset: list[str] = []
    classifiers = _classifier_names(model)

    def in_classifier(key: str) -> bool:
        return key.split(".", 1)[0] in classifiers

    if adapt_classifier:
        for name in classifiers:
            theirs = [k for k in sd if k.split(".", 1)[0] == name]
            if any(k not in target or target[k].shape != sd[k].shape for k in theirs):
                for k in theirs:
                    del sd[k]
        reset = sorted(k for k in target if in_classifier(k) and k not in sd)
        if reset:
            _log.info(
                "%s: classifier keys %s not loaded (another size or absent); they keep the model's init",
                ckpt.source,
                reset,
            )

    missing = [k for k in target if k not in sd and k not in reset]
    unexpected = [k for k in sd if k not in target]
    mismatched = [k for k in sd if k in target and sd[k].shape != target[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys {_describe_keys(unexpected)}")
        if mismatched:
            shapes = [
                f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in sorted(mismatched)
            ]
            parts.append(f"{len(mismatched)} shape mismatches {shorten(shapes, limit=6)}")
        hint = "Check that the model matches the checkpoint (name, img_size, num_classes)"
        head_sizes = [k for k in mismatched if in_classifier(k)]
        if head_sizes and len(head_sizes) == len(mismatched) and not missing and not unexpected:
            k = head_sizes[0]
            hint = (
                f"The classifier differs ({k}: {tuple(sd[k].shape)} vs {tuple(target[k].shape)}): create the model "
                f"with num_classes={sd[k].shape[0]}, or pass adapt_classifier=True to keep the model's own head"
            )
        raise CheckpointError(
            f"{ckpt.source}: {ckpt.description}; it does not fit {type(model).__name__}: "
            + "; ".join(parts)
            + f". {hint}, or pass strict=False to load only the matching keys."
        )
    loadable = {k: v for k, v in sd.items() if k in target and k not in mismatched}
    if not strict:
        _check_loaded_enough(ckpt.source, len(loadable), target, missing + mismatched)
    model.load_state_dict(loadable, strict=False)
    if ckpt.format in _PREPROCESSING:
        _set_preprocessing(model, _PREPROCESSING[ckpt.format])
    if hasattr(model, "pos_embed_interp"):
        # fastvit models resample on the fly (dynamic_img_size, set_input_size) the way the weights' source does.
        model.pos_embed_interp = _RESAMPLE[ckpt.format]
    return LoadResult(ckpt.format, missing, unexpected, mismatched, ckpt.ignored, reset, resampled)


def load_pretrained(model: nn.Module, name: str, pretrained: Union[bool, PathLike, None]) -> nn.Module:
    """Load the weights ``create_model(name, pretrained=...)`` asks for into ``model`` and return it.

    Args:
        model: the freshly built model.
        name: the model name (``arch`` or ``arch.tag``), used to find the published weights.
        pretrained: ``False`` / ``None`` (nothing to do), ``True`` (the published weights from the local
            timm / Hugging Face / torch-hub cache; never downloaded) or a checkpoint path of any format.
            A path goes to the model's own ``model.load_pretrained(path)`` when it has one (segmentors).

    A classifier of another size than the checkpoint's (``num_classes=K``) keeps its fresh init, a
    position embedding of another grid (``img_size=...``) is resampled and the first conv is adapted
    to ``in_chans``; every other key is strict.
    ``model.pretrained_cfg`` records the weights' preprocessing.

    Raises:
        PretrainedWeightsNotFound: ``pretrained=True`` and no cached file exists (message lists the paths).
        CheckpointError: the file does not fit the model.
    """
    if pretrained is None or pretrained is False:
        return model
    if pretrained is True:
        cfg = pretrained_cfg_for(name)
        path = resolve_pretrained_file(name, cfg)
        _set_preprocessing(model, {k: v for k, v in (cfg or {}).items() if v is not None})
    elif isinstance(pretrained, (str, os.PathLike)):
        own_loader = getattr(model, "load_pretrained", None)
        if callable(own_loader):
            # Models with their own loader (segmentors: a segmentor file into the whole model, classification
            # weights into the backbone) know their keys; load_checkpoint fits backbone keys only.
            own_loader(pretrained)
            return model
        path = pretrained
    else:
        raise TypeError(f"pretrained must be True, False or a checkpoint path, got {type(pretrained).__name__}")
    load_checkpoint(model, path, adapt_classifier=True, adapt_input_channels=True)
    return model

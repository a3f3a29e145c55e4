"""Official T2T-ViT checkpoints (yitu-opensource/T2T-ViT ``.pth.tar``) -> fastvit T2T-ViT state dicts.

The official files are timm-train checkpoints: a dict with ``state_dict`` and usually ``state_dict_ema``
(plus ``epoch``, ``arch``, ``args``, ``optimizer``, ...). The README evaluates with ``use_ema=True``, so
the EMA weights are preferred. Keys may carry DistributedDataParallel's ``module.`` prefix. The names
themselves are fastvit's (:mod:`fastvit.models.t2t` keeps the official module tree), so conversion is
unwrap + prefix strip::

    tokens_to_token.attention{1,2}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}   (transformer)
    tokens_to_token.attention{1,2}.{norm1, kqv, proj, norm2, mlp.0, mlp.2, w}              (performer)
    tokens_to_token.project, cls_token, pos_embed, blocks.{i}.*, norm, head

``pos_embed`` is stored (a frozen Parameter upstream) and is loaded as stored: fine-tuned 384 models hold
a bicubic-resized table, not a fresh sinusoid. A table of another grid is resampled by
``fastvit.load_checkpoint`` with :data:`fastvit.checkpoints._common.T2T_RESAMPLE` (bicubic, no antialias,
the official ``load_for_transfer_learning``). mmpretrain's T2T-ViT layout (``backbone.tokens_to_token.*``)
is handled by :mod:`fastvit.checkpoints.mmpretrain`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fastvit.checkpoints._common import CheckpointError, StateDict, shorten

__all__ = ["convert_t2t_official", "is_t2t_official", "unwrap_training_checkpoint"]

# Present in every official T2T-ViT state dict (transformer and performer T2T modules alike) and in no
# other format's keys (mmpretrain prefixes it with "backbone.", timm's unmerged port with "patch_embed.").
_MARKER = "tokens_to_token.project.weight"
_WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model")
_DDP_PREFIX = "module."


def _strip_ddp(key: str) -> str:
    return key[len(_DDP_PREFIX) :] if key.startswith(_DDP_PREFIX) else key


def unwrap_training_checkpoint(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Mapping[str, Any]:
    """The state dict inside a timm-train checkpoint, or ``checkpoint`` itself when it is a bare state dict.

    Args:
        checkpoint: a loaded ``.pth.tar``: ``{'state_dict_ema': ..., 'state_dict': ...}``, ``{'model': ...}``
            or a state dict.
        use_ema: prefer ``state_dict_ema`` when present (the official README's evaluation setting).
    """
    for key in _WRAPPER_KEYS:
        if key == "state_dict_ema" and not use_ema:
            continue
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return inner
    return checkpoint


def is_t2t_official(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is an official T2T-ViT checkpoint or state dict (any wrapper, with or without
    the ``module.`` prefix)."""
    if not isinstance(checkpoint, Mapping):
        return False
    state_dict = unwrap_training_checkpoint(checkpoint)
    return any(isinstance(k, str) and _strip_ddp(k) == _MARKER for k in state_dict)


def convert_t2t_official(checkpoint: Mapping[str, Any], use_ema: bool = True) -> StateDict:
    """An official T2T-ViT checkpoint as a :class:`fastvit.models.t2t.T2TViT` state dict.

    Args:
        checkpoint: the loaded ``.pth.tar`` (wrapper dict or bare state dict).
        use_ema: take ``state_dict_ema`` when the file has one.

    Returns:
        name -> tensor with ``module.`` removed; nothing renamed (the names are already fastvit's).

    Raises:
        CheckpointError: not an official T2T-ViT state dict (its first keys are named), or an entry that
            is not a tensor.
    """
    state_dict = unwrap_training_checkpoint(checkpoint, use_ema=use_ema)
    converted: StateDict = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"official T2T-ViT checkpoint: entry {key!r} is a {type(value).__name__}, not a tensor; expected a "
                f"state dict, or a dict holding one under {', '.join(repr(k) for k in _WRAPPER_KEYS)}"
            )
        converted[_strip_ddp(key)] = value
    if _MARKER not in converted:
        raise CheckpointError(
            f"not an official T2T-ViT checkpoint: no {_MARKER!r} key; its keys begin {shorten(converted, 6)}. "
            f"fastvit.load_checkpoint(model, path, format='auto') detects the other formats"
        )
    return converted

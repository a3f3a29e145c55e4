"""timm state dicts (``.pth`` / ``.bin`` / ``.safetensors``) and DeiT ``{'model': ...}`` files.

fastvit's ViT, DeiT and hybrid models use timm's parameter names, so a timm state dict needs no
renaming; this module only recognises one and applies the few fixes timm's own
``checkpoint_filter_fn`` applies to old files:

* ``pre_logits.*`` (the representation layer of old in21k checkpoints) is dropped;
* DeiT-3 LayerScale ``blocks.i.gamma_1`` / ``gamma_2`` become ``blocks.i.ls1.gamma`` / ``ls2.gamma``.

Position embeddings of another grid are resampled bicubically with antialias, as timm does. DeiT
checkpoints are timm-named too; they differ only in the ``'model'`` wrapper, which
:func:`fastvit.checkpoints.load_checkpoint` removes before this module sees the keys.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from fastvit.checkpoints._common import StateDict, rename_keys

__all__ = ["is_timm", "timm_to_native", "native_to_timm"]

_QKV = re.compile(r"^blocks\.\d+\.attn\.qkv\.weight$")


def is_timm(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are timm ViT names (``patch_embed.proj.*``, ``blocks.N.attn.qkv.*``)."""
    return "patch_embed.proj.weight" in state_dict and any(_QKV.match(k) for k in state_dict)


def timm_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm / DeiT state dict -> fastvit names (identical, less ``pre_logits``, DeiT-3 gammas renamed)."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("pre_logits.")}
    return rename_keys(sd, [(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma")])


def native_to_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """fastvit ViT state dict -> timm (the same names: a copy)."""
    return dict(state_dict)

"""MMSegmentation ViT backbones: the output of mmseg's ``tools/model_converters/vit2mmseg.py`` and its reverse.

``vit2mmseg`` rules, applied in this order to each timm key (reproduced exactly by :func:`timm_to_mmseg`,
including its plain string replacements):

===============================  ===========================================================
timm key                         mmseg key
===============================  ===========================================================
``head*`` (incl. ``head_dist``)  dropped
``norm*``                        ``'norm.'`` -> ``'ln1.'`` (the backbone's final-norm LN)
``patch_embed*`` with ``proj``   ``'proj'`` -> ``'projection'``
``blocks.i.*`` with ``norm``     ``'norm'`` -> ``'ln'`` (``norm1`` -> ``ln1``)
``blocks.i.mlp.fc1`` / ``fc2``   ``ffn.layers.0.0`` / ``ffn.layers.1``
``blocks.i.attn.qkv.*``          ``attn.attn.in_proj_*`` (nn.MultiheadAttention, same [q; k; v] rows)
``blocks.i.attn.proj``           ``attn.attn.out_proj``
then ``blocks.`` -> ``layers.``; everything else (``cls_token``, ``pos_embed``) unchanged
===============================  ===========================================================

Reading goes the other way (plus ``pre_ln`` -> ``norm_pre`` for mmseg-trained ``pre_norm=True``
backbones) and also accepts whole mmseg segmentor checkpoints: their
``backbone.*`` part is taken and the neck / heads (``decode_head``, ``auxiliary_head``, ``neck``)
are reported as ignored. mmseg resamples position embeddings bicubically without antialias.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Union

import torch

from fastvit.checkpoints._common import StateDict, rename_keys
from fastvit.checkpoints._io import read_container

__all__ = [
    "SEGMENTOR_PARTS",
    "is_mmseg",
    "mmseg_to_timm",
    "read_segmentor",
    "segmentor_state_dict",
    "split_segmentor",
    "timm_to_mmseg",
]

SEGMENTOR_PARTS = ("decode_head.", "auxiliary_head.", "neck.", "data_preprocessor.")
_IN_PROJ = re.compile(r"^(backbone\.)?layers\.\d+\.attn\.attn\.in_proj_weight$")


def is_mmseg(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are an mmseg ViT backbone (``layers.N.attn.attn.in_proj_weight``, maybe under ``backbone.``)."""
    return any(_IN_PROJ.match(k) for k in state_dict)


def split_segmentor(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Backbone keys (``backbone.`` removed) of a segmentor checkpoint, and the segmentation keys left out."""
    if not any(k.startswith("backbone.") for k in state_dict):
        return dict(state_dict), []
    backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    ignored = [k for k in state_dict if not k.startswith("backbone.")]
    return backbone, ignored


def timm_to_mmseg(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm / DeiT ViT state dict -> mmseg backbone keys, exactly as ``vit2mmseg.convert_vit`` does."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("head"):
            continue
        if key.startswith("norm"):
            new = key.replace("norm.", "ln1.")
        elif key.startswith("patch_embed"):
            new = key.replace("proj", "projection") if "proj" in key else key
        elif key.startswith("blocks"):
            if "norm" in key:
                new = key.replace("norm", "ln")
            elif "mlp.fc1" in key:
                new = key.replace("mlp.fc1", "ffn.layers.0.0")
            elif "mlp.fc2" in key:
                new = key.replace("mlp.fc2", "ffn.layers.1")
            elif "attn.qkv" in key:
                new = key.replace("attn.qkv.", "attn.attn.in_proj_")
            elif "attn.proj" in key:
                new = key.replace("attn.proj", "attn.attn.out_proj")
            else:
                new = key
            new = new.replace("blocks.", "layers.")
        else:
            new = key
        out[new] = value
    return out


_TO_TIMM = [
    (r"^ln1\.", "norm."),
    (r"^pre_ln\.", "norm_pre."),  # mmseg ViT(pre_norm=True), e.g. CLIP-initialised backbones
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln([12])\.", r"blocks.\1.norm\2."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^layers\.(\d+)\.attn\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.", r"blocks.\1."),
]


def mmseg_to_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """mmseg ViT backbone keys (``backbone.`` already removed) -> timm / fastvit names."""
    return rename_keys(state_dict, _TO_TIMM)


def segmentor_state_dict(content: Any) -> Optional[StateDict]:
    """The tensors of an mmseg segmentor checkpoint (``state_dict`` unwrapped, a DDP ``module.`` prefix
    removed), or None when ``content`` has no ``backbone.`` keys."""
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        return None
    sd = {str(k).removeprefix("module."): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    return sd if any(k.startswith("backbone.") for k in sd) else None


def read_segmentor(
    source: Union[str, "os.PathLike[str]", Mapping[str, Any]],
) -> tuple[str, Optional[str], Any, Optional[StateDict]]:
    """Reads a segmentor checkpoint the way every fastvit reader does (``read_container``: zip CRCs, safe
    unpickling, safetensors, ``.npz``).

    Returns:
        (name for messages, container kind or None for an in-memory mapping, the loaded content, its mmseg
        segmentor state dict or None when it has no ``backbone.`` keys).
    """
    if isinstance(source, Mapping):
        return "<state dict>", None, source, segmentor_state_dict(source)
    container, content = read_container(source)
    return os.fspath(source), container, content, segmentor_state_dict(content)

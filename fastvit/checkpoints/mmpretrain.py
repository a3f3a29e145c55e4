"""mmpretrain (mmcls 1.x) image-classifier checkpoints: ``backbone.*`` / ``head.*`` keys under ``state_dict``.

ViT / DeiT (``mmpretrain/models/backbones/vision_transformer.py``, ``deit.py``; heads
``VisionTransformerClsHead`` / ``DeiTClsHead`` / ``LinearClsHead``):

====================================================  ====================================
mmpretrain key                                        timm / fastvit key
====================================================  ====================================
``backbone.patch_embed.projection.*``                 ``patch_embed.proj.*``
``backbone.cls_token``, ``dist_token``, ``pos_embed``  same without ``backbone.``
``backbone.pre_norm.*``                               ``norm_pre.*``
``backbone.layers.i.ln1`` / ``ln2``                   ``blocks.i.norm1`` / ``norm2``
``backbone.layers.i.attn.qkv`` / ``attn.proj``        ``blocks.i.attn.qkv`` / ``attn.proj``
``backbone.layers.i.attn.gamma1.weight``              ``blocks.i.ls1.gamma``
``backbone.layers.i.ffn.layers.0.0`` / ``layers.1``   ``blocks.i.mlp.fc1`` / ``mlp.fc2``
``backbone.layers.i.ffn.gamma2.weight``               ``blocks.i.ls2.gamma``
``backbone.ln1`` (final norm)                         ``norm``
``backbone.ln2`` (norm after ``avg_featmap``)         ``fc_norm``
``head.layers.head`` / ``head.layers.head_dist``      ``head`` / ``head_dist``
``head.layers.pre_logits`` (``hidden_dim`` heads)     dropped, as timm drops ``pre_logits``
``head.fc`` (``LinearClsHead``)                       ``head``
====================================================  ====================================

T2T-ViT (``t2t_vit.py``) maps to the official repository's names, which fastvit's T2T-ViT keeps:
``backbone.tokens_to_token.attentionN.{ln1,ln2,ffn.layers.0.0,ffn.layers.1}`` ->
``tokens_to_token.attentionN.{norm1,norm2,mlp.fc1,mlp.fc2}`` (``attn.*`` and ``project`` unchanged),
``backbone.encoder.i.*`` -> ``blocks.i.*`` with the same sub-renames, ``backbone.norm`` -> ``norm``.

Position embeddings of another grid are resampled bicubically without antialias, as mmpretrain does.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from fastvit.checkpoints._common import CheckpointError, StateDict, rename_keys, shorten

__all__ = ["IGNORED_PARTS", "is_mmpretrain", "mmpretrain_to_native", "native_to_mmpretrain"]

IGNORED_PARTS = ("data_preprocessor.", "head.layers.pre_logits.")
_MARKERS = re.compile(
    r"^(backbone\.layers\.\d+\.attn\.qkv\.weight|backbone\.tokens_to_token\.|backbone\.encoder\.\d+\."
    r"|head\.layers\.head\.)"
)

# (mmpretrain sub-module, official/timm sub-module) inside one transformer layer.
_LAYER_PARTS = [
    (r"ln1\.", "norm1."),
    (r"ln2\.", "norm2."),
    (r"ffn\.layers\.0\.0\.", "mlp.fc1."),
    (r"ffn\.layers\.1\.", "mlp.fc2."),
]

_TO_NATIVE = [
    (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
    (r"^backbone\.pre_norm\.", "norm_pre."),
    (r"^backbone\.layers\.(\d+)\.attn\.gamma1\.weight$", r"blocks.\1.ls1.gamma"),
    (r"^backbone\.layers\.(\d+)\.ffn\.gamma2\.weight$", r"blocks.\1.ls2.gamma"),
    *[(rf"^backbone\.layers\.(\d+)\.{a}", rf"blocks.\1.{b}") for a, b in _LAYER_PARTS],
    (r"^backbone\.layers\.(\d+)\.", r"blocks.\1."),
    (r"^backbone\.ln1\.", "norm."),
    (r"^backbone\.ln2\.", "fc_norm."),
    *[(rf"^backbone\.tokens_to_token\.(attention\d)\.{a}", rf"tokens_to_token.\1.{b}") for a, b in _LAYER_PARTS],
    *[(rf"^backbone\.encoder\.(\d+)\.{a}", rf"blocks.\1.{b}") for a, b in _LAYER_PARTS],
    (r"^backbone\.encoder\.(\d+)\.", r"blocks.\1."),
    (r"^backbone\.", ""),
    (r"^head\.layers\.(head|head_dist)\.", r"\1."),
    (r"^head\.fc\.", "head."),
]


def is_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are an mmpretrain ViT / DeiT / T2T-ViT classifier (``backbone.*`` + ``head.layers.*``)."""
    return any(_MARKERS.match(k) for k in state_dict)


def mmpretrain_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """mmpretrain classifier keys -> fastvit names (timm names for ViT / DeiT, official names for T2T-ViT)."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PARTS)}
    return rename_keys(sd, _TO_NATIVE)


def native_to_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """fastvit ViT / DeiT / T2T-ViT (transformer T2T module) state dict -> mmpretrain classifier keys.

    Raises:
        CheckpointError: for performer T2T-ViT (mmpretrain has no performer T2T module) and for keys
            mmpretrain's ViT has no place for.
    """
    t2t = any(k.startswith("tokens_to_token.") for k in state_dict)
    if t2t and any(re.match(r"^tokens_to_token\.attention\d\.(kqv|w)\b", k) for k in state_dict):
        raise CheckpointError(
            "mmpretrain has no performer T2T module (its T2TModule raises NotImplementedError for "
            "use_performer=True): only the t2t_vit_t_* models can be written as mmpretrain"
        )
    layer_parts = [(b.replace(".", r"\."), a.replace("\\", "")) for a, b in _LAYER_PARTS]
    rules = [
        (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
        (r"^norm_pre\.", "backbone.pre_norm."),
        (r"^blocks\.(\d+)\.ls1\.gamma$", r"backbone.layers.\1.attn.gamma1.weight"),
        (r"^blocks\.(\d+)\.ls2\.gamma$", r"backbone.layers.\1.ffn.gamma2.weight"),
        *[(rf"^tokens_to_token\.(attention\d)\.{a}", rf"backbone.tokens_to_token.\1.{b}") for a, b in layer_parts],
        (r"^tokens_to_token\.", "backbone.tokens_to_token."),
        *[(rf"^blocks\.(\d+)\.{a}", rf"backbone.{'encoder' if t2t else 'layers'}.\1.{b}") for a, b in layer_parts],
        (r"^blocks\.(\d+)\.", rf"backbone.{'encoder' if t2t else 'layers'}.\1."),
        (r"^norm\.", "backbone.norm." if t2t else "backbone.ln1."),
        (r"^fc_norm\.", "backbone.ln2."),
        (r"^(head|head_dist)\.", r"head.layers.\1."),
        (r"^(cls_token|dist_token|pos_embed)$", r"backbone.\1"),
    ]
    out = rename_keys(state_dict, rules)
    unplaced = [k for k in out if not k.startswith(("backbone.", "head."))]
    if unplaced:
        raise CheckpointError(f"mmpretrain's ViT has no place for these parameters: {shorten(unplaced)}")
    return out

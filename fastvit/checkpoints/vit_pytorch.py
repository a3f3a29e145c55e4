"""jeonsworld/ViT-pytorch ``.bin`` checkpoints (``models/modeling.py``, ``models/modeling_resnet.py``).

=================================================================  ============================================
jeonsworld key                                                     timm / fastvit key
=================================================================  ============================================
``transformer.embeddings.patch_embeddings.*``                      ``patch_embed.proj.*``
``transformer.embeddings.cls_token``                               ``cls_token``
``transformer.embeddings.position_embeddings``                     ``pos_embed``
``transformer.encoder.layer.i.attention_norm`` / ``ffn_norm``      ``blocks.i.norm1`` / ``norm2``
``transformer.encoder.layer.i.attn.{query,key,value}``             ``blocks.i.attn.qkv`` (rows q; k; v)
``transformer.encoder.layer.i.attn.out``                           ``blocks.i.attn.proj``
``transformer.encoder.layer.i.ffn.fc1`` / ``fc2``                  ``blocks.i.mlp.fc1`` / ``fc2``
``transformer.encoder.encoder_norm``                               ``norm``
``head``                                                           ``head``
``…hybrid_model.root.conv`` / ``root.gn``                          ``patch_embed.backbone.stem.conv`` / ``stem.norm``
``…hybrid_model.body.block{s}.unit{u}.conv{r}`` / ``gn{r}``        ``…stages.{s-1}.blocks.{u-1}.conv{r}``, ``norm{r}``
``…hybrid_model.body.block{s}.unit{u}.downsample`` / ``gn_proj``   ``…blocks.{u-1}.downsample.conv`` / ``.norm``
=================================================================  ============================================

jeonsworld's hybrid is not numerically identical to timm's even with the same weights (max-pool
padding 0 instead of SAME, StdConv eps 1e-5 instead of 1e-8): the keys map, the outputs differ
slightly. Its weights were trained with Google's preprocessing (resize, mean = std = 0.5). Only its
npz reader resamples position embeddings (``scipy.ndimage.zoom(order=1)``), so a ``.bin`` of another
grid is resampled with the npz convention (bilinear).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from fastvit.checkpoints._common import StateDict, rename_keys

__all__ = ["is_vit_pytorch", "native_to_vit_pytorch", "vit_pytorch_to_native"]

_EMB = "transformer.embeddings."
_ENC = "transformer.encoder."
_HYB = _EMB + "hybrid_model."
_BB = "patch_embed.backbone."
# (jeonsworld name, timm name) of whole tensors / sub-modules.
_TENSORS = [(_EMB + "cls_token", "cls_token"), (_EMB + "position_embeddings", "pos_embed")]
_MODULES = [
    (_EMB + "patch_embeddings", "patch_embed.proj"),
    (_ENC + "encoder_norm", "norm"),
    (_HYB + "root.conv", _BB + "stem.conv"),
    (_HYB + "root.gn", _BB + "stem.norm"),
]
_LAYER = [
    ("attention_norm", "norm1"),
    ("ffn_norm", "norm2"),
    ("attn.out", "attn.proj"),
    ("ffn.fc1", "mlp.fc1"),
    ("ffn.fc2", "mlp.fc2"),
]
_UNIT = [
    ("downsample", "downsample.conv"),
    ("gn_proj", "downsample.norm"),
    ("conv1", "conv1"),
    ("conv2", "conv2"),
    ("conv3", "conv3"),
    ("gn1", "norm1"),
    ("gn2", "norm2"),
    ("gn3", "norm3"),
]
_QKV = ("query", "key", "value")


def is_vit_pytorch(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are jeonsworld ViT-pytorch names (``transformer.embeddings.*``, ``transformer.encoder.*``)."""
    return any(k.startswith((_EMB, _ENC)) for k in state_dict)


def _rules(to_native: bool) -> list[tuple[str, str]]:
    def pair(a: str, b: str) -> tuple[str, str]:
        return (a, b) if to_native else (b, a)

    rules = []
    for a, b in (pair(a, b) for a, b in _TENSORS):
        rules.append((rf"^{re.escape(a)}$", b))
    for a, b in (pair(a, b) for a, b in _MODULES):
        rules.append((rf"^{re.escape(a)}\.", f"{b}."))
    src_layer, dst_layer = pair(rf"{_ENC}layer.", "blocks.")
    for a, b in (pair(a, b) for a, b in _LAYER):
        rules.append((rf"^{re.escape(src_layer)}(\d+)\.{re.escape(a)}\.", rf"{dst_layer}\1.{b}."))
    return rules


def vit_pytorch_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """jeonsworld state dict -> timm / fastvit names; separate ``query/key/value`` are stacked into ``qkv``."""
    sd = dict(state_dict)
    query = re.compile(rf"^{re.escape(_ENC)}layer\.(\d+)\.attn\.query\.(weight|bias)$")
    for key in [k for k in sd if query.match(k)]:
        i, param = query.match(key).groups()
        sd[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([sd.pop(f"{_ENC}layer.{i}.attn.{n}.{param}") for n in _QKV])
    # body.block{s}.unit{u} are 1-based in jeonsworld; stages.{s-1}.blocks.{u-1} are 0-based in timm.
    unit = re.compile(rf"^{re.escape(_HYB)}body\.block(\d+)\.unit(\d+)\.(\w+)\.(\w+)$")
    names = dict(_UNIT)
    for key in [k for k in sd if unit.match(k)]:
        s, u, layer, param = unit.match(key).groups()
        sd[f"{_BB}stages.{int(s) - 1}.blocks.{int(u) - 1}.{names.get(layer, layer)}.{param}"] = sd.pop(key)
    return rename_keys(sd, _rules(to_native=True))


def native_to_vit_pytorch(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm / fastvit ViT (or R50 hybrid) state dict -> jeonsworld names; ``qkv`` is split into ``query/key/value``."""
    sd = dict(state_dict)
    qkv = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
    for key in [k for k in sd if qkv.match(k)]:
        i, param = qkv.match(key).groups()
        for name, part in zip(_QKV, sd.pop(key).chunk(3, dim=0)):
            sd[f"{_ENC}layer.{i}.attn.{name}.{param}"] = part.clone()
    unit = re.compile(
        rf"^{re.escape(_BB)}stages\.(\d+)\.blocks\.(\d+)\.(downsample\.conv|downsample\.norm|\w+)\.(\w+)$"
    )
    names = {b: a for a, b in _UNIT}
    for key in [k for k in sd if unit.match(k)]:
        s, u, layer, param = unit.match(key).groups()
        sd[f"{_HYB}body.block{int(s) + 1}.unit{int(u) + 1}.{names.get(layer, layer)}.{param}"] = sd.pop(key)
    return rename_keys(sd, _rules(to_native=False))

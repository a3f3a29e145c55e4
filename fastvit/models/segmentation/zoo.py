"""The registered segmentors of the MMSeg ViT / DeiT / DPT tables (``fastvit.list_models("upernet_*")``)."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

from fastvit.models.registry import register_variant
from fastvit.models.segmentation._common import _ADE_PREPROCESSING
from fastvit.models.segmentation.backbone import ViTBackbone
from fastvit.models.segmentation.heads import DPTHead, FCNHead, MultiLevelNeck, UPerHead
from fastvit.models.segmentation.segmentor import EncoderDecoder

# --------------------------------------------------------------------------------------- registry

_UPERNET_CFG = dict(input_size=(3, 512, 512), test_scale=(2048, 512), num_classes=150, **_ADE_PREPROCESSING)


def _upernet(
    *,
    num_classes: int = 150,
    img_size: Union[int, tuple[int, int]] = 512,
    in_chans: int = 3,
    embed_dim: int,
    num_heads: int,
    depth: int = 12,
    mln: bool,
    final_norm: bool,
    drop_path_rate: float,
    channels: int = 512,
    aux_channels: int = 256,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    dropout_ratio: float = 0.1,
    out_indices: Sequence[int] = (2, 5, 8, 11),
    backbone_pretrained: Optional[Union[str, os.PathLike[str]]] = None,
    **backbone_kwargs: Any,
) -> EncoderDecoder:
    backbone = ViTBackbone(
        img_size=img_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        out_indices=out_indices, final_norm=final_norm, drop_path_rate=drop_path_rate, norm_eps=1e-6, **backbone_kwargs,
    )  # fmt: skip
    levels = [embed_dim] * len(backbone.out_indices)
    neck = MultiLevelNeck(levels, embed_dim, scales=(4, 2, 1, 0.5)) if mln else None
    decode = UPerHead(
        levels, channels, num_classes, pool_scales=pool_scales, in_index=range(len(levels)), dropout_ratio=dropout_ratio
    )
    aux = FCNHead(
        embed_dim,
        aux_channels,
        num_classes,
        num_convs=1,
        concat_input=False,
        in_index=len(levels) - 1,
        dropout_ratio=dropout_ratio,
    )
    model = EncoderDecoder(backbone, decode, neck=neck, auxiliary_head=aux)
    model.pretrained_cfg = dict(_UPERNET_CFG, num_classes=num_classes)
    if backbone_pretrained is not None:
        backbone.load_pretrained(backbone_pretrained)
    return model


def _dpt(
    *,
    num_classes: int = 150,
    img_size: Union[int, tuple[int, int]] = 224,
    in_chans: int = 3,
    embed_dim: int = 768,
    num_heads: int = 12,
    depth: int = 12,
    channels: int = 256,
    post_process_channels: Sequence[int] = (96, 192, 384, 768),
    readout_type: str = "project",
    dropout_ratio: float = 0.1,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = True,
    backbone_pretrained: Optional[Union[str, os.PathLike[str]]] = None,
    **backbone_kwargs: Any,
) -> EncoderDecoder:
    # The DPT config keeps mmseg's default img_size=224 (a 14x14 table, resampled to every crop's grid),
    # mmcv's default LayerNorm eps 1e-5, and with_cp=True (activation checkpointing in training).
    backbone = ViTBackbone(
        img_size=img_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        out_indices=(2, 5, 8, 11), final_norm=False, output_cls_token=True, norm_eps=1e-5,
        drop_path_rate=drop_path_rate, **backbone_kwargs,
    )  # fmt: skip
    backbone.set_grad_checkpointing(grad_checkpointing)
    decode = DPTHead(
        [embed_dim] * 4, channels, num_classes, embed_dims=embed_dim, post_process_channels=post_process_channels,
        readout_type=readout_type, dropout_ratio=dropout_ratio,
    )  # fmt: skip
    model = EncoderDecoder(backbone, decode)
    model.pretrained_cfg = dict(_UPERNET_CFG, num_classes=num_classes)
    if backbone_pretrained is not None:
        backbone.load_pretrained(backbone_pretrained)
    return model


_ENTRY_DOC = """``{name}``: {what} (mmseg ``{config}``), ADE20K 150 classes.

Overrides (``fastvit.create_model(name, **overrides)``): ``num_classes``, ``img_size`` (the stored
position grid), ``drop_path_rate``, ``channels`` / ``aux_channels`` (head widths), ``embed_dim`` /
``num_heads`` / ``depth`` (backbone shape), ``backbone_pretrained`` (a classification checkpoint for the
backbone: timm, DeiT, ``.npz``, ...).
"""


def _entry(name: str, builder: Callable[..., EncoderDecoder], what: str, config: str, **cfg: Any) -> None:
    def build(**kwargs: Any) -> EncoderDecoder:
        return builder(**{**cfg, **kwargs})

    register_variant(name, build, _ENTRY_DOC.format(name=name, what=what, config=config), __name__)


_VIT_B = dict(embed_dim=768, num_heads=12)
_DEIT_S = dict(embed_dim=384, num_heads=6)

# One entry per architecture of the MMSeg tables (the 80k and 160k schedules share it):
# name, backbone shape, MLN neck, final norm ("+ LN"), drop-path rate, the mmseg 1.x config.
for _name, _shape, _mln, _ln, _dpr, _config in (
    ("upernet_vit_b16_mln_512", _VIT_B, True, False, 0.0, "vit_vit-b16_mln_upernet_8xb2-80k"),
    ("upernet_vit_b16_ln_mln_512", _VIT_B, True, True, 0.1, "vit_vit-b16-ln_mln_upernet_8xb2-160k"),
    ("upernet_deit_s16_512", _DEIT_S, False, False, 0.1, "vit_deit-s16_upernet_8xb2-80k"),
    ("upernet_deit_s16_mln_512", _DEIT_S, True, False, 0.1, "vit_deit-s16_mln_upernet_8xb2-160k"),
    ("upernet_deit_s16_ln_mln_512", _DEIT_S, True, True, 0.1, "vit_deit-s16-ln_mln_upernet_8xb2-160k"),
    ("upernet_deit_b16_512", _VIT_B, False, False, 0.1, "vit_deit-b16_upernet_8xb2-80k"),
    ("upernet_deit_b16_mln_512", _VIT_B, True, False, 0.1, "vit_deit-b16_mln_upernet_8xb2-160k"),
    ("upernet_deit_b16_ln_mln_512", _VIT_B, True, True, 0.1, "vit_deit-b16-ln_mln_upernet_8xb2-160k"),
):
    _backbone = "ViT-B/16" if _name.startswith("upernet_vit") else "DeiT-B/16" if "deit_b" in _name else "DeiT-S/16"
    _what = f"UPerNet, {_backbone}{' + LN' if _ln else ''}{' + MLN' if _mln else ''}"
    _entry(_name, _upernet, _what, f"{_config}_ade20k-512x512", mln=_mln, final_norm=_ln, drop_path_rate=_dpr, **_shape)

_entry("dpt_vit_b16_512", _dpt, "DPT, ViT-B/16", "dpt_vit-b16_8xb2-160k_ade20k-512x512")

del _name, _shape, _mln, _ln, _dpr, _config, _backbone, _what

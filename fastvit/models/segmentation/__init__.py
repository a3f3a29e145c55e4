"""Dense prediction: UPerNet and DPT segmentors on the fastvit ViT backbone, in MMSegmentation's layout.

The models of the MMSeg ViT / DPT tables (ADE20K, 512x512 crops; ``reference/mission.md`` 1.5 and 4)::

    image (B, 3, H, W)                                        any H, W >= 16 (zero-padded right/bottom
      -> ViTBackbone: blocks (2, 5, 8, 11) as (B, D, h, w)     to a multiple of 16, mmseg's 'corner' pad)
      -> [MultiLevelNeck: scales 4, 2, 1, 0.5]                 the "MLN" rows; plain DeiT rows: none
      -> UPerHead (PPM + FPN) | DPTHead (reassemble + fusion)  -> logits at 1/4 (MLN), 1/16 (no neck), 1/2 (DPT)
      [-> FCNHead on input 3, training only, loss weight 0.4]

The backbone is fastvit's :class:`~fastvit.models.vit.VisionTransformer` (timm's module tree on
``fastvit.layers``: fused patch embedding, flash attention and fused MLP on GPU, at 1025 tokens for a
512x512 crop and at whatever count a whole test image gives). Its position table is resampled to every
new token grid bicubically without antialias (mmseg's ``interpolate_mode='bicubic'``) and, outside
autograd, cached per grid.

State dicts use mmseg's keys: ``backbone.*`` is what mmseg's ``VisionTransformer`` stores
(``layers.N.attn.attn.in_proj_weight``, ``patch_embed.projection``, ``ln1`` ...; translated on the fly
with :mod:`fastvit.checkpoints.mmseg`, so parameters keep timm's names in ``named_parameters``) and the
neck / heads are built with mmseg's module names (``ConvModule.conv`` / ``.bn``, ``psp_modules``,
``fpn_bottleneck``, ``conv_seg``, ``reassemble_blocks``, ``fusion_blocks`` ...), so an mmseg segmentor
checkpoint loads with ``strict=True``. SyncBN is plain ``nn.BatchNorm2d`` here (same keys; use
``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training).

Conventions kept from mmseg (they change numbers, so they are deliberate):

* ``predict`` resizes the head's logits, computed on the padded grid, to the unpadded input size
  (``BaseDecodeHead.predict_by_feat``), then optionally to an original size (``postprocess_result``).
* The cross-entropy averages over every pixel, ignored ones included (mmseg's ``avg_non_ignore=False``
  default); ``avg_non_ignore=True`` averages over the labelled pixels.
* The position table is resampled whenever the token grid differs from the stored one (mmseg compares
  token counts only, which misses e.g. a 16x64 grid against a 32x32 table).

Registered names (``fastvit.list_models("upernet_*")``, ``"dpt_*"``), 150 ADE20K classes by default:
``upernet_vit_b16_mln_512``, ``upernet_vit_b16_ln_mln_512``, ``upernet_deit_s16_512``,
``upernet_deit_s16_mln_512``, ``upernet_deit_s16_ln_mln_512``, ``upernet_deit_b16_512``,
``upernet_deit_b16_mln_512``, ``upernet_deit_b16_ln_mln_512``, ``dpt_vit_b16_512``.
"""

from __future__ import annotations

from fastvit.models.segmentation import zoo  # noqa: F401  (registers the segmentors)
from fastvit.models.segmentation._common import IGNORE_INDEX
from fastvit.models.segmentation.backbone import ViTBackbone
from fastvit.models.segmentation.heads import (
    PPM,
    ConvModule,
    DPTHead,
    FCNHead,
    FeatureFusionBlock,
    MultiLevelNeck,
    PreActResidualConvUnit,
    ReassembleBlocks,
    UPerHead,
)
from fastvit.models.segmentation.segmentor import EncoderDecoder

__all__ = [
    "IGNORE_INDEX",
    "PPM",
    "ConvModule",
    "DPTHead",
    "EncoderDecoder",
    "FCNHead",
    "FeatureFusionBlock",
    "MultiLevelNeck",
    "PreActResidualConvUnit",
    "ReassembleBlocks",
    "UPerHead",
    "ViTBackbone",
]

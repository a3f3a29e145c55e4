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

import os
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit.checkpoints import mmseg as _mmseg_keys
from fastvit.layers import LayerNorm, resample_abs_pos_embed, to_2tuple
from fastvit.models.registry import register_variant
from fastvit.models.vit import VisionTransformer

__all__ = [
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

IGNORE_INDEX = 255
# SegDataPreProcessor of the ADE20K configs: mean/std on 0-255 RGB, i.e. ImageNet's on 0-1 images.
_ADE_PREPROCESSING = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")
# Position tables kept per token grid, least recently used dropped first (ADE20K's whole-image test sees
# dozens of widths; a ViT-B table for a 32x43 grid is 4 MiB in fp32).
_POS_CACHE_SIZE = 16

Features = tuple[Any, ...]  # per level: a (B, C, h, w) map, or (map, cls token (B, D)) for DPT


def _resize(
    x: Tensor, size: Optional[Sequence[int]] = None, scale_factor: Optional[float] = None, align_corners: bool = False
) -> Tensor:
    """Bilinear resize, mmseg's ``resize`` (``F.interpolate``; ``scale_factor`` maps coordinates by the
    factor itself, the output size is floored)."""
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if tuple(x.shape[-2:]) == size:
            return x
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


# --------------------------------------------------------------------------------------- backbone


def _to_mmseg_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: this backbone's timm-named entries -> mmseg's names, in place, order kept."""
    items = list(state_dict.items())
    ours = {k[len(prefix) :]: v for k, v in items if k.startswith(prefix)}
    renamed = iter(_mmseg_keys.timm_to_mmseg(ours).items())
    for k, _ in items:
        del state_dict[k]
    done = False
    for k, v in items:
        if not k.startswith(prefix):
            state_dict[k] = v
        elif not done:  # the backbone's entries are contiguous: emit them all at the first one
            for new_key, new_value in renamed:
                state_dict[prefix + new_key] = new_value
            done = True


def _from_mmseg_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: mmseg's backbone names -> timm's, in place. timm-named keys match no
    rule and pass unchanged, so both layouts load."""
    ours = [k for k in state_dict if k.startswith(prefix)]
    sub = {k[len(prefix) :]: state_dict.pop(k) for k in ours}
    for k, v in _mmseg_keys.mmseg_to_timm(sub).items():
        state_dict[prefix + k] = v


class ViTBackbone(VisionTransformer):
    """mmseg's ``VisionTransformer`` backbone on fastvit layers: the outputs of ``out_indices`` blocks as
    (B, D, h, w) maps, state dict in mmseg's layout.

    Args:
        img_size: the grid the position table is stored for (512 for UPerNet, 224 for DPT).
        patch_size: patch side (16).
        in_chans: image channels.
        embed_dim: D.
        depth: blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width / D.
        qkv_bias: bias on the qkv projection.
        out_indices: blocks whose outputs are returned (negative counts from the end).
        final_norm: LayerNorm (mmseg ``ln1``) on the last block's output (the "+ LN" rows).
        with_cls_token: keep the class token through the blocks (mmseg's default); False drops it
            after the position embedding.
        output_cls_token: return ``(map, cls token)`` per level (DPT's readout).
        norm_eps: LayerNorm eps (1e-6 in the UPerNet configs, mmcv's default 1e-5 for DPT).
        drop_rate: dropout after the position embedding and in attention/MLP outputs (training only).
        attn_drop_rate: dropout on attention probabilities (training only).
        drop_path_rate: stochastic depth, linear over the blocks (training only).
        patch_bias: bias on the patch projection. True matches timm weights and mmseg's model-zoo
            checkpoints (trained with mmseg 0.x); recent mmseg 1.x (1.2.2) builds its ViT with
            ``patch_bias=False`` by default, and state dicts saved from such a model have no
            ``patch_embed.projection.bias``.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 512,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        out_indices: Sequence[int] = (2, 5, 8, 11),
        final_norm: bool = False,
        with_cls_token: bool = True,
        output_cls_token: bool = False,
        norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_bias: bool = True,
    ):
        if output_cls_token and not with_cls_token:
            raise ValueError("fastvit: output_cls_token=True needs with_cls_token=True (mmseg asserts the same)")
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="",
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            final_norm=final_norm, dynamic_img_size=True, dynamic_img_pad=True, pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            norm_layer=partial(LayerNorm, eps=norm_eps), pos_embed_interp="mmseg",
        )  # fmt: skip
        indices = []
        for i in out_indices:
            j = depth + i if i < 0 else i
            if not 0 <= j < depth:
                raise ValueError(f"fastvit: out_indices entry {i} is outside the backbone's {depth} blocks")
            indices.append(j)
        self.out_indices = tuple(indices)
        if not patch_bias:
            self.patch_embed.proj.register_parameter("bias", None)
        self.has_final_norm = final_norm
        self.with_cls_token = with_cls_token
        self.output_cls_token = output_cls_token
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self._pos_cache_stamp: Optional[tuple] = None
        self._register_state_dict_hook(_to_mmseg_keys)
        self._register_load_state_dict_pre_hook(_from_mmseg_keys, with_module=True)

    # ------------------------------------------------------------------------- position table

    def pos_embed_for_grid(self, grid_hw: tuple[int, int]) -> Tensor:
        """The (1, 1 + h*w, D) position table for a token grid: the stored one, or its bicubic
        (no antialias) resampling (:meth:`VisionTransformer.pos_embed_for_grid`, mmseg's convention).
        Resamplings are cached per grid unless autograd needs them (training) or the model is being
        compiled; the cache empties itself when the table changes (an optimizer step, a load, ``.to()``).
        Entries are ordinary tensors even when made under ``inference_mode``, so a later autograd pass
        over a frozen backbone can use them."""
        base = self.patch_embed.grid_size
        pos = self.pos_embed
        if tuple(grid_hw) == tuple(base):
            return pos
        if (torch.is_grad_enabled() and pos.requires_grad) or _is_compiling():
            return super().pos_embed_for_grid(grid_hw)
        stamp = (pos.data_ptr(), pos._version, pos.dtype, pos.device, tuple(base), self.pos_embed_interp)
        if stamp != self._pos_cache_stamp:
            self._pos_cache.clear()
            self._pos_cache_stamp = stamp
        grid = (int(grid_hw[0]), int(grid_hw[1]))
        cached = self._pos_cache.pop(grid, None)  # re-inserted below: the dict's order is recency
        if cached is None:
            if len(self._pos_cache) >= _POS_CACHE_SIZE:
                self._pos_cache.pop(next(iter(self._pos_cache)))
            # inference_mode(False) re-enables grad mode: no_grad keeps the entry free of a graph to pos_embed.
            with torch.inference_mode(False), torch.no_grad():
                cached = super().pos_embed_for_grid(grid)
        self._pos_cache[grid] = cached
        return cached

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> ViTBackbone:
        self._pos_cache.clear()  # .to() / .half() / .cuda(): entries of the old table would only hold memory
        return super()._apply(fn, *args, **kwargs)

    def check_image(self, x: Tensor) -> tuple[int, int]:
        """Validates an image batch and returns its token grid (padded up to whole patches).

        Raises:
            TypeError: not a floating-point tensor.
            ValueError: not (B, C, H, W), wrong channel count, or a side shorter than one patch.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"fastvit: expected an image tensor (B, C, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"fastvit: images must be a floating-point tensor, got {x.dtype}; convert with .float() and "
                f"normalise with the model's mean/std (model.pretrained_cfg)"
            )
        grid = self.patch_embed.check_input(x)
        p = self.patch_embed.patch_size[0]
        if x.shape[-2] < p or x.shape[-1] < p:
            raise ValueError(
                f"fastvit: image size {x.shape[-2]}x{x.shape[-1]} is smaller than one {p}x{p} patch; "
                f"resize the image so both sides are at least {p} pixels"
            )
        return grid

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = self.check_image(x)
        tokens = self.patch_embed(x, pos_embed=self.pos_embed_for_grid(grid), prefix_tokens=self.cls_token)
        tokens = self.pos_drop(tokens)
        if not self.with_cls_token:
            tokens = tokens[:, 1:]
        return self.norm_pre(tokens), grid

    # ---------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Features:
        """(B, C, H, W) -> one (B, D, h, w) map per ``out_indices`` block (h, w = ceil(H/16), ceil(W/16));
        with ``output_cls_token`` each level is ``(map, cls token (B, D))``. The final norm, when on,
        applies to the last block's output only (mmseg)."""
        B = x.shape[0]
        x, (h, w) = self._embed(x)
        prefix = 1 if self.with_cls_token else 0
        last = len(self.blocks) - 1
        outs: list[Any] = []
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x)
            if i == last:
                x = self.norm(x)
            if i in self.out_indices:
                fmap = x[:, prefix:].reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()
                outs.append((fmap, x[:, 0]) if self.output_cls_token else fmap)
        return tuple(outs)

    # ------------------------------------------------------------------------------- weights

    def load_pretrained(
        self, source: Union[str, os.PathLike[str], Mapping[str, Any]], format: str = "auto"
    ) -> list[str]:
        """Loads classification weights (timm, DeiT, Google ``.npz``, mmpretrain, an mmseg backbone or
        segmentor file; anything :func:`fastvit.checkpoints.read_checkpoint` reads) into this backbone,
        as mmseg's ``init_weights`` does: the position table is resampled bicubically to the backbone's
        grid, the classifier (and the final norm, or the patch bias, when this backbone has none) is left
        out; every other key must fit.

        Args:
            source: checkpoint path or an already loaded state dict.
            format: "auto" or a format name of :data:`fastvit.checkpoints.FORMATS`.

        Returns:
            The checkpoint keys deliberately left out.

        Raises:
            CheckpointError: an unreadable file, a distilled DeiT checkpoint (two prefix tokens), or keys
                that do not fit (another width / depth).
        """
        from fastvit.checkpoints import CheckpointError, check_dtypes, read_checkpoint

        ckpt = read_checkpoint(source, format)
        sd = dict(ckpt.state_dict)
        check_dtypes(ckpt.source, sd, dict(self.named_parameters()))  # module names, as sd (not mmseg's keys)
        if "dist_token" in sd:
            raise CheckpointError(
                f"{ckpt.source}: a distilled DeiT checkpoint (dist_token, two prefix tokens); mmseg's ViT backbone has "
                f"one class token. Use the non-distilled weights (e.g. deit_base_patch16_224)"
            )
        skip_roots = ("head", "head_dist", "fc_norm", "pre_logits") + (() if self.has_final_norm else ("norm",))
        left_out = sorted(k for k in sd if k.split(".", 1)[0] in skip_roots)
        if self.patch_embed.proj.bias is None and "patch_embed.proj.bias" in sd:
            left_out.append("patch_embed.proj.bias")  # a patch_bias=False backbone, as mmseg 1.2 drops it
        for k in left_out:
            del sd[k]
        pos = sd.get("pos_embed")
        if isinstance(pos, Tensor) and pos.shape != self.pos_embed.shape:
            try:
                sd["pos_embed"] = resample_abs_pos_embed(pos, self.patch_embed.grid_size, None, 1, "mmseg")
            except ValueError as err:
                raise CheckpointError(
                    f"{ckpt.source}: pos_embed {tuple(pos.shape)} cannot be resampled: {err}"
                ) from err
        try:
            self.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{ckpt.source}: {ckpt.description}; it does not fit this backbone "
                f"(embed_dim={self.embed_dim}, depth={len(self.blocks)}): {err}"
            ) from err
        return sorted(left_out + list(ckpt.ignored))


# ---------------------------------------------------------------------------------- conv blocks


class ConvModule(nn.Module):
    """mmcv's ``ConvModule`` as the segmentation heads use it: ``conv`` (+ ``bn`` BatchNorm) (+ ReLU),
    in ``order``; same keys.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel.
        stride: conv stride.
        padding: conv padding.
        norm: add a BatchNorm2d named ``bn`` (mmseg's SyncBN / BN).
        act: add a ReLU.
        bias: conv bias; "auto" = no bias when a norm follows (mmcv).
        order: ("conv", "norm", "act") or ("act", "conv", "norm") (DPT's pre-activation units).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        norm: bool = False,
        act: bool = True,
        bias: Union[bool, str] = "auto",
        order: tuple[str, str, str] = ("conv", "norm", "act"),
    ):
        super().__init__()
        if sorted(order) != ["act", "conv", "norm"]:
            raise ValueError(f"fastvit: ConvModule order must be a permutation of conv/norm/act, got {order}")
        self.order = order
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=(not norm) if bias == "auto" else bool(bias),
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU() if act else None
        # mmcv's init: Kaiming (fan_out, ReLU) conv weights, zero bias, unit/zero norm.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and self.bn is not None:
                x = self.bn(x)
            elif layer == "act" and self.activate is not None:
                x = self.activate(x)
        return x


# -------------------------------------------------------------------------------------------- neck


class MultiLevelNeck(nn.Module):
    """mmseg's ``MultiLevelNeck`` (MLN): per input a 1x1 ``lateral_convs`` conv, a bilinear resize by
    ``scales[i]``, then a 3x3 ``convs`` conv (plain convs with bias: the configs give no norm/act).

    Args:
        in_channels: channels of each input map.
        out_channels: channels of every output map.
        scales: resize factor per output (the ViT configs: 4, 2, 1, 0.5 -> strides 4, 8, 16, 32 from 1/16 maps).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, scales: Sequence[float] = (0.5, 1, 2, 4)):
        super().__init__()
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.scales = list(scales)
        if len(self.in_channels) not in (1, len(self.scales)):
            raise ValueError(
                f"fastvit: MultiLevelNeck takes 1 or {len(self.scales)} inputs, got in_channels={self.in_channels}"
            )
        self.lateral_convs = nn.ModuleList([ConvModule(c, out_channels, 1, act=False) for c in self.in_channels])
        self.convs = nn.ModuleList(
            [ConvModule(out_channels, out_channels, 3, padding=1, act=False) for _ in self.scales]
        )
        # mmseg's init: Xavier-uniform convs, zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def min_grid(self) -> int:
        """The smallest input map side for which every output keeps at least one pixel."""
        smallest = min(self.scales)
        side = 1
        while int(side * smallest) < 1:
            side += 1
        return side

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"fastvit: MultiLevelNeck expected {len(self.in_channels)} maps, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        if len(laterals) == 1:
            laterals = laterals * len(self.scales)
        return tuple(conv(_resize(x, scale_factor=s)) for conv, x, s in zip(self.convs, laterals, self.scales))


# ------------------------------------------------------------------------------------------ heads


class _DecodeHead(nn.Module):
    """mmseg's ``BaseDecodeHead``: input selection, ``dropout`` + ``conv_seg`` classifier, the loss.

    Args:
        in_channels: channels of the selected input(s).
        channels: channels before the classifier.
        num_classes: classes K.
        in_index: which input(s) to use (an int, or a list for multi-level heads).
        dropout_ratio: Dropout2d before ``conv_seg`` (training only).
        align_corners: bilinear resizes of the logits (loss, predict).
        loss_weight: multiplies the cross-entropy (0.4 for the auxiliary FCN head).
        ignore_index: label that contributes no loss (255).
        avg_non_ignore: average the loss over labelled pixels only (mmseg default False: all pixels).
    """

    def __init__(
        self,
        in_channels: Union[int, Sequence[int]],
        channels: int,
        num_classes: int,
        in_index: Union[int, Sequence[int]],
        dropout_ratio: float = 0.1,
        align_corners: bool = False,
        loss_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        avg_non_ignore: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"fastvit: a segmentation head needs num_classes >= 1, got {num_classes}")
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.in_index = in_index
        self.align_corners = align_corners
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def _select(self, inputs: Features) -> Any:
        if isinstance(self.in_index, int):
            return inputs[self.in_index]
        return [inputs[i] for i in self.in_index]

    def cls_seg(self, feat: Tensor) -> Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)

    def loss(self, inputs: Features, seg_label: Tensor) -> dict[str, Tensor]:
        """``{"loss_ce": weighted cross-entropy, "acc_seg": pixel accuracy in % (detached)}`` with the
        logits resized bilinearly to the label size."""
        logits = _resize(self(inputs), size=seg_label.shape[-2:], align_corners=self.align_corners)
        ce = F.cross_entropy(logits.float(), seg_label, ignore_index=self.ignore_index, reduction="none")
        valid = seg_label != self.ignore_index
        if self.avg_non_ignore:
            # mmseg: sum / (labelled pixels + fp32 eps), so an unlabelled batch gives 0, not NaN.
            loss = ce.sum() / (valid.sum() + torch.finfo(torch.float32).eps)
        else:
            loss = ce.mean()
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == seg_label) & valid
            acc = correct.sum().float() * 100.0 / valid.sum().clamp_min(1)
        return {"loss_ce": loss * self.loss_weight, "acc_seg": acc}


class PPM(nn.ModuleList):
    """Pyramid pooling: per scale an adaptive average pool and a 1x1 ConvModule (BN, ReLU), each
    upsampled back to the input size (keys ``{i}.1.conv`` / ``{i}.1.bn``)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False):
        super().__init__(
            [
                nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1, norm=True))
                for s in pool_scales
            ]
        )
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> list[Tensor]:
        return [_resize(stage(x), size=x.shape[-2:], align_corners=self.align_corners) for stage in self]


class UPerHead(_DecodeHead):
    """mmseg's ``UPerHead``: PPM on the last input + 3x3 ``bottleneck``; FPN with 1x1 ``lateral_convs``,
    top-down bilinear adds and 3x3 ``fpn_convs``; the levels upsampled to the first, concatenated and
    fused by the 3x3 ``fpn_bottleneck``; ``conv_seg``. Logits at the first input's resolution.

    Args:
        in_channels: channels of each input level.
        channels: FPN width (512).
        num_classes: K.
        pool_scales: PPM bins.
        in_index: the inputs used (default all four).
        **kwargs: :class:`_DecodeHead` options (dropout_ratio, align_corners, loss_weight, ...).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        in_index: Sequence[int] = (0, 1, 2, 3),
        **kwargs: Any,
    ):
        in_channels = list(in_channels)
        if len(in_channels) != len(in_index):
            raise ValueError(
                f"fastvit: UPerHead in_channels {in_channels} and in_index {list(in_index)} differ in length"
            )
        super().__init__(in_channels, channels, num_classes, list(in_index), **kwargs)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, self.align_corners)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1, norm=True)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, norm=True) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList(
            [ConvModule(channels, channels, 3, padding=1, norm=True) for _ in in_channels[:-1]]
        )
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1, norm=True)

    def forward(self, inputs: Features) -> Tensor:
        feats = self._select(inputs)
        last = feats[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([last, *self.psp_modules(last)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(
                laterals[i], size=laterals[i - 1].shape[-2:], align_corners=self.align_corners
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [_resize(x, size=size, align_corners=self.align_corners) for x in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """mmseg's ``FCNHead`` (the auxiliary head of the UPerNet configs): ``num_convs`` 3x3 ConvModules
    (``convs``), optionally concatenated with the input and fused (``conv_cat``), then ``conv_seg``.

    Args:
        in_channels: input channels.
        channels: conv width (256 in the configs).
        num_classes: K.
        num_convs: number of convs (1 in the configs).
        kernel_size: conv kernel.
        concat_input: concatenate the input before the classifier (False in the configs).
        in_index: the input used (3: the last level).
        loss_weight: 0.4 in the configs.
        **kwargs: :class:`_DecodeHead` options.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_convs: int = 1,
        kernel_size: int = 3,
        concat_input: bool = False,
        in_index: int = 3,
        loss_weight: float = 0.4,
        **kwargs: Any,
    ):
        super().__init__(in_channels, channels, num_classes, in_index, loss_weight=loss_weight, **kwargs)
        pad = kernel_size // 2
        convs = [
            ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=pad, norm=True)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=pad, norm=True)

    def forward(self, inputs: Features) -> Tensor:
        x = self._select(inputs)
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)


class ReassembleBlocks(nn.Module):
    """DPT's reassemble stage: readout (``'ignore'``, ``'add'`` the class token, or ``'project'``:
    Linear(2D -> D) + GELU on [token, cls]), a 1x1 ``projects`` conv per level, then ``resize_layers``
    (ConvTranspose x4, ConvTranspose x2, Identity, 3x3 stride-2 conv) -> strides 4, 8, 16, 32.

    Args:
        in_channels: D.
        out_channels: channels per level ([96, 192, 384, 768]).
        readout_type: "ignore", "add" or "project".
    """

    def __init__(
        self, in_channels: int = 768, out_channels: Sequence[int] = (96, 192, 384, 768), readout_type: str = "project"
    ):
        super().__init__()
        if readout_type not in ("ignore", "add", "project"):
            raise ValueError(f"fastvit: readout_type must be 'ignore', 'add' or 'project', got {readout_type!r}")
        if len(out_channels) != 4:
            raise ValueError(f"fastvit: ReassembleBlocks builds four levels; got out_channels={list(out_channels)}")
        c = list(out_channels)
        self.readout_type = readout_type
        self.projects = nn.ModuleList([ConvModule(in_channels, ch, 1, act=False) for ch in c])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4, padding=0),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2, padding=0),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
        ])  # fmt: skip
        if readout_type == "project":
            self.readout_projects = nn.ModuleList(
                [nn.Sequential(nn.Linear(2 * in_channels, in_channels), nn.GELU()) for _ in c]
            )

    def forward(self, inputs: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        out = []
        for i, level in enumerate(inputs):
            if not isinstance(level, (tuple, list)) or len(level) != 2:
                raise ValueError(
                    "fastvit: DPT's reassemble stage takes (map, cls token) pairs; "
                    "build the backbone with output_cls_token=True"
                )
            x, cls = level
            B, C, h, w = x.shape
            if self.readout_type == "project":
                tokens = x.flatten(2).transpose(1, 2)
                tokens = self.readout_projects[i](torch.cat([tokens, cls.unsqueeze(1).expand_as(tokens)], dim=-1))
                x = tokens.transpose(1, 2).reshape(B, C, h, w)
            elif self.readout_type == "add":
                x = (x.flatten(2) + cls.unsqueeze(-1)).reshape(B, C, h, w)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class PreActResidualConvUnit(nn.Module):
    """``x + conv2(conv1(x))``, each conv a ReLU -> 3x3 conv (no bias) -> BN ConvModule."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3, padding=1, norm=True, bias=False, order=("act", "conv", "norm"))
        self.conv2 = ConvModule(channels, channels, 3, padding=1, norm=True, bias=False, order=("act", "conv", "norm"))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


class FeatureFusionBlock(nn.Module):
    """DPT fusion: ``x (+ res_conv_unit1(skip resized to x))`` -> ``res_conv_unit2`` -> bilinear x2
    (align_corners=True) -> 1x1 ``project``. The first block has no skip (``res_conv_unit1`` None)."""

    def __init__(self, channels: int, with_skip: bool = True):
        super().__init__()
        self.project = ConvModule(channels, channels, 1, act=False, bias=True)
        self.res_conv_unit1 = PreActResidualConvUnit(channels) if with_skip else None
        self.res_conv_unit2 = PreActResidualConvUnit(channels)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if skip is not None:
            if self.res_conv_unit1 is None:
                raise ValueError("fastvit: this fusion block has no skip branch (DPT's first block)")
            x = x + self.res_conv_unit1(_resize(skip, size=x.shape[-2:]))
        x = self.res_conv_unit2(x)
        x = _resize(x, scale_factor=2, align_corners=True)
        return self.project(x)


class DPTHead(_DecodeHead):
    """mmseg's ``DPTHead``: ``reassemble_blocks``, 3x3 ``convs`` to ``channels`` (no bias, no norm),
    four ``fusion_blocks`` from the deepest level up, 3x3 ``project`` (BN, ReLU), ``conv_seg``.
    Logits at 1/2 of the (padded) input.

    Args:
        in_channels: D per level.
        channels: fusion width (256).
        num_classes: K.
        embed_dims: D.
        post_process_channels: per-level reassemble widths.
        readout_type: "ignore", "add" or "project" (the config: "project").
        in_index: the levels used.
        **kwargs: :class:`_DecodeHead` options.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        embed_dims: int = 768,
        post_process_channels: Sequence[int] = (96, 192, 384, 768),
        readout_type: str = "project",
        in_index: Sequence[int] = (0, 1, 2, 3),
        **kwargs: Any,
    ):
        super().__init__(list(in_channels), channels, num_classes, list(in_index), **kwargs)
        self.reassemble_blocks = ReassembleBlocks(embed_dims, post_process_channels, readout_type)
        self.convs = nn.ModuleList(
            [ConvModule(c, channels, 3, padding=1, act=False, bias=False) for c in post_process_channels]
        )
        self.fusion_blocks = nn.ModuleList(
            [FeatureFusionBlock(channels, with_skip=i > 0) for i in range(len(self.convs))]
        )
        self.project = ConvModule(channels, channels, 3, padding=1, norm=True)

    def forward(self, inputs: Features) -> Tensor:
        feats = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(self._select(inputs)))]
        out = self.fusion_blocks[0](feats[-1])
        for i in range(1, len(self.fusion_blocks)):
            out = self.fusion_blocks[i](out, feats[-(i + 1)])
        return self.cls_seg(self.project(out))


# -------------------------------------------------------------------------------------- segmentor


def _segmentor_state_dict(content: Any) -> Optional[dict[str, Tensor]]:
    """The tensors of an mmseg segmentor checkpoint (``state_dict`` unwrapped, a DDP ``module.`` prefix
    removed), or None when ``content`` has no ``backbone.`` keys."""
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        return None
    sd = {str(k).removeprefix("module."): v for k, v in content.items() if isinstance(v, Tensor)}
    return sd if any(k.startswith("backbone.") for k in sd) else None


def _source_name(source: Any) -> str:
    return "<state dict>" if isinstance(source, Mapping) else os.fspath(source)


def _check_num_classes(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: a classifier of another size gets an error that says what to build."""
    for name in ("decode_head", "auxiliary_head"):
        head = getattr(module, name, None)
        weight = state_dict.get(f"{prefix}{name}.conv_seg.weight")
        if head is not None and isinstance(weight, Tensor) and weight.shape[0] != head.num_classes:
            raise ValueError(
                f"fastvit: the checkpoint's {name}.conv_seg has {weight.shape[0]} classes, "
                f"this model {head.num_classes}; build it with num_classes={weight.shape[0]} "
                f"(e.g. fastvit.create_model(name, num_classes={weight.shape[0]})), "
                f"or drop the '{name}.conv_seg.*' keys and load with strict=False to fine-tune a new classifier"
            )


class EncoderDecoder(nn.Module):
    """mmseg's ``EncoderDecoder`` (``backbone``, ``neck``, ``decode_head``, ``auxiliary_head``; same
    state-dict keys).

    Args:
        backbone: a :class:`ViTBackbone`.
        decode_head: :class:`UPerHead` or :class:`DPTHead`.
        neck: :class:`MultiLevelNeck` or None.
        auxiliary_head: :class:`FCNHead` (training loss only) or None.

    ``forward(x)`` gives the head's logits (1/4, 1/16 or 1/2 resolution), ``forward(x, seg_label)`` the
    training losses, ``predict(x)`` logits at the input size. Inputs are normalised images
    (``pretrained_cfg`` mean/std, RGB).

    Attributes:
        check_labels: the training forward checks that every label is a class index or the ignore
            index (a readable error instead of a CUDA device-side assert). The check reads one flag
            back from the device (a synchronisation per step); set False to skip it once the data is
            trusted. It is skipped while ``torch.compile`` traces.
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        decode_head: _DecodeHead,
        neck: Optional[nn.Module] = None,
        auxiliary_head: Optional[_DecodeHead] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.pretrained_cfg: dict[str, Any] = {}
        self.check_labels = True
        self._register_load_state_dict_pre_hook(_check_num_classes, with_module=True)

    def min_input_size(self) -> int:
        """The smallest image side the model takes: one patch, or as many as the neck's downscaling needs."""
        p = self.backbone.patch_embed.patch_size[0]
        grid = self.neck.min_grid() if isinstance(self.neck, MultiLevelNeck) else 1
        return (grid - 1) * p + 1 if grid > 1 else p

    def extract_feat(self, x: Tensor) -> Features:
        """Backbone (and neck) features."""
        smallest, patch = self.min_input_size(), self.backbone.patch_embed.patch_size[0]
        # Images under one patch get the backbone's own error; this one is for what the neck needs.
        if smallest > patch and isinstance(x, Tensor) and x.dim() == 4 and patch <= min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"fastvit: image size {x.shape[-2]}x{x.shape[-1]} is too small for this model: "
                "both sides must be at least "
                f"{smallest} pixels, so that the token grid is at least {self.neck.min_grid()} patches and the neck's "
                f"{min(self.neck.scales)}x resize keeps a pixel; resize the image"
            )
        feats = self.backbone(x)
        return tuple(self.neck(feats)) if self.neck is not None else feats

    def forward(self, x: Tensor, seg_label: Optional[Tensor] = None) -> Union[Tensor, dict[str, Tensor]]:
        """Logits (B, K, h, w) at the head's resolution; with ``seg_label``, the training losses
        (see :meth:`loss`).

        Args:
            x: (B, C, H, W) normalised images.
            seg_label: optional (B, H, W) or (B, 1, H, W) integer labels, 255 = ignore.
        """
        if seg_label is not None:
            return self.loss(x, seg_label)
        return self.decode_head(self.extract_feat(x))

    def _check_label(self, x: Tensor, seg_label: Tensor) -> Tensor:
        if not isinstance(seg_label, Tensor) or seg_label.is_floating_point() or seg_label.dtype == torch.bool:
            got = seg_label.dtype if isinstance(seg_label, Tensor) else type(seg_label).__name__
            raise TypeError(f"fastvit: seg_label must be an integer tensor of class indices, got {got}; use .long()")
        if seg_label.dim() == 4 and seg_label.shape[1] == 1:
            seg_label = seg_label[:, 0]
        if seg_label.dim() != 3 or seg_label.shape[0] != x.shape[0]:
            raise ValueError(
                f"fastvit: seg_label must be (B, H, W) or (B, 1, H, W) with B={x.shape[0]}, "
                f"got shape {tuple(seg_label.shape)}"
            )
        ignore = self.decode_head.ignore_index
        if not self.check_labels or _is_compiling():
            return seg_label.long()
        bad = (seg_label != ignore) & ((seg_label < 0) | (seg_label >= self.num_classes))
        if bool(bad.any()):
            values = torch.unique(seg_label[bad])[:8].tolist()
            raise ValueError(
                f"fastvit: seg_label has values {values} outside 0..{self.num_classes - 1} (and {ignore} = ignore); "
                f"map them to {ignore} or build the model with more classes"
            )
        return seg_label.long()

    def loss(self, x: Tensor, seg_label: Tensor) -> dict[str, Tensor]:
        """Training losses, mmseg's keys: ``decode.loss_ce``, ``aux.loss_ce`` (already weighted, 0.4 for
        the auxiliary head), ``decode.acc_seg`` / ``aux.acc_seg`` (pixel accuracy %, detached), and
        ``loss``, their sum, to call ``backward()`` on.

        Raises:
            TypeError / ValueError: labels that are not integer class maps of the batch, or values out of range.
        """
        seg_label = self._check_label(x, seg_label)
        feats = self.extract_feat(x)
        losses = {f"decode.{k}": v for k, v in self.decode_head.loss(feats, seg_label).items()}
        if self.auxiliary_head is not None:
            losses.update({f"aux.{k}": v for k, v in self.auxiliary_head.loss(feats, seg_label).items()})
        losses["loss"] = sum(v for k, v in losses.items() if k.endswith("loss_ce"))
        return losses

    @torch.no_grad()
    def predict(self, x: Tensor, size: Optional[Union[int, tuple[int, int]]] = None) -> Tensor:
        """Whole-image inference (mmseg ``test_cfg=dict(mode='whole')``): logits resized bilinearly to the
        input size, then to ``size`` when given (the image's original size before test-time resizing).
        Any input size works: the image is zero-padded to whole patches and the position table resampled
        to its grid (cached per grid). Call ``.eval()`` first; argmax over dim 1 gives the labels.

        Args:
            x: (B, C, H, W) normalised images.
            size: optional (H0, W0) output size.

        Returns:
            (B, K, H, W) or (B, K, H0, W0) float logits.
        """
        logits = _resize(self(x), size=x.shape[-2:], align_corners=self.decode_head.align_corners)
        if size is not None:
            logits = _resize(logits, size=to_2tuple(size), align_corners=self.decode_head.align_corners)
        return logits

    def load_mmseg_checkpoint(
        self, source: Union[str, os.PathLike[str], Mapping[str, Any]], strict: bool = True
    ) -> list[str]:
        """Loads an mmseg segmentor checkpoint (``{'meta', 'state_dict', ...}`` from mmseg's model zoo, or
        a bare state dict with ``backbone.`` / ``neck.`` / ``decode_head.`` / ``auxiliary_head.`` keys).

        Args:
            source: a file (read with fastvit's restricted unpickler) or a loaded dict.
            strict: every model key must be present and every checkpoint key used.

        Returns:
            Checkpoint keys left out on purpose (``data_preprocessor.*``, ``auxiliary_head.*`` when the
            model has no auxiliary head).

        Raises:
            CheckpointError: unreadable file, or keys that do not fit (the message lists them).
            ValueError: a classifier with another number of classes.
        """
        from fastvit.checkpoints import CheckpointError
        from fastvit.checkpoints._io import read_container

        name = _source_name(source)
        sd = _segmentor_state_dict(source if isinstance(source, Mapping) else read_container(source)[1])
        if sd is None:
            raise CheckpointError(
                f"{name}: not an mmseg segmentor checkpoint (no 'backbone.' keys); for classification weights use "
                f"model.load_pretrained(path) or model.backbone.load_pretrained(path)"
            )
        return self._load_segmentor(sd, name, strict)

    def _load_segmentor(self, sd: dict[str, Tensor], name: str, strict: bool) -> list[str]:
        from fastvit.checkpoints import CheckpointError

        drop = ("data_preprocessor.",) + (("auxiliary_head.",) if self.auxiliary_head is None else ())
        left_out = sorted(k for k in sd if k.startswith(drop))
        sd = {k: v for k, v in sd.items() if k not in left_out}
        bias_key = "backbone.patch_embed.projection.bias"
        has_bias = self.backbone.patch_embed.proj.bias is not None
        if strict and (bias_key in sd) != has_bias:
            raise CheckpointError(
                f"{name}: the checkpoint {'has' if bias_key in sd else 'has no'} {bias_key} and this model "
                f"{'has one' if has_bias else 'has none'}; build the model with patch_bias={bias_key in sd} "
                f"(mmseg 1.2's ViT default is patch_bias=False, its model-zoo checkpoints have the bias)"
            )
        try:
            self.load_state_dict(sd, strict=strict)
        except RuntimeError as err:
            raise CheckpointError(f"{name}: does not fit {type(self).__name__}: {err}") from err
        return left_out

    def load_pretrained(
        self, source: Union[str, os.PathLike[str], Mapping[str, Any]], format: str = "auto"
    ) -> list[str]:
        """Loads any checkpoint a user of these models holds: an mmseg segmentor checkpoint into the
        whole model (:meth:`load_mmseg_checkpoint`, strict), classification weights (timm, DeiT, Google
        ``.npz``, mmpretrain, an mmseg backbone) into the backbone alone (:meth:`ViTBackbone.load_pretrained`).

        Args:
            source: checkpoint path or loaded dict.
            format: for classification weights, "auto" or a :data:`fastvit.checkpoints.FORMATS` name.

        Returns:
            The checkpoint keys left out on purpose.

        Raises:
            CheckpointError / ValueError: as the two loaders raise.
        """
        from fastvit.checkpoints._io import read_container

        if isinstance(source, Mapping):
            content = source
        else:
            container, content = read_container(source)
            if container == "npz":
                return self.backbone.load_pretrained(source, format)
        sd = _segmentor_state_dict(content)
        if sd is not None and any(k.startswith("decode_head.") for k in sd):
            return self._load_segmentor(sd, _source_name(source), strict=True)
        # Classification weights (or an mmseg backbone alone): fastvit.checkpoints reads every format.
        return self.backbone.load_pretrained(content if isinstance(source, Mapping) else source, format)


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

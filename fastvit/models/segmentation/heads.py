"""Conv blocks, the MultiLevelNeck, and the decode heads (UPerHead with its PPM, FCNHead, DPTHead), with
mmseg's module names so its checkpoints load with ``strict=True``."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit.models.segmentation._common import IGNORE_INDEX, Features, _resize

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

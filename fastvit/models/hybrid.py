"""R50+ViT-B/16 hybrid (ViT paper, Google's R50+ViT-B_16) with timm's ``vit_base_r50_s16_*`` names and keys.

The patch embedding is a ResNet-v2 body without pre-activation (BiT style: weight-standardised convs,
GroupNorm(32), TF "SAME" padding), stages (3, 4, 9), 1024 channels at stride 16, followed by a 1x1
projection to the token width. The projection, the class token and the position embedding run as one
``fastvit.ops.patch_embed`` (patch 1) on the feature map; the transformer is :class:`VisionTransformer`.

State-dict keys: ``patch_embed.backbone.stem.{conv,norm}``, ``patch_embed.backbone.stages.{s}.blocks.{b}.
{conv1,norm1,conv2,norm2,conv3,norm3}``, ``...blocks.0.downsample.{conv,norm}``, ``patch_embed.proj``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from fastvit import ops
from fastvit._geometry import ceil_div
from fastvit.layers.patch_embed import check_image_batch, to_2tuple, traced_grid
from fastvit.models.registry import register_variant
from fastvit.models.vit import VisionTransformer, _cfg, _create

__all__ = ["HybridEmbed", "ResNetV2", "StdConv2dSame"]


def _same_pad_amount(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> Tensor:
    """TF "SAME" padding: the output is ceil(size / stride); the odd pixel goes right/bottom."""
    ph = _same_pad_amount(x.shape[-2], kernel[0], stride[0])
    pw = _same_pad_amount(x.shape[-1], kernel[1], stride[1])
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


# FX symbolic tracing records the padding as one call (it branches on the input size), as timm wraps its own.
torch.fx.wrap("_pad_same")


class StdConv2dSame(nn.Conv2d):
    """Conv2d with weight standardisation (per output channel, biased variance, ``eps``) and TF "SAME"
    padding; static symmetric padding when stride 1 and an odd kernel give the same result (timm's rule).

    Args:
        in_channels / out_channels / kernel_size / stride: as ``nn.Conv2d``.
        bias: conv bias (the hybrid has none).
        eps: added to the weight variance; timm's hybrid uses 1e-8.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = False,
        eps: float = 1e-8,
    ):
        static = stride == 1 and (kernel_size - 1) % 2 == 0
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2 if static else 0,
            bias=bias,
        )
        self.same_pad = not static
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        # batch_norm over (1, out, in*k*k) in training mode = per-output-channel standardisation with
        # biased variance; the same kernel timm uses, so the hybrid matches it bit for bit.
        w = self.weight.reshape(1, self.out_channels, -1)
        return F.batch_norm(w, None, None, training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = _pad_same(x, self.kernel_size, self.stride)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32) followed by an optional ReLU (timm's ``GroupNormAct``; keys ``weight``, ``bias``)."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, apply_act: bool = True):
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class MaxPool2dSame(nn.MaxPool2d):
    """3x3 / 2 max-pool with TF "SAME" padding (padded with -inf)."""

    def forward(self, x: Tensor) -> Tensor:
        k, s = to_2tuple(self.kernel_size), to_2tuple(self.stride)
        return F.max_pool2d(_pad_same(x, k, s, value=-float("inf")), k, s)


class DownsampleConv(nn.Module):
    """Projection shortcut: 1x1 StdConv (stride) + GroupNorm without activation."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride)
        self.norm = GroupNormAct(out_chs, apply_act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck: conv1x1-GN-ReLU, conv3x3(stride)-GN-ReLU, conv1x1-GN, + shortcut, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        mid = out_chs // 4
        needs_proj = stride != 1 or in_chs != out_chs
        self.downsample = DownsampleConv(in_chs, out_chs, stride) if needs_proj else None
        self.conv1 = StdConv2dSame(in_chs, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, out_chs, 1)
        self.norm3 = GroupNormAct(out_chs, apply_act=False)
        self.drop_path = nn.Identity()
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *[Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1) for i in range(depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """The hybrid's CNN: stem (7x7/2 StdConv, GN, ReLU, 3x3/2 SAME max-pool) and bottleneck stages of
    width 64 * 2**i * 4 (strides 1, 2, 2, ...). Returns the NCHW feature map.

    Args:
        layers: blocks per stage; (3, 4, 9) is R50's first three stages (1024 channels at stride 16).
        in_chans: image channels.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 9), in_chans: int = 3):
        super().__init__()
        self.in_chans = in_chans
        self.stem = nn.Sequential()
        self.stem.add_module("conv", StdConv2dSame(in_chans, 64, 7, stride=2))
        self.stem.add_module("norm", GroupNormAct(64))
        self.stem.add_module("pool", MaxPool2dSame(kernel_size=3, stride=2))
        stages, in_chs = [], 64
        for i, depth in enumerate(layers):
            out_chs = 256 * 2**i
            stages.append(ResNetStage(in_chs, out_chs, 1 if i == 0 else 2, depth))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.num_features = in_chs
        self.reduction = 4 * 2 ** (len(layers) - 1)

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The output map size for an (H, W) input: every stride-2 step of SAME padding rounds up."""
        h, w = img_size
        for _ in range(int(math.log2(self.reduction))):
            h, w = ceil_div(h, 2), ceil_div(w, 2)
        return h, w

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.stages(self.stem(x)))


class HybridEmbed(nn.Module):
    """CNN features -> tokens: ``backbone`` then a ``patch_size`` projection conv (1x1 for the hybrid),
    with the prefix tokens and position embedding fused into the projection's ``ops.patch_embed``.

    Same interface as :class:`fastvit.layers.PatchEmbed` (``check_input``, ``feat_size``, ``grid_size``,
    ``num_patches``, ``set_input_size``), so :class:`VisionTransformer` drives either.
    """

    def __init__(
        self,
        backbone: ResNetV2,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
    ):
        super().__init__()
        if dynamic_img_pad:
            raise ValueError("fastvit: the hybrid's CNN pads itself (SAME); dynamic_img_pad is not supported")
        if backbone.in_chans != in_chans:
            raise ValueError(f"fastvit: backbone takes {backbone.in_chans} channels but in_chans={in_chans}")
        self.backbone = backbone
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(
            backbone.num_features, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias
        )
        self.set_input_size(img_size)

    def set_input_size(self, img_size: Union[int, tuple[int, int]]) -> None:
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        h, w = self.backbone.feat_size(img_size)
        return h // self.patch_size[0], w // self.patch_size[1]

    def check_input(self, x: Tensor) -> tuple[int, int]:
        """Validates an image batch and returns its token grid (ValueError naming the fix otherwise)."""
        grid = traced_grid(self, x)
        if grid is not None:
            return grid
        H, W = check_image_batch(x, self.in_chans, self.img_size if self.strict_img_size else None)
        return self.feat_size((H, W))

    def forward(self, x: Tensor, pos_embed: Optional[Tensor] = None, prefix_tokens: Optional[Tensor] = None) -> Tensor:
        """(B, C, H, W) -> (B, P + N, D) tokens."""
        self.check_input(x)
        feats = self.backbone(x)
        return ops.patch_embed(
            feats, self.proj.weight, self.proj.bias, patch_size=self.patch_size[0], pos_embed=pos_embed,
            prefix_tokens=prefix_tokens,
        )  # fmt: skip

    def extra_macs(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        """The projection GEMM (run through the op; the CNN's convs are counted by their own modules)."""
        h, w = self.feat_size((input_shape[-2], input_shape[-1]))
        ph, pw = self.patch_size
        return {"linear": input_shape[0] * h * w * self.embed_dim * self.proj.in_channels * ph * pw}


def _build_hybrid(cfg: dict[str, Any], img: int, **kwargs: Any) -> VisionTransformer:
    backbone = ResNetV2((3, 4, 9), in_chans=kwargs.get("in_chans", 3))

    def embed_layer(**embed_kwargs: Any) -> HybridEmbed:
        return HybridEmbed(backbone, **embed_kwargs)

    model_args = dict(img_size=img, patch_size=1, embed_dim=768, depth=12, num_heads=12, embed_layer=embed_layer)
    return _create(VisionTransformer, cfg, model_args, **kwargs)


def _hybrid_entry(name: str, img: int, tag: str, num_classes: int) -> None:
    cfg = _cfg(tag, img, num_classes) | dict(first_conv="patch_embed.backbone.stem.conv")
    doc = f"``{name}``: R50 (3, 4, 9) + ViT-B/16 at {img}x{img} (timm's configuration)."
    register_variant(name, functools.partial(_build_hybrid, cfg, img), doc, __name__)


_hybrid_entry("vit_base_r50_s16_224", 224, "orig_in21k", 0)
_hybrid_entry("vit_base_r50_s16_384", 384, "orig_in21k_ft_in1k", 1000)

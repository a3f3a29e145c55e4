"""Tiny ViTs (fastvit's and timm's, same constructor arguments) with random weights, for format tests."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
IMPLS = ("fastvit", "timm")


def _classes(impl: str) -> tuple[type, type]:
    if impl == "fastvit":
        from fastvit.models.vit import VisionTransformer, VisionTransformerDistilled
    else:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer, VisionTransformerDistilled


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn afresh (norm weights around 1), so a wrongly mapped tensor changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def tiny_vit(impl: str, distilled: bool = False, seed: int = 0, **overrides: Any) -> nn.Module:
    vit, deit = _classes(impl)
    return randomize((deit if distilled else vit)(**{**TINY, **overrides}), seed)


def tiny_hybrid(impl: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-stage (1, 1) R50-style hybrid at 32x32 (stride 8 -> 4x4 tokens)."""
    args = {**TINY, "img_size": 32, "patch_size": 1, **overrides}
    if impl == "fastvit":
        hybrid = pytest.importorskip("fastvit.models.hybrid", reason="fastvit.models.hybrid is not in this checkout")
        from fastvit.models.vit import VisionTransformer

        def embed(**kw: Any) -> nn.Module:
            return hybrid.HybridEmbed(hybrid.ResNetV2((1, 1), in_chans=kw.get("in_chans", 3)), **kw)

        return randomize(VisionTransformer(embed_layer=embed, **args), seed)
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_hybrid import HybridEmbed, _resnetv2

    embed = partial(HybridEmbed, backbone=_resnetv2(layers=(1, 1)))
    return randomize(VisionTransformer(embed_layer=embed, **args), seed)


def image_batch(size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, exact: bool = True) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    if exact:
        assert torch.equal(ya, yb), f"outputs differ: max abs diff {(ya - yb).abs().max().item():.3g}"
    else:
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)

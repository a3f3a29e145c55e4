"""R50+ViT-B/16 hybrid: exact parameter counts (reference/mission.md section 1.1) and CPU fp32 equivalence
with timm's vit_base_r50_s16_* (timm's state dict loaded strictly), at small image sizes."""

from __future__ import annotations

import pytest
import timm
import torch

import fastvit
from fastvit.models.hybrid import HybridEmbed, StdConv2dSame

from .test_vit import assert_rel, n_params


@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("vit_base_r50_s16_384", 1000, 98_950_952),
        ("vit_base_r50_s16_224", 1000, 98_659_112),
        ("vit_base_r50_s16_224", None, 97_890_112),  # timm's default: the in21k feature extractor, K=0
        ("vit_base_r50_s16_224", 21843, 114_687_379),  # 114.69M
    ],
)
def test_parameter_counts(name, num_classes, expected):
    with torch.device("meta"):
        model = fastvit.create_model(name, num_classes=num_classes)
    assert n_params(model) == expected
    assert n_params(model.patch_embed.backbone) == 11_894_848
    assert n_params(model.patch_embed.proj) == 787_200
    assert model.patch_embed.grid_size == ((24, 24) if "384" in name else (14, 14))


def test_matches_timm():
    # the whole R50 body with two ViT blocks, at a small non-square size (the CNN dominates CPU time)
    theirs = timm.create_model("vit_base_r50_s16_384", depth=2, img_size=(48, 64), num_classes=10).eval()
    ours = fastvit.create_model(
        "vit_base_r50_s16_384", depth=2, img_size=(48, 64), num_classes=10, weight_init="skip"
    ).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert_rel(ours(x), theirs(x))
        feats, inter = ours.forward_intermediates(x, indices=1)
        want_feats, want_inter = theirs.forward_intermediates(x, indices=1)
    assert_rel(feats, want_feats)
    assert_rel(inter[0], want_inter[0])


def test_dynamic_img_size_and_odd_sizes():
    # SAME padding rounds every stride-2 step up: 70 -> 35 -> 18 -> 9 -> 5 tokens per side
    theirs = timm.create_model("vit_base_r50_s16_224", depth=1, img_size=64, dynamic_img_size=True).eval()
    ours = fastvit.create_model(
        "vit_base_r50_s16_224", depth=1, img_size=64, dynamic_img_size=True, weight_init="skip"
    ).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 70, 50)
    assert ours.patch_embed.feat_size((70, 50)) == (5, 4)
    with torch.no_grad():
        assert_rel(ours.forward_features(x), theirs.forward_features(x))


def test_std_conv_standardises_per_output_channel():
    conv = StdConv2dSame(4, 6, 3, stride=2, eps=1e-8)
    w = conv.standardized_weight().flatten(1)
    torch.testing.assert_close(w.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    assert conv(torch.randn(1, 4, 9, 9)).shape == (1, 6, 5, 5)


def test_hybrid_bad_inputs():
    model = fastvit.create_model("vit_base_r50_s16_224", depth=1, img_size=64)
    assert isinstance(model.patch_embed, HybridEmbed)
    with pytest.raises(ValueError, match="3-channel images, got 4 channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match="dynamic_img_pad"):
        fastvit.create_model("vit_base_r50_s16_224", depth=1, dynamic_img_pad=True)

"""PatchEmbed and position-embedding resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed as timm_resample

from fastvit.layers import PatchEmbed, resample_abs_pos_embed
from fastvit.testing import assert_close


def test_patch_embed_is_the_strided_conv():
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    assert pe.grid_size == (4, 4) and pe.num_patches == 16
    x = torch.randn(2, 3, 32, 32)
    expected = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=8).flatten(2).transpose(1, 2)
    assert_close(pe(x), expected)
    assert pe.extra_macs((2, 3, 32, 32)) == {"linear": 2 * 16 * 16 * 3 * 8 * 8}


def test_patch_embed_bad_inputs_name_the_fix():
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    with pytest.raises(ValueError, match="3-channel images, got 1 channels"):
        pe(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        pe(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pe(torch.randn(3, 32, 32))
    loose = PatchEmbed(img_size=32, patch_size=8, embed_dim=16, strict_img_size=False)
    with pytest.raises(ValueError, match="dynamic_img_pad=True"):
        loose(torch.randn(1, 3, 36, 32))
    padded = PatchEmbed(img_size=32, patch_size=8, embed_dim=16, strict_img_size=False, dynamic_img_pad=True)
    assert padded(torch.randn(1, 3, 36, 30)).shape == (1, 5 * 4, 16)


@pytest.mark.parametrize("new_size", [(7, 5), (3, 3), (4, 4)])
def test_resample_timm_convention_matches_timm(new_size):
    pos = torch.randn(1, 1 + 16, 8)
    ours = resample_abs_pos_embed(pos, new_size, (4, 4), num_prefix_tokens=1, interp="timm")
    assert_close(ours, timm_resample(pos, list(new_size), [4, 4], num_prefix_tokens=1))
    if new_size == (4, 4):
        assert ours is pos


@pytest.mark.parametrize(
    "interp, mode, antialias",
    [("npz", "bilinear", False), ("mmseg", "bicubic", False), ("mmpretrain", "bicubic", False)],
)
def test_resample_source_conventions(interp, mode, antialias):
    pos = torch.randn(1, 2 + 36, 4)
    grid = pos[:, 2:].reshape(1, 6, 6, 4).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 9), mode=mode, align_corners=False, antialias=antialias)
    expected = torch.cat([pos[:, :2], expected.permute(0, 2, 3, 1).reshape(1, 36, 4)], dim=1)
    assert_close(resample_abs_pos_embed(pos, (4, 9), (6, 6), num_prefix_tokens=2, interp=interp), expected)


def test_resample_bad_arguments():
    with pytest.raises(ValueError, match="unknown pos-embed interpolation"):
        resample_abs_pos_embed(torch.randn(1, 5, 4), (3, 3), interp="nearest")
    with pytest.raises(ValueError, match="not the old grid"):
        resample_abs_pos_embed(torch.randn(1, 1 + 12, 4), (3, 3), (4, 4))

"""Segmentors (fastvit.models.segmentation): mmseg state-dict layout and parameter counts derived from
the mmseg configurations, output shapes at 512x512 and 512x683, any-size inference with the cached
position table, backbone weights from timm / npz, the training losses, and clear errors on bad input.

mmseg itself is not installed here, so the layout is checked against a key/shape table written below
from mmseg's module definitions (``reference/mission.md`` section 4), not against mmseg objects.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import timm
import torch
import torch.nn.functional as F

import fastvit
from fastvit.checkpoints import CheckpointError
from fastvit.checkpoints.mmseg import timm_to_mmseg
from fastvit.checkpoints.npz import save_npz, timm_to_npz
from fastvit.layers import resample_abs_pos_embed
from fastvit.models.segmentation import EncoderDecoder, ViTBackbone

UPERNET = {
    # name: (D, heads, MLN neck, final norm), from configs/vit/*.py (mission.md 1.5 / 4.3)
    "upernet_vit_b16_mln_512": (768, 12, True, False),
    "upernet_vit_b16_ln_mln_512": (768, 12, True, True),
    "upernet_deit_s16_512": (384, 6, False, False),
    "upernet_deit_s16_mln_512": (384, 6, True, False),
    "upernet_deit_s16_ln_mln_512": (384, 6, True, True),
    "upernet_deit_b16_512": (768, 12, False, False),
    "upernet_deit_b16_mln_512": (768, 12, True, False),
    "upernet_deit_b16_ln_mln_512": (768, 12, True, True),
}
K = 150  # ADE20K

# Reduced widths with the full geometry (patch 16, 12 blocks, outputs of blocks 2/5/8/11, the same
# neck scales, PPM bins, strides and resize layers), cheap enough for CPU forwards.
SMALL_UPERNET = dict(embed_dim=32, num_heads=2, channels=32, aux_channels=16)
SMALL_DPT = dict(embed_dim=32, num_heads=2, channels=16, post_process_channels=(8, 16, 24, 32))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """max |actual - expected| <= rtol * max |expected| (fp32 reordering noise of a deep network)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} x max |expected| {scale:.3g}"


def on_meta(name: str, **kwargs) -> EncoderDecoder:
    with torch.device("meta"):
        return fastvit.create_model(name, **kwargs)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BN statistic drawn afresh, so a misplaced tensor changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen) * 0.2
                positive = name.endswith(
                    ("running_var", "ln1.weight", "ln2.weight", "norm1.weight", "norm2.weight", "bn.weight")
                )
                t.copy_(noise.abs() + 0.5 if positive else noise)
    return model.eval()


# ----------------------------------------------------- mmseg layout, derived from the mmseg modules


def _conv_module(prefix: str, cin: int, cout: int, k: int, norm: bool, bias: Optional[bool] = None) -> dict:
    """mmcv ConvModule: conv (bias only without a norm, unless forced) + bn (SyncBN/BN keys)."""
    spec = {f"{prefix}.conv.weight": (cout, cin, k, k)}
    if (not norm) if bias is None else bias:
        spec[f"{prefix}.conv.bias"] = (cout,)
    if norm:
        spec.update({f"{prefix}.bn.{n}": (cout,) for n in ("weight", "bias", "running_mean", "running_var")})
        spec[f"{prefix}.bn.num_batches_tracked"] = ()
    return spec


def mmseg_backbone_spec(D: int, grid: int, final_norm: bool) -> dict:
    """mmseg VisionTransformer: cls_token, pos_embed, PatchEmbed.projection, 12 TransformerEncoderLayers
    (ln1, attn.attn = nn.MultiheadAttention, ln2, ffn.layers.0.0 / ffn.layers.1), final ``ln1``."""
    spec = {"backbone.cls_token": (1, 1, D), "backbone.pos_embed": (1, grid * grid + 1, D),
            "backbone.patch_embed.projection.weight": (D, 3, 16, 16),
            "backbone.patch_embed.projection.bias": (D,)}  # fmt: skip
    for i in range(12):
        p = f"backbone.layers.{i}"
        spec.update({
            f"{p}.ln1.weight": (D,), f"{p}.ln1.bias": (D,),
            f"{p}.attn.attn.in_proj_weight": (3 * D, D), f"{p}.attn.attn.in_proj_bias": (3 * D,),
            f"{p}.attn.attn.out_proj.weight": (D, D), f"{p}.attn.attn.out_proj.bias": (D,),
            f"{p}.ln2.weight": (D,), f"{p}.ln2.bias": (D,),
            f"{p}.ffn.layers.0.0.weight": (4 * D, D), f"{p}.ffn.layers.0.0.bias": (4 * D,),
            f"{p}.ffn.layers.1.weight": (D, 4 * D), f"{p}.ffn.layers.1.bias": (D,),
        })  # fmt: skip
    if final_norm:
        spec.update({"backbone.ln1.weight": (D,), "backbone.ln1.bias": (D,)})
    return spec


def mmseg_upernet_spec(D: int, mln: bool, final_norm: bool, C: int = 512, aux: int = 256) -> dict:
    spec = mmseg_backbone_spec(D, 32, final_norm)
    if mln:  # MultiLevelNeck: 1x1 lateral_convs and 3x3 convs, plain convs with bias
        for i in range(4):
            spec.update(_conv_module(f"neck.lateral_convs.{i}", D, D, 1, norm=False))
            spec.update(_conv_module(f"neck.convs.{i}", D, D, 3, norm=False))
    for i in range(4):  # UPerHead: PPM stages are Sequential(AdaptiveAvgPool2d, ConvModule) -> ".1"
        spec.update(_conv_module(f"decode_head.psp_modules.{i}.1", D, C, 1, norm=True))
    spec.update(_conv_module("decode_head.bottleneck", D + 4 * C, C, 3, norm=True))
    for i in range(3):
        spec.update(_conv_module(f"decode_head.lateral_convs.{i}", D, C, 1, norm=True))
        spec.update(_conv_module(f"decode_head.fpn_convs.{i}", C, C, 3, norm=True))
    spec.update(_conv_module("decode_head.fpn_bottleneck", 4 * C, C, 3, norm=True))
    spec.update({"decode_head.conv_seg.weight": (K, C, 1, 1), "decode_head.conv_seg.bias": (K,)})
    spec.update(_conv_module("auxiliary_head.convs.0", D, aux, 3, norm=True))
    spec.update({"auxiliary_head.conv_seg.weight": (K, aux, 1, 1), "auxiliary_head.conv_seg.bias": (K,)})
    return spec


def mmseg_dpt_spec(D: int = 768, C: int = 256, post=(96, 192, 384, 768)) -> dict:
    spec = mmseg_backbone_spec(D, 14, final_norm=False)  # img_size=224: a 14x14 table
    r = "decode_head.reassemble_blocks"
    for i, c in enumerate(post):
        spec.update(_conv_module(f"{r}.projects.{i}", D, c, 1, norm=False))
        spec.update({f"{r}.readout_projects.{i}.0.weight": (D, 2 * D), f"{r}.readout_projects.{i}.0.bias": (D,)})
    spec.update({f"{r}.resize_layers.0.weight": (post[0], post[0], 4, 4), f"{r}.resize_layers.0.bias": (post[0],),
                 f"{r}.resize_layers.1.weight": (post[1], post[1], 2, 2), f"{r}.resize_layers.1.bias": (post[1],),
                 f"{r}.resize_layers.3.weight": (post[3], post[3], 3, 3),
                 f"{r}.resize_layers.3.bias": (post[3],)})  # fmt: skip
    for i, c in enumerate(post):
        spec.update(_conv_module(f"decode_head.convs.{i}", c, C, 3, norm=False, bias=False))
    for i in range(4):
        f = f"decode_head.fusion_blocks.{i}"
        spec.update(_conv_module(f"{f}.project", C, C, 1, norm=False, bias=True))
        for unit in ("res_conv_unit1", "res_conv_unit2") if i else ("res_conv_unit2",):
            for conv in ("conv1", "conv2"):
                spec.update(_conv_module(f"{f}.{unit}.{conv}", C, C, 3, norm=True, bias=False))
    spec.update(_conv_module("decode_head.project", C, C, 3, norm=True))
    spec.update({"decode_head.conv_seg.weight": (K, C, 1, 1), "decode_head.conv_seg.bias": (K,)})
    return spec


def shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(UPERNET))
def test_upernet_state_dict_is_mmseg_layout(name):
    D, _, mln, final_norm = UPERNET[name]
    assert shapes(on_meta(name)) == mmseg_upernet_spec(D, mln, final_norm)


def test_dpt_state_dict_is_mmseg_layout():
    assert shapes(on_meta("dpt_vit_b16_512")) == mmseg_dpt_spec()


# ------------------------------------------------------ parameter counts, layer-by-layer from configs


def backbone_params(D: int, tokens: int, final_norm: bool) -> int:
    patch = 3 * 16 * 16 * D + D  # 16x16 conv, bias
    embed = D + tokens * D  # cls_token + pos_embed (grid + cls rows)
    block = (
        2 * D  # ln1
        + 3 * D * D
        + 3 * D  # in_proj (q, k, v)
        + D * D
        + D  # out_proj
        + 2 * D  # ln2
        + 4 * D * D
        + 4 * D  # ffn fc1 (mlp_ratio 4)
        + 4 * D * D
        + D
    )  # ffn fc2
    return patch + embed + 12 * block + (2 * D if final_norm else 0)  # fmt: skip


def mln_params(D: int) -> int:
    return 4 * (D * D + D) + 4 * (9 * D * D + D)  # 4 lateral 1x1 + 4 output 3x3, all with bias


def bn(c: int) -> int:
    return 2 * c  # weight + bias (running stats are buffers)


def upernet_head_params(D: int, C: int = 512) -> int:
    psp = 4 * (D * C + bn(C))  # pool scales (1, 2, 3, 6): 1x1 conv + BN each
    bottleneck = (D + 4 * C) * C * 9 + bn(C)  # 3x3 on [x, 4 pooled maps]
    laterals = 3 * (D * C + bn(C))  # 1x1 on levels 0-2
    fpn = 3 * (C * C * 9 + bn(C))  # 3x3 on levels 0-2
    fuse = 4 * C * C * 9 + bn(C)  # fpn_bottleneck 3x3 on the 4 levels
    return psp + bottleneck + laterals + fpn + fuse + C * K + K  # + conv_seg


def fcn_aux_params(D: int, C: int = 256) -> int:
    return D * C * 9 + bn(C) + C * K + K  # one 3x3 ConvModule + conv_seg


def dpt_head_params(D: int = 768, C: int = 256, post=(96, 192, 384, 768)) -> int:
    readout = 4 * (2 * D * D + D)  # Linear(2D -> D) per level ('project')
    projects = sum(D * c + c for c in post)  # 1x1 conv + bias per level
    resize = (
        post[0] ** 2 * 16
        + post[0]  # ConvTranspose k4 s4
        + post[1] ** 2 * 4
        + post[1]  # ConvTranspose k2 s2
        + post[3] ** 2 * 9
        + post[3]
    )  # (Identity), Conv3x3 s2
    convs = sum(c * C * 9 for c in post)  # 3x3, no bias, no norm
    unit = 2 * (C * C * 9 + bn(C))  # PreActResidualConvUnit: 2 x (conv no bias + BN)
    fusion = 4 * (C * C + C) + 7 * unit  # 4 projects; 4 + 3 units (block 0 has no skip unit)
    project = C * C * 9 + bn(C)
    return readout + projects + resize + convs + fusion + project + C * K + K  # fmt: skip


@pytest.mark.parametrize("name", sorted(UPERNET))
def test_upernet_parameter_counts(name):
    D, _, mln, final_norm = UPERNET[name]
    model = on_meta(name)
    assert n_params(model.backbone) == backbone_params(D, 32 * 32 + 1, final_norm)
    if mln:
        assert n_params(model.neck) == mln_params(D)
    else:
        assert model.neck is None
    assert n_params(model.decode_head) == upernet_head_params(D)
    assert n_params(model.auxiliary_head) == fcn_aux_params(D)
    expected = (
        backbone_params(D, 1025, final_norm)
        + (mln_params(D) if mln else 0)
        + upernet_head_params(D)
        + fcn_aux_params(D)
    )
    assert n_params(model) == expected


def test_parameter_counts_known_values():
    # The formulas above evaluated once by hand, so a shared mistake in formula and model is caught
    # for the headline rows: ViT-B + MLN 144.17M (UPerNet), DeiT-S 52.09M, DPT ViT-B 109.71M.
    assert (
        backbone_params(768, 1025, False) + mln_params(768) + upernet_head_params(768) + fcn_aux_params(768)
        == 144_173_612
    )
    assert backbone_params(384, 1025, False) + upernet_head_params(384) + fcn_aux_params(384) == 52_093_868
    assert backbone_params(768, 197, False) + dpt_head_params() == 109_705_046


def test_dpt_parameter_count():
    model = on_meta("dpt_vit_b16_512")
    assert model.neck is None and model.auxiliary_head is None  # the DPT config has neither
    assert n_params(model.backbone) == backbone_params(768, 14 * 14 + 1, False)
    assert n_params(model.decode_head) == dpt_head_params()
    assert n_params(model) == backbone_params(768, 197, False) + dpt_head_params()


def test_num_classes_override_and_defaults():
    model = on_meta("upernet_deit_s16_mln_512", num_classes=19)
    assert model.decode_head.conv_seg.out_channels == 19 and model.auxiliary_head.conv_seg.out_channels == 19
    model = on_meta("upernet_vit_b16_ln_mln_512")
    assert model.num_classes == 150 and model.pretrained_cfg["input_size"] == (3, 512, 512)
    assert model.backbone.has_final_norm and model.backbone.blocks[0].norm1.eps == 1e-6
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    dpt = on_meta("dpt_vit_b16_512")
    assert dpt.backbone.blocks[0].norm1.eps == 1e-5 and dpt.backbone.grad_checkpointing


# ------------------------------------------------------------------------------- output shapes


def test_full_size_upernet_deit_s16_shapes():
    # The one full-width model run on CPU (DeiT-S has the cheapest full-size head); the others run
    # at reduced widths with the same geometry below.
    model = fastvit.create_model("upernet_deit_s16_512").eval()
    seen = {}
    model.decode_head.register_forward_hook(lambda m, i, o: seen.update(logits=o.shape))
    out = model.predict(torch.randn(1, 3, 512, 683))
    # 683 is padded to 688: a 32x43 grid; no neck, so UPerHead works on four 1/16 maps.
    assert seen["logits"] == (1, K, 32, 43)
    assert out.shape == (1, K, 512, 683) and torch.isfinite(out).all()
    assert set(model.backbone._pos_cache) == {(32, 43)}
    with torch.no_grad():  # the training crop: 1025 tokens, the stored 32x32 table as is
        assert model(torch.randn(1, 3, 512, 512)).shape == (1, K, 32, 32)
    assert set(model.backbone._pos_cache) == {(32, 43)}


@pytest.mark.parametrize(
    "name, kwargs, hw, logits_hw",
    [
        ("upernet_vit_b16_mln_512", SMALL_UPERNET, (512, 512), (128, 128)),  # MLN: strides 4..32, logits at 1/4
        ("upernet_vit_b16_mln_512", SMALL_UPERNET, (512, 683), (128, 172)),  # 32x43 grid x 4
        ("upernet_deit_b16_512", SMALL_UPERNET, (512, 512), (32, 32)),  # no neck: 1/16
        ("dpt_vit_b16_512", SMALL_DPT, (512, 512), (256, 256)),  # DPT: 1/2
        ("dpt_vit_b16_512", SMALL_DPT, (512, 683), (256, 352)),  # 43 -> 22 (s2 conv) -> x2 four times
    ],
)
def test_output_shapes(name, kwargs, hw, logits_hw):
    model = fastvit.create_model(name, **kwargs).eval()
    seen = {}
    model.decode_head.register_forward_hook(lambda m, i, o: seen.update(logits=o))
    out = model.predict(torch.randn(1, 3, *hw))
    assert seen["logits"].shape == (1, K, *logits_hw)
    assert out.shape == (1, K, *hw)
    # predict = the head's logits resized bilinearly (align_corners=False) to the input size.
    torch.testing.assert_close(out, F.interpolate(seen["logits"], size=hw, mode="bilinear", align_corners=False))


def test_predict_to_original_size():
    model = fastvit.create_model("dpt_vit_b16_512", **SMALL_DPT).eval()
    x = torch.randn(2, 3, 48, 64)
    at_input = model.predict(x)
    out = model.predict(x, size=(100, 120))  # mmseg's postprocess: back to the image's original size
    torch.testing.assert_close(out, F.interpolate(at_input, size=(100, 120), mode="bilinear", align_corners=False))


def test_backbone_levels_and_neck_strides():
    model = fastvit.create_model("upernet_vit_b16_mln_512", **SMALL_UPERNET).eval()
    x = torch.randn(2, 3, 512, 683)
    with torch.no_grad():
        feats = model.backbone(x)
        assert [f.shape for f in feats] == [(2, 32, 32, 43)] * 4
        neck = model.neck(feats)
    assert [tuple(f.shape[-2:]) for f in neck] == [(128, 172), (64, 86), (32, 43), (16, 21)]


def test_final_norm_applies_to_the_last_level_only():
    plain = randomize(ViTBackbone(img_size=64, embed_dim=32, num_heads=2, final_norm=False))
    normed = ViTBackbone(img_size=64, embed_dim=32, num_heads=2, final_norm=True).eval()
    sd = plain.state_dict()
    sd.update({"ln1.weight": torch.rand(32) + 0.5, "ln1.bias": torch.randn(32)})
    normed.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), normed(x)
    for i in range(3):
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=0)
    expected = F.layer_norm(a[3].permute(0, 2, 3, 1), (32,), sd["ln1.weight"], sd["ln1.bias"], eps=1e-6).permute(
        0, 3, 1, 2
    )
    torch.testing.assert_close(b[3], expected)


# ------------------------------------------------------- any input size: position table per grid


def _bicubic(pos: torch.Tensor, old: tuple, new: tuple) -> torch.Tensor:
    D = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, *old, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)


def test_pos_embed_resampled_bicubic_and_cached_per_grid():
    backbone = randomize(ViTBackbone(img_size=64, embed_dim=32, num_heads=2))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 80))
        first = backbone._pos_cache[(4, 5)]
        torch.testing.assert_close(first, _bicubic(backbone.pos_embed, (4, 4), (4, 5)))
        backbone(torch.randn(1, 3, 70, 80))  # 70 pads to 80: a 5x5 grid
        backbone(torch.randn(2, 3, 64, 80))
        assert backbone._pos_cache[(4, 5)] is first and set(backbone._pos_cache) == {(4, 5), (5, 5)}
        backbone.pos_embed.add_(1.0)  # any change of the table (optimizer step, load) invalidates
        backbone(torch.randn(1, 3, 64, 80))
        torch.testing.assert_close(backbone._pos_cache[(4, 5)], first + 1.0)
        assert set(backbone._pos_cache) == {(4, 5)}
    with torch.inference_mode():  # cached as an ordinary tensor: usable by a later autograd pass
        backbone(torch.randn(1, 3, 80, 64))
    assert not backbone._pos_cache[(5, 4)].is_inference()
    backbone.pos_embed.requires_grad_(False)  # a frozen backbone under a trained head
    image = torch.randn(1, 3, 80, 64, requires_grad=True)
    sum(f.sum() for f in backbone(image)).backward()
    assert image.grad is not None
    backbone.float()  # moving / casting the model empties the cache
    assert backbone._pos_cache == {}


def test_pos_embed_resampling_is_differentiable_in_training():
    backbone = ViTBackbone(img_size=64, embed_dim=32, num_heads=2).train()
    feats = backbone(torch.randn(1, 3, 64, 80))
    sum(f.sum() for f in feats).backward()
    assert backbone._pos_cache == {} and backbone.pos_embed.grad is not None
    assert backbone.pos_embed.grad.abs().sum() > 0


# -------------------------------------------------------------------- mmseg state-dict round trip


def test_mmseg_state_dict_round_trip(tmp_path):
    src = randomize(fastvit.create_model("upernet_deit_s16_mln_512", **SMALL_UPERNET), seed=1)
    dst = fastvit.create_model("upernet_deit_s16_mln_512", **SMALL_UPERNET).eval()
    sd = src.state_dict()
    assert not any(".blocks." in k or ".norm1." in k for k in sd)  # mmseg names only
    # The backbone part is exactly what vit2mmseg makes of the backbone's timm-named parameters.
    timm_named = {k: v for k, v in src.backbone.named_parameters()}
    converted = {f"backbone.{k}": v for k, v in timm_to_mmseg(timm_named).items()}
    assert list(converted) == [k for k in sd if k.startswith("backbone.")]
    assert all(torch.equal(v, sd[k]) for k, v in converted.items())
    # The backbone also takes its own timm-named tensors (the load hook renames mmseg keys only).
    dst.backbone.load_state_dict({k: torch.zeros_like(v) for k, v in timm_named.items()}, strict=True)
    assert dst.backbone.blocks[0].attn.qkv.weight.abs().sum() == 0
    missing_unexpected = dst.load_state_dict(sd, strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # An mmseg model-zoo file: {'meta', 'state_dict'}, read with fastvit's checkpoint reader.
    path = tmp_path / "upernet.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": sd}, path)
    other = fastvit.create_model("upernet_deit_s16_mln_512", **SMALL_UPERNET).eval()
    assert other.load_mmseg_checkpoint(path) == []
    with torch.no_grad():
        torch.testing.assert_close(other(x), src(x), rtol=0, atol=0)


def test_dpt_state_dict_round_trip():
    src = randomize(fastvit.create_model("dpt_vit_b16_512", **SMALL_DPT), seed=2)
    dst = fastvit.create_model("dpt_vit_b16_512", **SMALL_DPT).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ------------------------------------------------------------ backbone weights from timm / npz


def tiny_timm(img_size: int = 64, **kwargs) -> torch.nn.Module:
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=32, depth=12, num_heads=2, num_classes=10, **kwargs
    )
    return randomize(model, seed=3)


@pytest.mark.parametrize("final_norm", [False, True])
def test_backbone_from_timm_matches_timm_intermediates(final_norm):
    theirs = tiny_timm()
    ours = ViTBackbone(img_size=64, embed_dim=32, num_heads=2, final_norm=final_norm).eval()
    left_out = ours.load_pretrained(theirs.state_dict())
    assert left_out == (
        ["head.bias", "head.weight"] if final_norm else ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = ours(x)
        expected = theirs.forward_intermediates(
            x, indices=[2, 5, 8, 11], norm=False, output_fmt="NCHW", intermediates_only=True
        )
        if final_norm:
            expected[3] = theirs.forward_features(x)[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backbone_from_timm_224_resamples_pos_embed_to_512_grid():
    theirs = tiny_timm(img_size=224)
    model = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET, backbone_pretrained=None)
    model.backbone.load_pretrained(theirs.state_dict())
    expected = _bicubic(theirs.pos_embed.detach(), (14, 14), (32, 32))  # mmseg: bicubic, no antialias
    torch.testing.assert_close(model.backbone.pos_embed.detach(), expected)
    torch.testing.assert_close(model.backbone.blocks[7].attn.qkv.weight, theirs.blocks[7].attn.qkv.weight)


def test_backbone_from_npz(tmp_path):
    theirs = tiny_timm(img_size=64)
    path = tmp_path / "vit.npz"
    save_npz(timm_to_npz(theirs.state_dict(), num_heads=2), path)
    model = fastvit.create_model("upernet_deit_b16_512", **SMALL_UPERNET, img_size=64, backbone_pretrained=str(path))
    torch.testing.assert_close(model.backbone.blocks[3].mlp.fc2.weight, theirs.blocks[3].mlp.fc2.weight)
    torch.testing.assert_close(model.backbone.pos_embed, theirs.pos_embed)


def test_load_pretrained_dispatches_segmentor_and_classification_checkpoints(tmp_path):
    src = randomize(fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET), seed=5)
    path = tmp_path / "seg.pth"
    torch.save({"meta": {}, "state_dict": src.state_dict()}, path)
    model = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET).eval()
    assert model.load_pretrained(path) == []  # a segmentor checkpoint: the whole model, strict
    torch.testing.assert_close(model.decode_head.conv_seg.weight, src.decode_head.conv_seg.weight)
    theirs = tiny_timm(img_size=224)
    model.load_pretrained(theirs.state_dict())  # classification weights: the backbone alone
    torch.testing.assert_close(model.backbone.blocks[0].attn.proj.weight, theirs.blocks[0].attn.proj.weight)
    torch.testing.assert_close(model.decode_head.conv_seg.weight, src.decode_head.conv_seg.weight)


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_load_pretrained_reads_a_classification_file_once(tmp_path, monkeypatch, suffix):
    """EncoderDecoder.load_pretrained looks at the file's keys to tell a segmentor from classification
    weights; the backbone then loads that same content instead of reading the file a second time."""
    from fastvit.checkpoints import _io, mmseg, reader

    theirs = tiny_timm(img_size=224)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".npz":
        save_npz(timm_to_npz(theirs.state_dict(), num_heads=2), path)
    else:
        torch.save({"state_dict": theirs.state_dict()}, path)
    reads = []

    def counting(p):
        reads.append(p)
        return _io.read_container(p)

    monkeypatch.setattr(mmseg, "read_container", counting)
    monkeypatch.setattr(reader, "read_container", counting)
    model = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET)
    left_out = model.load_pretrained(path)
    assert reads == [path]
    assert left_out == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    torch.testing.assert_close(model.backbone.blocks[9].attn.qkv.weight, theirs.blocks[9].attn.qkv.weight)
    with pytest.raises(CheckpointError, match=f"{path}.*it does not fit this backbone"):
        fastvit.create_model("upernet_deit_b16_512", **{**SMALL_UPERNET, "embed_dim": 64}).load_pretrained(path)


def test_create_model_pretrained_path_uses_the_segmentor_loader(tmp_path):
    """create_model(..., pretrained=PATH) hands a segmentor checkpoint to model.load_pretrained (whole model)."""
    src = randomize(fastvit.create_model("upernet_vit_b16_mln_512", **SMALL_UPERNET), seed=6)
    path = tmp_path / "upernet_vit_b16_mln.pth"
    torch.save({"meta": {}, "state_dict": src.state_dict()}, path)
    model = fastvit.create_model("upernet_vit_b16_mln_512", pretrained=str(path), **SMALL_UPERNET).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


# -------------------------------------------------------------------------------- training losses


def test_training_forward_losses_and_gradients():
    model = fastvit.create_model(
        "upernet_deit_s16_mln_512", **SMALL_UPERNET, dropout_ratio=0.0, drop_path_rate=0.0
    ).train()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, K, (2, 64, 64))
    labels[:, :10] = 255  # ignored rows
    losses = model(x, labels)
    assert set(losses) == {"loss", "decode.loss_ce", "decode.acc_seg", "aux.loss_ce", "aux.acc_seg"}
    # mmseg's CrossEntropyLoss: logits resized to the labels, CE with ignore 255, averaged over ALL
    # pixels (avg_non_ignore=False); the FCN auxiliary head weighted 0.4.
    feats = model.extract_feat(x)
    for head, key, weight in ((model.decode_head, "decode.loss_ce", 1.0), (model.auxiliary_head, "aux.loss_ce", 0.4)):
        logits = F.interpolate(head(feats), size=(64, 64), mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="sum") / labels.numel()
        torch.testing.assert_close(losses[key], weight * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], losses["decode.loss_ce"] + losses["aux.loss_ce"])
    losses["loss"].backward()
    assert model.backbone.pos_embed.grad.abs().sum() > 0 and model.auxiliary_head.conv_seg.weight.grad.abs().sum() > 0


def test_all_ignored_labels_give_zero_loss():
    model = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET).train()
    losses = model(torch.randn(2, 3, 32, 32), torch.full((2, 1, 32, 32), 255))
    assert losses["loss"].item() == 0.0 and losses["decode.acc_seg"].item() == 0.0


# -------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_mln():
    return fastvit.create_model("upernet_vit_b16_mln_512", **SMALL_UPERNET).eval()


def test_wrong_channel_count(small_mln):
    with pytest.raises(ValueError, match="3-channel images, got 1 channels"):
        small_mln(torch.randn(1, 1, 64, 64))


def test_image_smaller_than_a_patch():
    model = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET).eval()
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        model(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        model.backbone(torch.randn(1, 3, 64, 15))


def test_image_too_small_for_the_neck(small_mln):
    with pytest.raises(ValueError, match="at least 17 pixels"):  # a 1x1 grid cannot be halved
        small_mln(torch.randn(1, 3, 16, 64))
    assert small_mln(torch.randn(1, 3, 17, 17)).shape == (1, K, 8, 8)


def test_non_float_image(small_mln):
    with pytest.raises(TypeError, match=r"floating-point.*\.float\(\)"):
        small_mln(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_checkpoint_with_other_num_classes():
    ade = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET)
    city = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET, num_classes=19)
    with pytest.raises(ValueError, match="conv_seg has 150 classes, this model 19; build it with num_classes=150"):
        city.load_state_dict(ade.state_dict())


def test_checkpoint_with_other_layout():
    model = fastvit.create_model("upernet_deit_s16_mln_512", **SMALL_UPERNET)
    no_neck = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET)
    with pytest.raises(CheckpointError, match=r"Missing key\(s\).*neck\.lateral_convs"):
        model.load_mmseg_checkpoint(no_neck.state_dict())
    with pytest.raises(CheckpointError, match="not an mmseg segmentor checkpoint"):
        model.load_mmseg_checkpoint(tiny_timm().state_dict())


def test_backbone_rejects_distilled_and_other_widths():
    backbone = ViTBackbone(img_size=64, embed_dim=32, num_heads=2)
    distilled = timm.models.deit.VisionTransformerDistilled(
        img_size=64, patch_size=16, embed_dim=32, depth=12, num_heads=2
    )
    with pytest.raises(CheckpointError, match="distilled DeiT"):
        backbone.load_pretrained(distilled.state_dict())
    wider = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=64, depth=12, num_heads=2
    )
    with pytest.raises(CheckpointError, match="does not fit this backbone"):
        backbone.load_pretrained(wider.state_dict())


def test_backbone_refuses_a_non_square_pos_table_with_the_fix():
    """A table whose grid cannot be inferred (not a square) names the resampling call that fixes it."""
    backbone = ViTBackbone(img_size=64, embed_dim=32, num_heads=2)
    sd = tiny_timm(img_size=(32, 64)).state_dict()  # a 2x4 grid: 8 rows + the class token
    with pytest.raises(
        CheckpointError,
        match=r"pos_embed \(1, 9, 32\) cannot be resampled.*square grid only.*"
        r"resample_abs_pos_embed\(pos_embed, \(4, 4\), old_size=\(h, w\), interp='mmseg'\)",
    ):
        backbone.load_pretrained(sd)
    # The fix the message gives works: resampled by hand, the table loads (and is taken as it is).
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (4, 4), old_size=(2, 4), interp="mmseg")
    backbone.load_pretrained(sd)
    torch.testing.assert_close(backbone.pos_embed.detach(), sd["pos_embed"])


def test_model_loaders_are_the_checkpoints_mmseg_functions(tmp_path):
    """The model methods are thin calls: fastvit.checkpoints.mmseg's public loaders give the same result."""
    from fastvit.checkpoints import mmseg

    src = randomize(fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET), seed=8)
    path = tmp_path / "seg.pth"
    torch.save({"meta": {}, "state_dict": {**src.state_dict(), "data_preprocessor.mean": torch.zeros(3)}}, path)
    by_method = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET).eval()
    by_function = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET).eval()
    assert by_method.load_mmseg_checkpoint(path) == ["data_preprocessor.mean"]
    assert mmseg.load_segmentor_checkpoint(by_function, path) == ["data_preprocessor.mean"]
    assert mmseg.load_segmentor_pretrained(by_function, path) == ["data_preprocessor.mean"]
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(by_function(x), by_method(x), rtol=0, atol=0)
        torch.testing.assert_close(by_function(x), src(x), rtol=0, atol=0)
    theirs = tiny_timm().state_dict()
    left_out = mmseg.load_backbone(by_function.backbone, theirs)
    assert (
        left_out
        == by_method.backbone.load_pretrained(theirs)
        == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    )
    torch.testing.assert_close(by_function.backbone.blocks[4].mlp.fc1.weight, theirs["blocks.4.mlp.fc1.weight"])
    with pytest.raises(CheckpointError, match="not an mmseg segmentor checkpoint.*backbone.load_pretrained"):
        mmseg.load_segmentor_checkpoint(by_function, theirs)


def test_bad_labels(small_mln):
    model = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET).train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match="integer tensor"):
        model(x, torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, 1, H, W\) with B=2"):
        model(x, torch.zeros(3, 32, 32, dtype=torch.long))
    bad = torch.zeros(2, 32, 32, dtype=torch.long)
    bad[0, 0, 0] = 150
    with pytest.raises(ValueError, match=r"values \[150\] outside 0..149"):
        model(x, bad)
    model.check_labels = False  # trusted data: no device read-back per step
    with pytest.raises((IndexError, RuntimeError)):  # then torch's own error (a device assert on CUDA)
        model(x, bad)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="output_cls_token=True needs with_cls_token=True"):
        ViTBackbone(embed_dim=32, num_heads=2, with_cls_token=False, output_cls_token=True)
    with pytest.raises(ValueError, match="out_indices entry 12"):
        ViTBackbone(embed_dim=32, num_heads=2, out_indices=(2, 5, 8, 12))


def test_patch_bias_option_for_mmseg_1x_state_dicts():
    with_bias = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET)
    without = fastvit.create_model("upernet_deit_s16_512", **SMALL_UPERNET, patch_bias=False)
    assert "backbone.patch_embed.projection.bias" not in without.state_dict()
    assert n_params(with_bias) - n_params(without) == 32
    with pytest.raises(CheckpointError, match="build the model with patch_bias=False"):
        with_bias.load_mmseg_checkpoint(without.state_dict())
    without.eval()(torch.randn(1, 3, 32, 32))  # the patch op runs without a bias
    assert "patch_embed.proj.bias" in without.backbone.load_pretrained(tiny_timm().state_dict())


# --------------------------------------------------------------------- against mmseg, where installed


def _mmseg_configs() -> dict:
    """Small-width mmseg configs with the structure of configs/_base_/models/upernet_vit-b16_ln_mln.py
    and dpt_vit-b16.py (patch_bias=True: the model-zoo checkpoints' backbone)."""
    bn = dict(type="BN", requires_grad=True)
    ce = dict(type="CrossEntropyLoss", use_sigmoid=False)
    vit = dict(
        type="VisionTransformer", embed_dims=32, num_layers=12, num_heads=2, out_indices=(2, 5, 8, 11), patch_bias=True
    )
    upernet = dict(
        backbone=dict(vit, img_size=(64, 64), qkv_bias=True, norm_cfg=dict(type="LN", eps=1e-6), final_norm=True),
        neck=dict(type="MultiLevelNeck", in_channels=[32] * 4, out_channels=32, scales=[4, 2, 1, 0.5]),
        decode_head=dict(type="UPerHead", in_channels=[32] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=32, num_classes=K, norm_cfg=bn, align_corners=False,
                         loss_decode=dict(ce, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=32, in_index=3, channels=16, num_convs=1, concat_input=False,
                            num_classes=K, norm_cfg=bn, align_corners=False, loss_decode=dict(ce, loss_weight=0.4)),
    )  # fmt: skip
    dpt = dict(
        backbone=dict(vit, img_size=224, final_norm=False, with_cls_token=True, output_cls_token=True),
        decode_head=dict(type="DPTHead", in_channels=(32,) * 4, channels=16, embed_dims=32,
                         post_process_channels=[8, 16, 24, 32], num_classes=K, readout_type="project",
                         input_transform="multiple_select", in_index=(0, 1, 2, 3),
                         norm_cfg=bn, loss_decode=dict(ce, loss_weight=1.0)),
    )  # fmt: skip
    return {
        "upernet_vit_b16_ln_mln_512": (upernet, dict(SMALL_UPERNET, img_size=64, drop_path_rate=0.0)),
        "dpt_vit_b16_512": (dpt, dict(SMALL_DPT)),
    }


@pytest.mark.parametrize("name", ["upernet_vit_b16_ln_mln_512", "dpt_vit_b16_512"])
def test_matches_mmseg(name):
    mmseg = pytest.importorskip("mmseg", reason="mmsegmentation 1.x (with mmcv 2.x) is not installed")
    from mmengine.structures import PixelData
    from mmseg.models.segmentors import EncoderDecoder as MMSegEncoderDecoder
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    del mmseg
    register_all_modules()
    cfg, ours_kwargs = _mmseg_configs()[name]
    theirs = randomize(MMSegEncoderDecoder(**cfg, train_cfg=dict(), test_cfg=dict(mode="whole")), seed=6)
    ours = fastvit.create_model(name, **ours_kwargs).eval()
    sd = theirs.state_dict()
    assert list(ours.state_dict()) == list(sd)  # the same keys, in the same order
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 70, 100)  # padded to 80x112: a 5x7 grid, resampled position table
    with torch.no_grad():
        expected = theirs._forward(x)
        assert_rel(ours(x), expected)
        metas = [dict(img_shape=(70, 100), ori_shape=(70, 100))] * 2
        assert_rel(ours.predict(x), theirs.decode_head.predict_by_feat(expected, metas))
    for model in (theirs, ours):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout2d):
                m.p = 0.0
    labels = torch.randint(0, K, (2, 70, 100))
    labels[:, :9] = 255
    samples = []
    for i in range(2):
        sample = SegDataSample(gt_sem_seg=PixelData(data=labels[i : i + 1]))
        sample.set_metainfo(dict(img_shape=(70, 100), ori_shape=(70, 100)))
        samples.append(sample)
    theirs_losses, ours_losses = theirs.loss(x, samples), ours(x, labels)
    for key, value in theirs_losses.items():
        if "loss" in key:
            torch.testing.assert_close(ours_losses[key], value, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["upernet_vit_b16_mln_512", "dpt_vit_b16_512"])
def test_gpu_full_size_fused_matches_torch_backend(name, monkeypatch):
    model = fastvit.create_model(name).cuda().eval()  # default init: realistic activation scales
    x = torch.randn(1, 3, 512, 683, device="cuda")
    fused = model.predict(x)
    monkeypatch.setenv("FASTVIT_BACKEND", "torch")
    model.backbone._pos_cache.clear()
    reference = model.predict(x)
    err = (fused - reference).abs().max().item()
    assert err <= 2e-2 * reference.abs().max().item(), err
    with torch.autocast("cuda", dtype=torch.bfloat16):
        monkeypatch.delenv("FASTVIT_BACKEND")
        assert math.isfinite(model.predict(x).float().abs().max().item())


@pytest.mark.gpu
def test_gpu_training_step_at_the_mmseg_crop():
    # mmseg's "Mem" protocol: 2 images of 512x512 per GPU (1025 tokens), decode + auxiliary losses.
    model = fastvit.create_model("upernet_deit_s16_mln_512").cuda().train()
    x = torch.randn(2, 3, 512, 512, device="cuda")
    labels = torch.randint(0, K, (2, 512, 512), device="cuda")
    labels[:, :64] = 255
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(x, labels)
    losses["loss"].backward()
    assert math.isfinite(losses["loss"].item())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

"""Every checkpoint format round-trips on tiny models: write the foreign layout, load it back strictly, same outputs.

Also: Google .npz files written by fastvit load into timm through timm's own npz loader with the same
outputs as fastvit's loader (ViT and R50 hybrid, same grid and resampled), in21k npz files with
pre_logits, DeiT distilled, T2T-ViT (official and mmpretrain), and training checkpoints holding
pickled Python objects.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

import fastvit
from fastvit.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from fastvit.checkpoints.npz import save_npz, timm_to_npz
from fastvit.convert import export_state_dict, save_export
from fastvit.layers.pos_embed import resample_abs_pos_embed
from tests.checkpoints._tiny import IMPLS, assert_same_outputs, image_batch, randomize, tiny_hybrid, tiny_vit

# (format to write, file name, format load_checkpoint must detect)
ROUND_TRIPS = [
    ("timm", "model.pth", "timm"),
    ("timm", "model.safetensors", "timm"),
    ("timm", "pytorch_model.bin", "timm"),
    ("deit", "deit.pth", "deit"),
    ("mmpretrain", "mmpretrain.pth", "mmpretrain"),
    ("mmseg", "mmseg.pth", "mmseg"),
    ("vit_pytorch", "ViT-B_16.bin", "vit_pytorch"),
    ("npz", "ViT-B_16.npz", "npz"),
]


def _write(model: torch.nn.Module, to: str, path: str, num_heads: int = 2) -> str:
    save_export(export_state_dict(model.state_dict(), to, num_heads=num_heads), to, path)
    return path


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("to,filename,detected", ROUND_TRIPS, ids=[f"{t}-{f}" for t, f, _ in ROUND_TRIPS])
def test_round_trip(tmp_path, impl, to, filename, detected):
    # mmseg backbones have no classifier (vit2mmseg drops head.*): compare headless models there.
    classes = 0 if to == "mmseg" else 10
    src = tiny_vit(impl, num_classes=classes, seed=0)
    dst = tiny_vit(impl, num_classes=classes, seed=1)
    path = _write(src, to, str(tmp_path / filename))
    result = load_checkpoint(dst, path)
    assert result.format == detected
    assert not (result.missing_keys or result.unexpected_keys or result.mismatched_keys)
    assert_same_outputs(src, dst, image_batch())


@pytest.mark.parametrize("to,detected", [("timm", "timm"), ("deit", "deit"), ("mmpretrain", "mmpretrain")])
def test_round_trip_distilled(tmp_path, to, detected):
    src, dst = tiny_vit("fastvit", distilled=True, seed=0), tiny_vit("fastvit", distilled=True, seed=1)
    path = _write(src, to, str(tmp_path / "deit_distilled.pth"))
    assert load_checkpoint(dst, path).format == detected
    assert_same_outputs(src, dst, image_batch())


def test_distilled_mmpretrain_names(tmp_path):
    sd = export_state_dict(tiny_vit("fastvit", distilled=True).state_dict(), "mmpretrain")["state_dict"]
    assert {
        "backbone.dist_token",
        "head.layers.head.weight",
        "head.layers.head_dist.weight",
        "backbone.ln1.weight",
        "backbone.layers.1.ffn.layers.1.bias",
    } <= set(sd)


def test_npz_has_no_place_for_distillation_token():
    with pytest.raises(CheckpointError, match="dist_token"):
        export_state_dict(tiny_vit("fastvit", distilled=True).state_dict(), "npz", num_heads=2)


@pytest.mark.parametrize("img_size", [32, 48, 24], ids=["same-grid", "upsampled", "downsampled"])
def test_npz_matches_timms_own_npz_loader(tmp_path, img_size):
    from timm.models.vision_transformer import _load_weights

    path = _write(tiny_vit("timm", seed=0), "npz", str(tmp_path / "vit.npz"))
    timm_model = tiny_vit("timm", seed=1, img_size=img_size)
    _load_weights(timm_model, path)  # timm's Google-npz reader (model.load_pretrained(path) calls it)
    fast_model = tiny_vit("fastvit", seed=2, img_size=img_size)
    result = load_checkpoint(fast_model, path)
    assert result.resampled_pos_embed == (img_size != 32)
    torch.testing.assert_close(fast_model.pos_embed, timm_model.pos_embed, rtol=0, atol=0)
    assert_same_outputs(fast_model, timm_model, image_batch(img_size), exact=False)


def test_npz_loads_through_timm_load_pretrained(tmp_path):
    src = tiny_vit("fastvit", seed=0)
    path = _write(src, "npz", str(tmp_path / "vit.npz"))
    timm_model = tiny_vit("timm", seed=1)
    timm_model.load_pretrained(path)
    assert_same_outputs(src, timm_model, image_batch(), exact=False)


def test_hybrid_npz_matches_timm(tmp_path):
    from timm.models.vision_transformer import _load_weights

    path = _write(tiny_hybrid("timm", seed=0), "npz", str(tmp_path / "R50+ViT-B_16.npz"))
    names = set(np.load(path).files)
    assert {"conv_root/kernel", "gn_root/scale", "block1/unit1/conv_proj/kernel", "block2/unit1/gn3/bias"} <= names
    timm_model = tiny_hybrid("timm", seed=1)
    _load_weights(timm_model, path)
    fast_model = tiny_hybrid("fastvit", seed=2)
    assert load_checkpoint(fast_model, path).format == "npz"
    assert_same_outputs(fast_model, timm_model, image_batch(32), exact=False)


def test_hybrid_has_no_mmpretrain_layout():
    with pytest.raises(CheckpointError, match="patch_embed.backbone.stem.conv.weight"):
        export_state_dict(tiny_hybrid("fastvit").state_dict(), "mmpretrain")


@pytest.mark.parametrize("to", ["vit_pytorch", "timm"])
def test_hybrid_round_trip(tmp_path, to):
    src, dst = tiny_hybrid("fastvit", seed=0), tiny_hybrid("fastvit", seed=1)
    path = _write(src, to, str(tmp_path / "hybrid.pth"))
    load_checkpoint(dst, path)
    assert_same_outputs(src, dst, image_batch(32))


def test_hybrid_vit_pytorch_names():
    sd = export_state_dict(tiny_hybrid("fastvit").state_dict(), "vit_pytorch")
    hyb = "transformer.embeddings.hybrid_model."
    assert {
        hyb + "root.conv.weight",
        hyb + "root.gn.bias",
        hyb + "body.block1.unit1.downsample.weight",
        hyb + "body.block1.unit1.gn_proj.weight",
        hyb + "body.block2.unit1.gn3.weight",
        "transformer.embeddings.patch_embeddings.weight",
        "transformer.encoder.layer.1.attn.value.bias",
        "transformer.encoder.encoder_norm.weight",
        "transformer.embeddings.position_embeddings",
    } <= set(sd)


def test_in21k_npz_with_pre_logits(tmp_path):
    src = tiny_vit("fastvit", seed=0, num_classes=21843 // 1000)  # a non-1k head, as in21k files have
    arrays = timm_to_npz(src.state_dict(), num_heads=2)
    arrays["pre_logits/kernel"] = np.ones((32, 32), np.float32)
    arrays["pre_logits/bias"] = np.ones((32,), np.float32)
    path = str(tmp_path / "imagenet21k_ViT.npz")
    save_npz(arrays, path)

    same_head = tiny_vit("fastvit", seed=1, num_classes=21843 // 1000)
    result = load_checkpoint(same_head, path)
    assert sorted(result.ignored_keys) == ["pre_logits/bias", "pre_logits/kernel"]
    assert_same_outputs(src, same_head, image_batch())

    # A feature extractor (no head) takes the trunk when told to leave the classifier out ...
    headless = tiny_vit("fastvit", seed=1, num_classes=0)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(headless, path)
    load_checkpoint(headless, path, adapt_classifier=True)
    with torch.no_grad():
        features = src.forward_head(src.forward_features(image_batch()), pre_logits=True)
        torch.testing.assert_close(headless(image_batch()), features)


def test_big_vision_scanned_npz(tmp_path):
    """big_vision layout: params/ prefix, top-level pos_embedding, blocks stacked under encoderblock/."""
    src = tiny_vit("fastvit", seed=0)
    orig = timm_to_npz(src.state_dict(), num_heads=2)
    bv = {}
    for key, value in orig.items():
        key = key.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
        key = key.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
        key = key.replace("MlpBlock_3", "MlpBlock_0").replace("LayerNorm_2", "LayerNorm_1")
        bv["params/" + key] = value
    stacked = {}
    for key in [k for k in bv if "/encoderblock_" in k]:
        i, rest = key.split("/encoderblock_")[1].split("/", 1)
        stacked.setdefault(f"params/Transformer/encoderblock/{rest}", {})[int(i)] = bv.pop(key)
    for key, per_block in stacked.items():
        bv[key] = np.stack([per_block[i] for i in sorted(per_block)])
    path = str(tmp_path / "big_vision.npz")
    save_npz(bv, path)
    dst = tiny_vit("fastvit", seed=1)
    load_checkpoint(dst, path)
    assert_same_outputs(src, dst, image_batch())


@pytest.mark.parametrize("img_size", [48, 24], ids=["upsampled", "downsampled"])
def test_timm_state_dict_resampled_like_timm(tmp_path, img_size):
    """A timm .pth at another grid is resampled as timm's checkpoint_filter_fn does (bicubic, antialias)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    src = tiny_vit("timm", seed=0)
    path = _write(src, "timm", str(tmp_path / "model.pth"))
    timm_model = tiny_vit("timm", seed=1, img_size=img_size)
    timm_model.load_state_dict(checkpoint_filter_fn(src.state_dict(), timm_model))
    fast_model = tiny_vit("fastvit", seed=2, img_size=img_size)
    assert load_checkpoint(fast_model, path).resampled_pos_embed
    torch.testing.assert_close(fast_model.pos_embed, timm_model.pos_embed, rtol=1e-6, atol=1e-6)
    assert_same_outputs(fast_model, timm_model, image_batch(img_size), exact=False)
    assert fast_model.pos_embed_interp == "timm"


def test_mmseg_resampling_is_bicubic_without_antialias(tmp_path):
    from fastvit.layers.pos_embed import resample_abs_pos_embed

    src = tiny_vit("fastvit", seed=0, num_classes=0)
    path = _write(src, "mmseg", str(tmp_path / "mmseg.pth"))
    dst = tiny_vit("fastvit", seed=1, num_classes=0, img_size=24)
    load_checkpoint(dst, path)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), (3, 3), num_prefix_tokens=1, interp="mmseg")
    antialiased = resample_abs_pos_embed(src.pos_embed.detach(), (3, 3), num_prefix_tokens=1, interp="timm")
    torch.testing.assert_close(dst.pos_embed.detach(), expected, rtol=0, atol=0)
    assert not torch.allclose(dst.pos_embed.detach(), antialiased)  # the conventions really differ here
    assert dst.pos_embed_interp == "mmseg"


def test_mmseg_segmentor_checkpoint(tmp_path):
    """A whole mmseg segmentor file: its backbone loads, the neck and heads are reported as ignored."""
    src = tiny_vit("fastvit", seed=0, num_classes=0)
    backbone = export_state_dict(src.state_dict(), "mmseg")
    ckpt = {
        "meta": {"mmseg_version": "1.2.2"},
        "state_dict": {
            **{f"backbone.{k}": v for k, v in backbone.items()},
            "decode_head.conv_seg.weight": torch.randn(150, 512, 1, 1),
            "auxiliary_head.conv_seg.bias": torch.randn(150),
        },
    }
    path = str(tmp_path / "upernet_vit.pth")
    torch.save(ckpt, path)
    dst = tiny_vit("fastvit", seed=1, num_classes=0)
    result = load_checkpoint(dst, path)
    assert result.format == "mmseg"
    assert sorted(result.ignored_keys) == ["auxiliary_head.conv_seg.bias", "decode_head.conv_seg.weight"]
    assert_same_outputs(src, dst, image_batch())


def test_timm_train_checkpoint_prefers_ema_and_survives_pickled_objects(tmp_path):
    """timm train files hold argparse.Namespace (refused by weights_only) and 'module.'-prefixed EMA weights."""
    ema, raw = tiny_vit("fastvit", seed=0), tiny_vit("fastvit", seed=3)
    ckpt = {
        "epoch": 299,
        "arch": "vit_tiny",
        "args": argparse.Namespace(lr=5e-4, model="vit"),
        "state_dict": raw.state_dict(),
        "state_dict_ema": {f"module.{k}": v for k, v in ema.state_dict().items()},
    }
    path = str(tmp_path / "model_best.pth.tar")
    torch.save(ckpt, path)
    dst = tiny_vit("fastvit", seed=1)
    assert read_checkpoint(path).wrapper == ["state_dict_ema"]
    load_checkpoint(dst, path)
    assert_same_outputs(ema, dst, image_batch())
    load_checkpoint(dst, path, use_ema=False)
    assert_same_outputs(raw, dst, image_batch())


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_code_never_runs(tmp_path):
    """Objects in a checkpoint become inert placeholders: a __reduce__ payload is not executed."""
    marker = str(tmp_path / "payload_ran")
    src = tiny_vit("fastvit", seed=0)
    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": src.state_dict(), "meta": {"hook": _Evil(marker)}}, path)
    dst = tiny_vit("fastvit", seed=1)
    load_checkpoint(dst, path)
    assert not os.path.exists(marker)
    assert_same_outputs(src, dst, image_batch())


T2T_TINY = dict(
    img_size=32, tokens_type="transformer", embed_dim=32, depth=2, num_heads=2, num_classes=10, token_dim=16
)


def _tiny_t2t(seed: int, **overrides):
    t2t = pytest.importorskip("fastvit.models.t2t", reason="fastvit.models.t2t is not in this checkout")
    return randomize(t2t.T2TViT(**{**T2T_TINY, **overrides}), seed)


def test_t2t_mmpretrain_round_trip(tmp_path):
    src, dst = _tiny_t2t(0), _tiny_t2t(1)
    exported = export_state_dict(src.state_dict(), "mmpretrain")["state_dict"]
    # mmpretrain's T2T-ViT names (mmpretrain/models/backbones/t2t_vit.py).
    assert {
        "backbone.tokens_to_token.attention1.ln1.weight",
        "backbone.tokens_to_token.attention2.attn.qkv.weight",
        "backbone.tokens_to_token.attention1.ffn.layers.0.0.weight",
        "backbone.tokens_to_token.project.bias",
        "backbone.encoder.1.ln2.bias",
        "backbone.encoder.0.ffn.layers.1.weight",
        "backbone.norm.weight",
        "backbone.cls_token",
        "backbone.pos_embed",
        "head.layers.head.weight",
    } <= set(exported)
    path = _write(src, "mmpretrain", str(tmp_path / "t2t-vit-t-14_8xb64_in1k.pth"))
    assert load_checkpoint(dst, path).format == "mmpretrain"
    assert_same_outputs(src, dst, torch.randn(2, 3, 32, 32))


def test_t2t_official_training_checkpoint(tmp_path):
    src, dst = _tiny_t2t(0), _tiny_t2t(1)
    ckpt = {
        "epoch": 310,
        "args": argparse.Namespace(model="t2t_vit_t_14"),
        "state_dict": {},
        "state_dict_ema": {f"module.{k}": v for k, v in src.state_dict().items()},
    }
    path = str(tmp_path / "81.7_T2T_ViTt_14.pth.tar")
    torch.save(ckpt, path)
    assert load_checkpoint(dst, path).format == "t2t_official"
    assert_same_outputs(src, dst, torch.randn(2, 3, 32, 32))


def test_t2t_checkpoint_resampled_to_a_non_square_grid(tmp_path):
    """The T2T-ViT grid is tokens_to_token.grid_size (no patch_embed): a 2x2 table resamples to 2x3."""
    src = randomize(fastvit.create_model("t2t_vit_7", img_size=32), seed=0)
    path = str(tmp_path / "71.7_T2T_ViT_7.pth.tar")
    torch.save({"state_dict_ema": src.state_dict()}, path)
    dst = fastvit.create_model("t2t_vit_7", img_size=(32, 48))
    assert dst.tokens_to_token.grid_size == (2, 3)
    result = load_checkpoint(dst, path)
    assert result.format == "t2t_official" and result.resampled_pos_embed
    expected = resample_abs_pos_embed(src.pos_embed, (2, 3), num_prefix_tokens=1, interp="mmpretrain")
    torch.testing.assert_close(dst.pos_embed, expected)
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_performer_t2t_cannot_be_written_as_mmpretrain():
    src = _tiny_t2t(0, tokens_type="performer")
    with pytest.raises(CheckpointError, match="performer"):
        export_state_dict(src.state_dict(), "mmpretrain")


def test_already_loaded_dicts(tmp_path):
    """load_checkpoint also takes what torch.load / np.load returned."""
    src = tiny_vit("fastvit", seed=0)
    npz = _write(src, "npz", str(tmp_path / "vit.npz"))
    for loaded, fmt in [(dict(np.load(npz)), "npz"), ({"model": src.state_dict()}, "deit")]:
        dst = tiny_vit("fastvit", seed=1)
        assert load_checkpoint(dst, loaded).format == fmt
        assert_same_outputs(src, dst, image_batch())


VARIANTS = {
    "layerscale": dict(init_values=0.1),  # DeiT-3 style ls1 / ls2
    "avgpool": dict(global_pool="avg"),  # fc_norm instead of the final norm
    "pre_norm": dict(pre_norm=True),  # CLIP style norm_pre, patch conv without bias
}


@pytest.mark.parametrize("to", ["timm", "mmpretrain", "mmseg"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_variants(tmp_path, variant, to):
    args = {**VARIANTS[variant], "num_classes": 0 if to == "mmseg" else 10}
    src, dst = tiny_vit("fastvit", seed=0, **args), tiny_vit("fastvit", seed=1, **args)
    path = _write(src, to, str(tmp_path / f"{variant}.pth"))
    load_checkpoint(dst, path)
    assert_same_outputs(src, dst, image_batch())


def test_mmpretrain_names_of_variants():
    ls = export_state_dict(tiny_vit("fastvit", init_values=0.1).state_dict(), "mmpretrain")["state_dict"]
    assert {"backbone.layers.0.attn.gamma1.weight", "backbone.layers.0.ffn.gamma2.weight"} <= set(ls)
    avg = export_state_dict(tiny_vit("fastvit", global_pool="avg").state_dict(), "mmpretrain")["state_dict"]
    assert "backbone.ln2.weight" in avg and "backbone.ln1.weight" not in avg
    pre = export_state_dict(tiny_vit("fastvit", pre_norm=True).state_dict(), "mmpretrain")["state_dict"]
    assert "backbone.pre_norm.weight" in pre


def test_deit3_gamma_names_are_renamed(tmp_path):
    """DeiT-3's own checkpoints name LayerScale blocks.i.gamma_1 / gamma_2 (timm renames them to ls1/ls2.gamma)."""
    src = tiny_vit("fastvit", seed=0, init_values=0.1)
    sd = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in src.state_dict().items()}
    assert "blocks.0.gamma_1" in sd
    path = str(tmp_path / "deit_3_small_224_1k.pth")
    torch.save({"model": sd}, path)
    dst = tiny_vit("fastvit", seed=1, init_values=0.1)
    assert load_checkpoint(dst, path).format == "deit"
    assert_same_outputs(src, dst, image_batch())


def test_mmseg_trained_pre_norm_backbone(tmp_path):
    """mmseg's own ViT(pre_norm=True) names the pre-norm ``pre_ln`` (vit2mmseg output keeps ``norm_pre``)."""
    src = tiny_vit("fastvit", seed=0, num_classes=0, pre_norm=True)
    mmseg = export_state_dict(src.state_dict(), "mmseg")
    mmseg = {k.replace("norm_pre.", "pre_ln."): v for k, v in mmseg.items()}
    path = str(tmp_path / "mmseg_pre_norm.pth")
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in mmseg.items()}}, path)
    dst = tiny_vit("fastvit", seed=1, num_classes=0, pre_norm=True)
    load_checkpoint(dst, path)
    assert_same_outputs(src, dst, image_batch())

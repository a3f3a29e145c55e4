"""Model constructors, set_input_size and registry entrypoints refuse bad arguments up front."""

from __future__ import annotations

import pytest
import torch

import fastvit
from fastvit.checkpoints import PretrainedWeightsNotFound
from fastvit.models.registry import model_entrypoint
from fastvit.models.t2t import T2TViT
from fastvit.models.vit import VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
T2T_TINY = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=10, token_dim=8)


@pytest.mark.parametrize(
    "override, error, message",
    [
        (dict(img_size=0), ValueError, "img_size must be positive"),
        (dict(img_size=-32), ValueError, "img_size must be positive"),
        (dict(img_size=32.0), TypeError, "img_size must be an int or an"),
        (dict(img_size=(32,)), TypeError, "img_size must be an int or an"),
        (dict(patch_size=0), ValueError, "patch_size must be positive"),
        (dict(patch_size=64), ValueError, "patch_size 64 is larger than img_size 32"),
        (dict(in_chans=0), ValueError, "in_chans must be a positive int"),
        (dict(embed_dim=0), ValueError, "embed_dim must be a positive int"),
        (dict(num_heads=0), ValueError, "num_heads must be a positive int"),
        (dict(num_heads=3), ValueError, "embed_dim 32 is not divisible by num_heads 3"),
        (dict(num_heads=2.0), TypeError, "num_heads must be a positive int, got 2.0"),
        (dict(num_classes=-1), ValueError, "num_classes must be an int >= 0"),
        (dict(num_classes=True), TypeError, "num_classes must be an int >= 0, got True"),
        (dict(depth=-1), ValueError, "depth must be an int >= 0"),
        (dict(mlp_ratio=0), ValueError, "mlp_ratio must be a number > 0"),
        (dict(mlp_ratio="4"), TypeError, "mlp_ratio must be a number > 0"),
        (dict(drop_rate=1.0), ValueError, r"drop_rate must be a probability in \[0, 1\)"),
        (dict(attn_drop_rate=-0.1), ValueError, "attn_drop_rate must be a probability"),
        (dict(drop_path_rate=float("nan")), TypeError, "drop_path_rate must be a probability"),
    ],
)
def test_vit_refuses_bad_arguments(override, error, message):
    with pytest.raises(error, match=message):
        VisionTransformer(**{**TINY, **override})


@pytest.mark.parametrize(
    "override, error, message",
    [
        (dict(img_size=0), ValueError, "img_size must be positive"),
        (dict(img_size=2), ValueError, "too small: the soft splits leave no token"),
        (dict(embed_dim=30, num_heads=4), ValueError, "embed_dim 30 is not divisible by num_heads 4"),
        (dict(token_dim=0), ValueError, "token_dim must be a positive int"),
        (dict(num_classes=-5), ValueError, "num_classes must be an int >= 0"),
        (dict(qk_scale=0.0), ValueError, "qk_scale must be a number > 0"),
        (dict(drop_path_rate=2.0), ValueError, "drop_path_rate must be a probability"),
    ],
)
def test_t2t_refuses_bad_arguments(override, error, message):
    with pytest.raises(error, match=message):
        T2TViT(**{**T2T_TINY, **override})


def test_hybrid_and_segmentor_refuse_bad_arguments():
    with pytest.raises(ValueError, match="img_size must be positive"):
        fastvit.create_model("vit_base_r50_s16_224", img_size=0, depth=1)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        fastvit.create_model("upernet_deit_s16_512", num_heads=0, depth=1)


@pytest.mark.parametrize("bad", [0, -16, (32, 0), 3.5, (8, 8, 8), 4])
def test_vit_set_input_size_refused_leaves_the_model_unchanged(bad):
    model = VisionTransformer(**TINY).eval()
    x = torch.rand(1, 3, 32, 32)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError)):
        model.set_input_size(bad)
    assert model.patch_embed.img_size == (32, 32) and model.patch_embed.grid_size == (4, 4)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), before)


def test_t2t_has_set_input_size_like_vit():
    model = T2TViT(**T2T_TINY).eval()
    table = model.pos_embed.clone()
    model.set_input_size(64)
    assert model.img_size == (64, 64) and model.tokens_to_token.grid_size == (4, 4)
    assert model.pos_embed.shape == (1, 17, 32) and model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    model.set_input_size(32)  # back to the original grid: the bicubic round trip of a 2x2 grid
    assert model.pos_embed.shape == table.shape
    for bad in (2, 0, (32,), 1.5):
        with pytest.raises((ValueError, TypeError)):
            model.set_input_size(bad)
    assert model.img_size == (32, 32) and model.pos_embed.shape == table.shape
    with pytest.raises(ValueError, match="patch size"):
        model.set_input_size(64, patch_size=8)


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_base_r50_s16_224", "t2t_vit_7"]
)
def test_entrypoint_pretrained_true_never_returns_random_weights(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedWeightsNotFound, match=name):
        model_entrypoint(name)(pretrained=True, depth=1)


def test_segmentor_entrypoint_pretrained_true_is_not_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError):
        model_entrypoint("upernet_deit_s16_512")(pretrained=True, depth=4, out_indices=(0, 1, 2, 3))


def test_entrypoint_pretrained_path_loads_it(tmp_path):
    src = fastvit.create_model("vit_tiny_patch16_224", depth=1, num_classes=10)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    model = model_entrypoint("vit_tiny_patch16_224")(pretrained=str(path), depth=1, num_classes=10)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(TypeError, match="pretrained must be True, False or a checkpoint path"):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=1.0)


def test_reset_classifier_refuses_negative_sizes():
    for model in (VisionTransformer(**TINY), T2TViT(**T2T_TINY)):
        with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
            model.reset_classifier(-3)
        assert model.num_classes == 10


def test_segmentation_backbone_refuses_integer_weights(tmp_path):
    from fastvit.checkpoints import CheckpointError
    from fastvit.models.segmentation import ViTBackbone

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_indices=(0, 1))
    sd = VisionTransformer(**{**TINY, "depth": 2, "num_classes": 0}).state_dict()  # timm names
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].round().to(torch.int32)
    torch.save(sd, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match=r"ints\.pth: 1 tensors are not floating.*proj\.weight: torch\.int32"):
        ViTBackbone(**args).load_pretrained(str(tmp_path / "ints.pth"), format="timm")

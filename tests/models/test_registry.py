"""create_model / list_models: timm's names, overrides, and the pretrained hand-off to fastvit.checkpoints."""

from __future__ import annotations

import re
import sys
import types

import pytest
import timm
import torch

import fastvit
from fastvit.models import registry
from fastvit.models.registry import create_model, is_model, list_models, model_entrypoint, register_model

# ViT-Ti/S/B/L/H at patch 14/16/32 and 224/384 (plain names, no suffix variants).
_VIT_NAME = re.compile(r"^vit_(tiny|small|base|large|huge)_patch(14|16|32)_(224|384)$")


def test_every_timm_vit_deit_and_hybrid_name_is_registered():
    wanted = {n for n in timm.list_models("vit_*") if _VIT_NAME.match(n)}
    wanted |= set(timm.list_models("deit_*")) - set(timm.list_models("deit3_*"))
    wanted |= {"vit_base_r50_s16_224", "vit_base_r50_s16_384"}
    assert len(wanted) >= 26
    missing = wanted - set(list_models())
    assert not missing, f"timm names without a fastvit entrypoint: {sorted(missing)}"


def test_list_models_patterns_and_tags():
    assert list_models("deit_*distilled*") == [
        "deit_base_distilled_patch16_224",
        "deit_base_distilled_patch16_384",
        "deit_small_distilled_patch16_224",
        "deit_tiny_distilled_patch16_224",
    ]
    assert list_models("vit_base_r50*") == ["vit_base_r50_s16_224", "vit_base_r50_s16_384"]
    assert list_models("no_such_*") == []
    assert list_models() == sorted(list_models())
    assert fastvit.list_models is list_models and fastvit.create_model is create_model
    assert is_model("vit_base_patch16_224.orig_in21k_ft_in1k") and not is_model("vit_bass_patch16_224")


def test_overrides_reach_the_constructor():
    model = create_model(
        "vit_tiny_patch16_224", num_classes=3, img_size=64, depth=1, global_pool="avg", drop_path_rate=0.1
    )
    assert model.num_classes == 3 and model.head.out_features == 3
    assert model.patch_embed.img_size == (64, 64) and model.pos_embed.shape == (1, 17, 192)
    assert len(model.blocks) == 1 and model.global_pool == "avg"
    assert create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", depth=1).embed_dim == 192
    with pytest.raises(TypeError):
        create_model("vit_tiny_patch16_224", depth=1, no_such_argument=1)


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vit_base_patch16_244'.*vit_base_patch16_224"):
        create_model("vit_base_patch16_244")


def test_duplicate_registration_is_refused():
    def vit_tiny_patch16_224(pretrained=False, **kwargs):
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="registered twice"):
        register_model(vit_tiny_patch16_224)


def test_pretrained_is_handed_to_the_checkpoint_loader(monkeypatch):
    calls = []
    fake = types.ModuleType("fastvit.checkpoints")
    fake.load_pretrained = lambda model, name, pretrained: calls.append((type(model).__name__, name, pretrained))
    monkeypatch.setitem(sys.modules, "fastvit.checkpoints", fake)
    create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True, depth=1, img_size=32)
    create_model("deit_tiny_patch16_224", pretrained="/weights/deit.pth", depth=1, img_size=32)
    assert calls == [
        ("VisionTransformer", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", True),
        ("VisionTransformer", "deit_tiny_patch16_224", "/weights/deit.pth"),
    ]


def test_tag_sets_the_default_num_classes(tmp_path, monkeypatch):
    """As in timm, a tag's weights set the default head: augreg_in21k has 21843 classes, and pretrained=True
    loads that head instead of replacing it with a fresh 1000-class one."""
    small = dict(depth=1, img_size=32)
    assert create_model("vit_tiny_patch16_224", **small).num_classes == 1000
    assert create_model("vit_tiny_patch16_224.augreg_in21k", num_classes=5, **small).num_classes == 5
    src = create_model("vit_tiny_patch16_224.augreg_in21k", **small)
    assert src.num_classes == 21843 and src.head.out_features == 21843
    # A fake Hugging Face cache holding the tag's file (a snapshot without refs is found too).
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    torch.save(src.state_dict(), snapshot / "pytorch_model.bin")
    loaded = create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True, **small)
    assert torch.equal(loaded.head.weight, src.head.weight)


def test_pretrained_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="pretrained must be"):
        registry.create_model("vit_tiny_patch16_224", pretrained=3, depth=1, img_size=32)


def test_every_family_registers_and_honours_pretrained_one_way(monkeypatch):
    """ViT / DeiT, the hybrid, T2T-ViT and the segmentors all register through ``register_variant``: one
    entrypoint body, so ``pretrained=`` means the same for every name (handed to the checkpoint loader with the
    name; a bad value refused before the model is built)."""
    bodies = {model_entrypoint(name).__code__ for name in list_models()}
    probe = registry.register_variant("_probe", torch.nn.Identity, "", __name__)
    registry._ENTRYPOINTS.pop("_probe")  # before the assert, so a failure leaves the registry clean
    assert bodies == {probe.__code__}
    calls = []
    fake = types.ModuleType("fastvit.checkpoints")
    fake.load_pretrained = lambda model, name, pretrained: calls.append((name, pretrained)) or model
    monkeypatch.setitem(sys.modules, "fastvit.checkpoints", fake)
    for name in list_models():
        with pytest.raises(TypeError, match="pretrained must be"):
            create_model(name, pretrained=3)
        model = create_model(name, pretrained=f"/weights/{name}.pth", device="meta")
        assert isinstance(model, torch.nn.Module)
    assert calls == [(name, f"/weights/{name}.pth") for name in list_models()]

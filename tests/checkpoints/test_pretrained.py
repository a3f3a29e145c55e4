"""pretrained=True finds weights in a (fake) Hugging Face hub cache or torch-hub cache, never the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import fastvit
from fastvit.checkpoints import PretrainedWeightsNotFound, load_pretrained, resolve_pretrained_file
from fastvit.convert import export_state_dict, save_export
from tests.checkpoints._tiny import assert_same_outputs, image_batch, tiny_vit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty HF hub and torch hub caches; the network is made unreachable for good measure."""
    hub, torch_home = tmp_path / "hf_hub", tmp_path / "torch_home"
    hub.mkdir()
    torch_home.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("fastvit tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return hub, torch_home


def _hf_snapshot(hub, repo: str, filename: str, revision: str = "main"):
    """The path a file gets in huggingface_hub's cache: snapshots/<commit>/FILE -> ../../blobs/<etag>."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / revision).write_text(COMMIT)
    (repo_dir / "blobs").mkdir()
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(Path("..") / ".." / "blobs" / f"etag-of-{filename}")
    return snapshot / filename


def test_hf_cache_safetensors_is_found_and_loaded(caches):
    hub, _ = caches
    src = tiny_vit("fastvit", seed=0)
    path = _hf_snapshot(hub, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")
    save_export(export_state_dict(src.state_dict(), "timm"), "timm", path)
    assert resolve_pretrained_file("vit_tiny_patch16_224") == path
    assert resolve_pretrained_file("vit_tiny_patch16_224.augreg_in21k_ft_in1k") == path

    # The tiny model stands in for the real architecture: load_pretrained only needs matching keys.
    dst = tiny_vit("fastvit", seed=1)
    load_pretrained(dst, "vit_tiny_patch16_224", True)
    assert_same_outputs(src, dst, image_batch())
    # The weights' preprocessing is recorded (augreg: mean = std = 0.5, crop 0.9).
    assert dst.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and dst.pretrained_cfg["crop_pct"] == 0.9


def test_hf_cache_pytorch_model_bin_and_tag(caches):
    hub, _ = caches
    path = _hf_snapshot(hub, "timm/deit_tiny_patch16_224.fb_in1k", "pytorch_model.bin")
    torch.save(tiny_vit("fastvit").state_dict(), path)
    assert resolve_pretrained_file("deit_tiny_patch16_224.fb_in1k") == path


def test_dangling_hf_symlink_is_not_a_cached_file(caches):
    """An interrupted hub download leaves the snapshot link without its blob: not a usable file."""
    hub, _ = caches
    _hf_snapshot(hub, "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")
    with pytest.raises(PretrainedWeightsNotFound, match="model.safetensors"):
        resolve_pretrained_file("vit_small_patch16_224")


def test_hf_cache_without_refs_uses_any_snapshot(caches):
    hub, _ = caches
    snapshot = hub / "models--timm--vit_base_patch32_224.augreg_in21k_ft_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"x")
    assert resolve_pretrained_file("vit_base_patch32_224") == snapshot / "model.safetensors"


def test_torch_hub_cache_for_url_configs(caches):
    _, torch_home = caches
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    path = checkpoints / "81.7_T2T_ViTt_14.pth.tar"
    path.write_bytes(b"x")
    assert resolve_pretrained_file("t2t_vit_t_14") == path


def test_offline_without_cached_file_names_every_path(caches):
    hub, torch_home = caches
    with pytest.raises(PretrainedWeightsNotFound) as err:
        resolve_pretrained_file("vit_base_r50_s16_384")
    msg = str(err.value)
    assert str(hub / "models--timm--vit_base_r50_s16_384.orig_in21k_ft_in1k") in msg
    assert "model.safetensors" in msg and "pytorch_model.bin" in msg
    assert str(torch_home / "hub" / "checkpoints" / "jx_vit_base_resnet50_384-9fd3c705.pth") in msg
    assert "never downloads" in msg and "huggingface-cli download timm/vit_base_r50_s16_384.orig_in21k_ft_in1k" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_missing_t2t_weights_point_to_the_official_release(caches):
    """timm has no T2T-ViT: the message names the official release file, not timm.create_model."""
    _, torch_home = caches
    with pytest.raises(PretrainedWeightsNotFound) as err:
        resolve_pretrained_file("t2t_vit_14")
    msg = str(err.value)
    url = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/81.5_T2T_ViT_14.pth.tar"
    assert f"download {url} into {torch_home / 'hub' / 'checkpoints'}" in msg
    assert "official yitu-opensource/T2T-ViT release file 81.5_T2T_ViT_14.pth.tar" in msg
    assert "timm.create_model" not in msg


def test_unknown_name_or_tag(caches):
    with pytest.raises(PretrainedWeightsNotFound, match="no pretrained weights are known"):
        resolve_pretrained_file("not_a_model_at_all")
    with pytest.raises(PretrainedWeightsNotFound, match="no_such_tag.*vit_base_patch16_224.augreg_in1k"):
        resolve_pretrained_file("vit_base_patch16_224.no_such_tag")


def test_deprecated_alias_resolves_to_new_name_and_tag(caches):
    hub, _ = caches
    path = _hf_snapshot(hub, "timm/vit_base_r50_s16_384.orig_in21k_ft_in1k", "model.safetensors")
    path.write_bytes(b"x")
    assert resolve_pretrained_file("vit_base_resnet50_384") == path


def test_create_model_pretrained_true_and_path(caches, tmp_path):
    """create_model resolves through load_pretrained; a different num_classes keeps a fresh head."""
    hub, _ = caches
    small = dict(img_size=32, depth=2)  # a 2-block vit_tiny keeps the test fast; names are what matter
    src = fastvit.create_model("vit_tiny_patch16_224", num_classes=10, **small)
    path = _hf_snapshot(hub, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors")
    save_export(export_state_dict(src.state_dict(), "timm"), "timm", path)

    same = fastvit.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, **small).eval()
    assert_same_outputs(src.eval(), same, image_batch())
    other_head = fastvit.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=3, **small)
    assert torch.equal(other_head.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    gray = fastvit.create_model("vit_tiny_patch16_224", pretrained=True, in_chans=1, num_classes=10, **small)
    assert torch.allclose(gray.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    # A checkpoint path of any format, here Google npz at another resolution (resampled on load).
    npz = str(tmp_path / "ViT-Ti_16.npz")
    save_export(export_state_dict(src.state_dict(), "npz", num_heads=3), "npz", npz)
    bigger = fastvit.create_model("vit_tiny_patch16_224", pretrained=npz, img_size=48, depth=2, num_classes=10)
    assert bigger.pos_embed.shape == (1, 10, 192) and bigger.pretrained_cfg["crop_mode"] == "squash"

    os.remove(path)
    with pytest.raises(PretrainedWeightsNotFound, match="model.safetensors"):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True, depth=2)

"""Bad checkpoints get clear errors: unknown format, another architecture, truncated / empty / missing files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvit.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from fastvit.convert import export_state_dict, save_export
from tests.checkpoints._tiny import tiny_vit


def _save(tmp_path, to, name, **model_args):
    path = str(tmp_path / name)
    save_export(export_state_dict(tiny_vit("fastvit", **model_args).state_dict(), to, num_heads=2), to, path)
    return path


def test_unknown_format_names_keys_and_supported_formats(tmp_path):
    path = str(tmp_path / "resnet50.pth")
    torch.save({"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_vit("fastvit"), path)
    msg = str(err.value)
    assert "unknown checkpoint format" in msg and "conv1.weight" in msg and "fc.weight" in msg
    assert "npz" in msg and "mmseg" in msg and "vit_pytorch" in msg and "format=" in msg


def test_other_architecture_shape_mismatch(tmp_path):
    path = _save(tmp_path, "timm", "wider.pth", embed_dim=48, num_heads=3)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_vit("fastvit"), path)
    msg = str(err.value)
    assert "detected format 'timm'" in msg and "shape mismatches" in msg
    assert "blocks.0.attn.proj.bias: checkpoint (48,) vs model (32,)" in msg
    assert "num_classes" in msg  # the generic hint, not the classifier-only one


def test_deeper_checkpoint_lists_unexpected_keys(tmp_path):
    path = _save(tmp_path, "mmseg", "deeper_mmseg.pth", depth=3, num_classes=0)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_vit("fastvit", num_classes=0), path)
    msg = str(err.value)
    assert "detected format 'mmseg'" in msg and "unexpected keys" in msg and "blocks.2.attn.qkv.weight" in msg


def test_t2t_checkpoint_into_vit_lists_missing_and_unexpected(tmp_path):
    t2t = pytest.importorskip("fastvit.models.t2t", reason="fastvit.models.t2t is not in this checkout")
    model = t2t.T2TViT(img_size=32, tokens_type="transformer", embed_dim=32, depth=2, num_heads=2, token_dim=16)
    path = str(tmp_path / "t2t.pth.tar")
    torch.save({"state_dict_ema": model.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_vit("fastvit"), path)
    msg = str(err.value)
    assert "detected format 't2t_official'" in msg
    assert "missing keys" in msg and "patch_embed.proj.weight" in msg
    assert "unexpected keys" in msg and "tokens_to_token." in msg


def test_classifier_size_mismatch_hint(tmp_path):
    path = _save(tmp_path, "timm", "k10.pth", num_classes=10)
    model = tiny_vit("fastvit", num_classes=7)
    with pytest.raises(CheckpointError, match="num_classes=10"):
        load_checkpoint(model, path)
    result = load_checkpoint(model, path, adapt_classifier=True)
    assert result.reset_classifier_keys == ["head.bias", "head.weight"]


def test_non_strict_loads_the_overlap(tmp_path):
    path = _save(tmp_path, "timm", "deeper.pth", depth=3)
    model = tiny_vit("fastvit", seed=5)
    result = load_checkpoint(model, path, strict=False)
    assert result.unexpected_keys and all(k.startswith("blocks.2.") for k in result.unexpected_keys)
    assert not result.missing_keys


@pytest.mark.parametrize(
    "to,name", [("timm", "model.pth"), ("timm", "model.safetensors"), ("npz", "ViT-B_16.npz"), ("mmseg", "legacy.pth")]
)
def test_truncated_file(tmp_path, to, name):
    path = _save(tmp_path, to, name, num_classes=0 if to == "mmseg" else 10)
    if to == "mmseg":  # the pre-zip torch format too
        torch.save(torch.load(path), path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_vit("fastvit"), path)
    assert "truncated or corrupt" in str(err.value) and name in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tiny_vit("fastvit"), str(empty))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint(tiny_vit("fastvit"), str(tmp_path / "nowhere.pth"))


def test_forced_format_mismatch(tmp_path):
    npz = _save(tmp_path, "npz", "vit.npz")
    with pytest.raises(CheckpointError, match="format='npz'"):
        read_checkpoint(npz, format="timm")
    pth = _save(tmp_path, "timm", "vit.pth")
    with pytest.raises(CheckpointError, match="detected format 'timm'"):
        read_checkpoint(pth, format="npz")
    with pytest.raises(CheckpointError, match="unknown format 'onnx'"):
        read_checkpoint(pth, format="onnx")
    # Forcing a format whose names do not match: the load error names the forced and the detected format.
    mmseg = _save(tmp_path, "mmseg", "mmseg.pth", num_classes=0)
    with pytest.raises(CheckpointError, match="format 'vit_pytorch'.*forced.*look like 'mmseg'.*missing keys"):
        load_checkpoint(tiny_vit("fastvit", num_classes=0), mmseg, format="vit_pytorch")


def test_npz_that_is_not_a_vit(tmp_path):
    path = str(tmp_path / "resnet.npz")
    np.savez(path, **{"conv/kernel": np.zeros((3, 3, 3, 8), np.float32)})
    with pytest.raises(CheckpointError, match="not a Google ViT .npz"):
        load_checkpoint(tiny_vit("fastvit"), path)


def test_incomplete_npz_names_missing_array(tmp_path):
    path = _save(tmp_path, "npz", "vit.npz")
    arrays = dict(np.load(path))
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="MlpBlock_3/Dense_0/kernel"):
        load_checkpoint(tiny_vit("fastvit"), path)


def test_npz_export_needs_num_heads():
    with pytest.raises(CheckpointError, match="num_heads"):
        export_state_dict(tiny_vit("fastvit").state_dict(), "npz")


def test_no_tensors_at_all():
    with pytest.raises(CheckpointError, match=r"0 tensors.*top-level keys \[epoch, meta\]"):
        read_checkpoint({"epoch": 3, "meta": {"note": "no weights here"}})


@pytest.mark.parametrize("in_chans", [1, 4])
def test_input_channels_adapted_only_when_asked(tmp_path, in_chans):
    from timm.models import adapt_input_conv

    src = tiny_vit("fastvit", seed=0)
    path = str(tmp_path / "rgb.pth")
    torch.save(src.state_dict(), path)
    model = tiny_vit("fastvit", seed=1, in_chans=in_chans)
    mismatch = rf"patch_embed.proj.weight: checkpoint \(32, 3, 8, 8\) vs model \(32, {in_chans}, 8, 8\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_checkpoint(model, path)
    load_checkpoint(model, path, adapt_input_channels=True)
    expected = adapt_input_conv(in_chans, src.patch_embed.proj.weight.detach())
    assert torch.equal(model.patch_embed.proj.weight.detach(), expected)

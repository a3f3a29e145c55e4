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
    # Forcing a format the keys contradict is refused before anything is renamed or loaded, even non-strict,
    # and the model's preprocessing config is left alone.
    mmseg = _save(tmp_path, "mmseg", "mmseg.pth", num_classes=0)
    model = tiny_vit("fastvit", num_classes=0)
    cfg_before, interp_before = dict(model.pretrained_cfg), model.pos_embed_interp
    for strict in (True, False):
        with pytest.raises(CheckpointError, match="format='vit_pytorch' was forced.*those of 'mmseg'.*format='mmseg'"):
            load_checkpoint(model, mmseg, format="vit_pytorch", strict=strict)
    assert model.pretrained_cfg == cfg_before and model.pos_embed_interp == interp_before
    # timm and DeiT files share names: forcing one on the other is not a mismatch.
    assert read_checkpoint(pth, format="deit").format == "deit"


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


# --- checkpoints verified: CRC, dtypes, non-strict loads of nothing, non-square position grids ---------------


def _flip_byte_in_member(path: str, member_suffix: str) -> None:
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix) and i.file_size > 64)
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 40] ^= 0x55
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("to, name, member", [("timm", "m.pth", "/data/2"), ("npz", "m.npz", ".npy")])
def test_flipped_byte_in_a_tensor_is_caught_by_crc(tmp_path, to, name, member):
    path = _save(tmp_path, to, name)
    _flip_byte_in_member(path, member)
    with pytest.raises(CheckpointError, match=r"m\.(pth|npz).*(CRC|corrupt)") as err:
        load_checkpoint(tiny_vit("fastvit"), path)
    assert "fetch" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_float_tensors_for_float_parameters_are_refused(tmp_path, dtype):
    sd = tiny_vit("fastvit").state_dict()
    sd["blocks.0.mlp.fc1.weight"] = (sd["blocks.0.mlp.fc1.weight"] * 10).to(dtype)
    path = tmp_path / "ints.pth"
    torch.save(sd, path)
    model = tiny_vit("fastvit", seed=3)
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    with pytest.raises(CheckpointError, match=rf"ints\.pth.*blocks\.0\.mlp\.fc1\.weight: {dtype}"):
        load_checkpoint(model, path, strict=False)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, before)


def test_non_strict_that_loads_nothing_raises_and_little_warns(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: strict=False loaded 0 of the model's \d+ tensors"):
        load_checkpoint(tiny_vit("fastvit"), path, format="timm", strict=False)
    sd = tiny_vit("fastvit").state_dict()
    few = {k: v for k, v in sd.items() if k.startswith(("cls_token", "pos_embed", "patch_embed"))}
    torch.save(few, tmp_path / "few.pth")
    with pytest.warns(UserWarning, match=r"few\.pth: strict=False loaded only 4 of .*blocks\.0"):
        result = load_checkpoint(tiny_vit("fastvit"), tmp_path / "few.pth", format="timm", strict=False)
    assert len(result.missing_keys) == len(sd) - 4


def test_non_square_position_grid_refused_or_resampled_with_its_grid(tmp_path):
    wide = tiny_vit("fastvit", img_size=(16, 48))  # 2x6 = 12 positions: not a square
    path = tmp_path / "wide.pth"
    torch.save(wide.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"wide\.pth: pos_embed .*12 grid positions.*pos_embed_grid=\(h, w\)"):
        load_checkpoint(tiny_vit("fastvit"), path)
    with pytest.raises(CheckpointError, match=r"pos_embed_grid=\(3, 3\) has 9 positions"):
        load_checkpoint(tiny_vit("fastvit"), path, pos_embed_grid=(3, 3))
    with pytest.raises(TypeError, match=r"pos_embed_grid must be an \(h, w\) pair of positive ints"):
        load_checkpoint(tiny_vit("fastvit"), path, pos_embed_grid="2x6")
    model = tiny_vit("fastvit", seed=2)
    assert load_checkpoint(model, path, pos_embed_grid=(2, 6)).resampled_pos_embed
    wide.set_input_size((32, 32))  # the model's own resampling knows its grid: the reference
    assert torch.allclose(model.pos_embed, wide.pos_embed, atol=1e-6)

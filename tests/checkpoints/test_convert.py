"""``python -m fastvit.convert``: mmseg output is key-by-key what mmseg's vit2mmseg writes; other targets load back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvit.checkpoints import load_checkpoint
from fastvit.convert import main
from tests.checkpoints._tiny import assert_same_outputs, image_batch, tiny_vit

REPO_ROOT = Path(__file__).resolve().parents[2]

# vit2mmseg.convert_vit on a depth-2 timm ViT with a head (mmsegmentation tools/model_converters/vit2mmseg.py),
# written out by hand: timm key -> mmseg key (head.* dropped).
_BLOCK = [
    ("norm1.weight", "ln1.weight"),
    ("norm1.bias", "ln1.bias"),
    ("attn.qkv.weight", "attn.attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.attn.in_proj_bias"),
    ("attn.proj.weight", "attn.attn.out_proj.weight"),
    ("attn.proj.bias", "attn.attn.out_proj.bias"),
    ("norm2.weight", "ln2.weight"),
    ("norm2.bias", "ln2.bias"),
    ("mlp.fc1.weight", "ffn.layers.0.0.weight"),
    ("mlp.fc1.bias", "ffn.layers.0.0.bias"),
    ("mlp.fc2.weight", "ffn.layers.1.weight"),
    ("mlp.fc2.bias", "ffn.layers.1.bias"),
]
VIT2MMSEG = [
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("patch_embed.proj.weight", "patch_embed.projection.weight"),
    ("patch_embed.proj.bias", "patch_embed.projection.bias"),
    *[(f"blocks.{i}.{a}", f"layers.{i}.{b}") for i in range(2) for a, b in _BLOCK],
    ("norm.weight", "ln1.weight"),
    ("norm.bias", "ln1.bias"),
]


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"], ids=["plain", "timm-wrapped", "deit-wrapped"])
def test_mmseg_output_equals_vit2mmseg(tmp_path, wrapper):
    src = tiny_vit("timm", seed=0)
    sd = src.state_dict()
    src_path, dst_path = tmp_path / "jx_vit_base_p16_224-80ecf9dd.pth", tmp_path / "out" / "vit_mmseg.pth"
    torch.save({wrapper: sd} if wrapper else sd, src_path)
    assert main([str(src_path), str(dst_path), "--to", "mmseg"]) == 0
    out = torch.load(dst_path, weights_only=True)
    assert list(out) == [b for _, b in VIT2MMSEG]  # same keys, same order as vit2mmseg writes them
    for timm_key, mmseg_key in VIT2MMSEG:
        assert torch.equal(out[mmseg_key], sd[timm_key]), mmseg_key


def test_mmseg_output_of_distilled_deit():
    """vit2mmseg keeps dist_token and drops head and head_dist (both start with 'head')."""
    from fastvit.checkpoints.mmseg import timm_to_mmseg

    out = timm_to_mmseg(tiny_vit("timm", distilled=True).state_dict())
    assert "dist_token" in out and not any(k.startswith("head") for k in out)


@pytest.mark.parametrize("to", ["timm", "mmpretrain", "vit_pytorch", "deit"])
def test_convert_npz_to_every_target(tmp_path, to, capsys):
    src = tiny_vit("fastvit", seed=0)
    npz = tmp_path / "ViT-B_16.npz"
    assert main([_torch_file(tmp_path, src), str(npz), "--to", "npz", "--num-heads", "2"]) == 0
    dst_path = tmp_path / f"converted_{to}.pth"
    assert main([str(npz), str(dst_path), "--to", to]) == 0
    assert f"(npz) -> {dst_path} ({to})" in capsys.readouterr().out
    dst = tiny_vit("fastvit", seed=1)
    load_checkpoint(dst, dst_path)
    assert_same_outputs(src, dst, image_batch())


def _torch_file(tmp_path, model) -> str:
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_convert_errors(tmp_path, capsys):
    src = _torch_file(tmp_path, tiny_vit("fastvit"))
    assert main([src, str(tmp_path / "x.npz"), "--to", "npz"]) == 1
    assert "num_heads" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "y.pth"), "--to", "timm"]) == 1
    assert "not found" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    """The real ``python -m fastvit.convert`` command line, once, in a fresh interpreter."""
    src = _torch_file(tmp_path, tiny_vit("fastvit", seed=0))
    dst = tmp_path / "vit.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "fastvit.convert", src, str(dst), "--to", "npz", "--num-heads", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in np.load(dst).files

"""``python -m fastvit.convert``: mmseg output is key-by-key what mmseg's vit2mmseg writes; other targets load back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvit.checkpoints import CheckpointError, load_checkpoint
from fastvit.convert import main
from tests._faults import run_child
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


# --- nothing lost: same file refused, interrupted writes keep the old file, OS errors are one line -----------


def _same_file_spellings(tmp_path, src: Path) -> dict[str, Path]:
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "link.pth")
    os.link(src, tmp_path / "hard.pth")
    return {
        "same path": src,
        "other spelling": tmp_path / "sub" / ".." / src.name,
        "symlink": tmp_path / "link.pth",
        "hard link": tmp_path / "hard.pth",
    }


def test_same_file_as_source_is_refused_unless_forced(tmp_path, capsys):
    src = Path(_torch_file(tmp_path, tiny_vit("fastvit", seed=0)))
    before = src.read_bytes()
    for how, dst in _same_file_spellings(tmp_path, src).items():
        assert main([str(src), str(dst), "--to", "mmseg"]) == 1, how
        err = capsys.readouterr().err
        assert "same file as the source" in err and "--force" in err and err.count("\n") == 1, how
        assert src.read_bytes() == before, how
    assert main([str(src), str(src), "--to", "deit", "--force"]) == 0
    assert list(torch.load(src, weights_only=True)) == ["model"]  # forced: converted in place, still whole


def test_size_limit_mid_write_keeps_the_old_destination(tmp_path):
    src = _torch_file(tmp_path, tiny_vit("fastvit", seed=0, embed_dim=64))
    dst = tmp_path / "old.pth"
    dst.write_bytes(b"previous good file")
    proc = run_child(
        f"import sys; from fastvit.convert import main; sys.exit(main([{src!r}, {str(dst)!r}, '--to', 'timm']))",
        size_limit=20000,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and str(dst) in proc.stderr and "too large" in proc.stderr
    assert dst.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "old.pth"]  # no temporary left


@pytest.mark.parametrize("to, name", [("timm", "out.pth"), ("timm", "out.safetensors"), ("npz", "out.npz")])
def test_kill_before_rename_keeps_the_old_destination(tmp_path, to, name):
    src = _torch_file(tmp_path, tiny_vit("fastvit", seed=0))
    dst = tmp_path / name
    dst.write_bytes(b"previous good file")
    proc = run_child(
        f"from fastvit.convert import main; main([{src!r}, {str(dst)!r}, '--to', {to!r}, '--num-heads', '2'])",
        kill_before_rename=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert dst.read_bytes() == b"previous good file"


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda p: (p / "folder").mkdir() or p / "folder", "is a folder"),
        (lambda p: (p / "afile").write_text("") or p / "afile" / "x.pth", "afile"),
    ],
    ids=["dst-is-folder", "parent-is-file"],
)
def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys, make, why):
    src = _torch_file(tmp_path, tiny_vit("fastvit"))
    dst = make(tmp_path)
    assert main([src, str(dst), "--to", "timm"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(dst) in err and why in err


def test_unwritable_folder(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    src = _torch_file(tmp_path, tiny_vit("fastvit"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main([src, str(ro / "x.pth"), "--to", "timm"]) == 1
    finally:
        ro.chmod(0o700)
    assert "permission denied" in capsys.readouterr().err


def test_corrupt_source_one_line_and_debug_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02not a pickle at all")
    assert main([str(bad), str(tmp_path / "y.pth"), "--to", "timm"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.pth" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="bad.pth"):
        main([str(bad), str(tmp_path / "y.pth"), "--to", "timm", "--debug"])

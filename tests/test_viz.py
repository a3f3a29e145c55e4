"""fastvit.viz: the rollout recipe against a direct transcription, rollout masks of timm and fastvit
models, the PNG overlay and the command line (random weights, generated image)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import fastvit
from fastvit.viz import attention_rollout, main, overlay, rollout_from_maps, save_overlay


def _random_maps(layers: int, B: int, H: int, N: int) -> list[torch.Tensor]:
    return [torch.randn(B, H, N, N).softmax(-1) for _ in range(layers)]


def test_rollout_matches_the_notebook_recipe():
    """jeonsworld's notebook, transcribed in numpy: mean heads, + I, renormalise, joint[n] = aug[n] @ joint[n-1]."""
    maps = _random_maps(layers=4, B=2, H=3, N=10)
    got = rollout_from_maps(maps, num_prefix_tokens=1)
    for b in range(2):
        att = np.stack([m[b].numpy() for m in maps]).mean(axis=1)
        aug = att + np.eye(10)
        aug = aug / aug.sum(-1, keepdims=True)
        joint = aug[0]
        for n in range(1, len(aug)):
            joint = aug[n] @ joint
        v = joint[0, 1:]
        np.testing.assert_allclose(got[b].numpy(), v / v.max(), rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 9) and torch.allclose(got.amax(-1), torch.ones(2))


def test_rollout_from_maps_rejects_bad_input():
    with pytest.raises(ValueError, match="no attention maps"):
        rollout_from_maps([])
    with pytest.raises(ValueError, match=r"map 1 has shape"):
        rollout_from_maps([torch.rand(1, 2, 5, 5), torch.rand(1, 2, 6, 6)])
    with pytest.raises(ValueError, match="num_prefix_tokens 5 out of range"):
        rollout_from_maps(_random_maps(1, 1, 1, 5), num_prefix_tokens=5)


def test_attention_rollout_timm_patched_and_fastvit_distilled():
    timm_model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, dynamic_img_size=True
    ).eval()
    fastvit.patch_model(timm_model)
    mask = attention_rollout(timm_model, torch.randn(3, 64, 48))  # non-square: a 4 x 3 grid
    assert mask.shape == (4, 3) and mask.max() == 1.0 and mask.min() >= 0.0

    distilled = fastvit.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=32).eval()
    image = torch.randn(2, 3, 32, 32)
    masks = attention_rollout(distilled, image)
    assert masks.shape == (2, 2, 2)
    with torch.no_grad():
        expected = rollout_from_maps(distilled.attention_maps(image), num_prefix_tokens=2).reshape(2, 2, 2)
    torch.testing.assert_close(masks, expected)
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(B, 3, H, W\)"):
        attention_rollout(distilled, torch.randn(32, 32))


def test_overlay_and_png(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    mask = torch.rand(2, 3)
    out = save_overlay(image, mask, tmp_path / "sub" / "o.png", alpha=0.4)
    with Image.open(out) as written:
        assert written.format == "PNG" and written.mode == "RGB" and written.size == (60, 40)
    assert np.array_equal(np.asarray(overlay(image, mask, alpha=0.0)), np.asarray(image))
    hot = np.asarray(overlay(image, torch.ones(2, 3), alpha=1.0))
    assert (hot[..., 0] == 128).all() and (hot[..., 1:] == 0).all()  # max of the jet ramp: dark red
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, mask, alpha=2.0)
    with pytest.raises(ValueError, match=r"mask must be \(h, w\)"):
        overlay(image, torch.rand(1, 2, 3))


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_tiny_r_s16_p8_224"])  # fastvit / timm-only name
def test_cli_random_init(name, image_file, tmp_path, capsys):
    out = tmp_path / "rollout.png"
    assert main([str(image_file), "--model", name, "--random-init", "--out", str(out)]) == 0
    with Image.open(out) as written:
        assert written.size == (100, 80)
    assert "weights=random init" in capsys.readouterr().out


def test_cli_errors(image_file, tmp_path, capsys):
    assert main([str(image_file), "--model", "no_such_model", "--random-init", "--out", str(tmp_path / "x.png")]) == 1
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.png"), "--model", "deit_tiny_patch16_224", "--random-init"]) == 1
    assert "image file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --checkpoint and --random-init exclude each other
        main([str(image_file), "--model", "deit_tiny_patch16_224", "--random-init", "--checkpoint", "w.pth"])


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "fastvit.viz", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--random-init" in result.stdout


def test_out_extension_picks_the_format_or_is_refused(image_file, tmp_path, capsys):
    out = tmp_path / "rollout.jpg"
    assert main([str(image_file), "--model", "deit_tiny_patch16_224", "--random-init", "--out", str(out)]) == 0
    with Image.open(out) as written:
        assert written.format == "JPEG"
    capsys.readouterr()
    for bad in ("rollout.gif", "rollout"):
        with pytest.raises(SystemExit) as exit_info:  # refused before any model is built
            main([str(image_file), "--model", "deit_tiny_patch16_224", "--random-init", "--out", str(tmp_path / bad)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "extension" in err
        assert not (tmp_path / bad).exists()


def test_overlay_is_built_at_a_bounded_resolution():
    big = Image.new("RGB", (3000, 1200), (10, 20, 30))
    assert overlay(big, torch.rand(2, 3)).size == (2048, 819)
    assert overlay(big, torch.rand(2, 3), max_side=300).size == (300, 120)
    assert overlay(big, torch.rand(2, 3), max_side=None).size == (3000, 1200)
    with pytest.raises(ValueError, match="max_side"):
        overlay(big, torch.rand(2, 3), max_side=0)


def test_cli_bad_image_is_one_line(tmp_path, capsys):
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    assert main([str(bad), "--model", "deit_tiny_patch16_224", "--random-init", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty.png is empty" in err


@pytest.mark.parametrize("device, message", [("tpu9", "is not a torch device"), ("cuda:7", "cuda")])
def test_cli_bad_device_is_refused_before_building(image_file, device, message, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        main([str(image_file), "--model", "deit_tiny_patch16_224", "--random-init", "--device", device])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err

"""``fastvit.inference_model`` and ``python -m fastvit.predict`` on tiny random models and generated images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import fastvit
from fastvit.checkpoints import load_checkpoint
from fastvit.convert import export_state_dict, save_export
from fastvit.inference import imagenet_classes, inference_model, preprocessing_config
from fastvit.predict import main as predict_main
from tests.checkpoints._tiny import tiny_vit

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8))


def test_result_dict_like_mmpretrain(image):
    model = tiny_vit("fastvit", num_classes=1000)
    result = inference_model(model, image)
    assert set(result) == {"pred_label", "pred_score", "pred_class", "pred_scores"}
    scores = result["pred_scores"]
    assert isinstance(scores, np.ndarray) and scores.shape == (1000,)
    assert abs(float(scores.sum()) - 1.0) < 1e-4
    assert isinstance(result["pred_label"], int) and result["pred_label"] == int(scores.argmax())
    assert result["pred_score"] == pytest.approx(float(scores.max()))
    assert result["pred_class"] == imagenet_classes()[result["pred_label"]]


def test_shipped_imagenet_class_names():
    names = imagenet_classes()
    assert len(names) == 1000
    assert names[0] == "tench, Tinca tinca" and names[281] == "tabby, tabby cat"
    assert names[999].startswith("toilet tissue")


def test_in21k_heads_get_timms_imagenet21k_names():
    from fastvit.inference import class_names

    names = class_names(tiny_vit("fastvit", num_classes=21843), 21843)
    assert names is not None and len(names) == 21843 and names[0] == "organism, being"
    assert class_names(tiny_vit("fastvit"), 10) is None


def test_every_image_input_kind_gives_the_same_prediction(tmp_path, image):
    model = tiny_vit("fastvit")
    path = tmp_path / "image.png"
    image.save(path)
    by_pil = inference_model(model, image)
    by_path = inference_model(model, str(path))
    by_array = inference_model(model, np.asarray(image))
    by_uint8 = inference_model(model, torch.from_numpy(np.array(image)).permute(2, 0, 1))
    by_float = inference_model(model, torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    for other in (by_path, by_array):
        np.testing.assert_array_equal(other["pred_scores"], by_pil["pred_scores"])
    # Tensors skip PIL: torchvision's tensor resize is close to, not bit-equal with, PIL's.
    for other in (by_uint8, by_float):
        np.testing.assert_allclose(other["pred_scores"], by_pil["pred_scores"], atol=2e-2)
    np.testing.assert_array_equal(by_uint8["pred_scores"], by_float["pred_scores"])
    batch = inference_model(model, [image, str(path)])
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_allclose(batch[1]["pred_scores"], by_pil["pred_scores"], atol=1e-6)
    assert by_pil["pred_class"] == str(by_pil["pred_label"])  # 10 classes: no names known


def test_google_weights_use_google_preprocessing(tmp_path):
    """After loading an .npz the image is resized to the input size (no crop) and scaled by mean = std = 0.5."""
    src = tiny_vit("fastvit", seed=0)
    npz = str(tmp_path / "ViT.npz")
    save_export(export_state_dict(src.state_dict(), "npz", num_heads=2), "npz", npz)
    model = tiny_vit("fastvit", seed=1)
    load_checkpoint(model, npz)
    cfg = preprocessing_config(model)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["crop_mode"] == "squash" and cfg["input_size"] == (3, 32, 32)

    img = torch.rand(3, 40, 50)
    expected_x = (TF.resize(img, [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=True) - 0.5) / 0.5
    with torch.no_grad():
        expected = model(expected_x[None]).softmax(-1)[0].numpy()
    np.testing.assert_allclose(inference_model(model, img)["pred_scores"], expected, rtol=1e-5, atol=1e-6)


def test_timm_config_preprocessing_center_crops():
    model = tiny_vit("fastvit")
    model.pretrained_cfg = {
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "crop_mode": "center",
    }
    img = torch.rand(3, 40, 50)
    x = TF.resize(img, 36, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)  # 32 / 0.875 -> 36
    x = TF.normalize(TF.center_crop(x, [32, 32]), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        expected = model(x[None]).softmax(-1)[0].numpy()
    np.testing.assert_allclose(inference_model(model, img)["pred_scores"], expected, rtol=1e-5, atol=1e-6)


def test_model_by_name_and_custom_classes(image):
    result = inference_model("vit_tiny_patch16_224", image, pretrained=False)
    assert result["pred_scores"].shape == (1000,)
    model = tiny_vit("fastvit", num_classes=3)
    assert inference_model(model, image, classes=["cat", "dog", "bird"])["pred_class"] in ("cat", "dog", "bird")
    with pytest.raises(ValueError, match="2 class names"):
        inference_model(model, image, classes=["cat", "dog"])


def test_predicts_in_eval_mode_and_restores_training_mode(image):
    model = tiny_vit("fastvit", drop_rate=0.5, attn_drop_rate=0.5)
    expected = inference_model(model, image)["pred_scores"]
    model.train()
    np.testing.assert_array_equal(inference_model(model, image)["pred_scores"], expected)
    assert model.training


def test_bad_images(tmp_path):
    model = tiny_vit("fastvit")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        inference_model(model, torch.rand(4, 32, 32))
    with pytest.raises(TypeError, match="image must be"):
        inference_model(model, 42)
    with pytest.raises(FileNotFoundError, match="no_such.png"):
        inference_model(model, str(tmp_path / "no_such.png"))


@pytest.fixture(scope="module")
def vit_tiny_checkpoint(tmp_path_factory) -> str:
    model = fastvit.create_model("vit_tiny_patch16_224")
    path = tmp_path_factory.mktemp("weights") / "vit_tiny_random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_predict_prints_topk_table(tmp_path, image, vit_tiny_checkpoint, capsys):
    path = tmp_path / "cat.jpg"
    image.save(path)
    args = [str(path), "--model", "vit_tiny_patch16_224", "--checkpoint", vit_tiny_checkpoint, "--topk", "3"]
    assert predict_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "model=vit_tiny_patch16_224" in lines[0]
    assert lines[1].split() == ["rank", "label", "score", "class"]
    assert len(lines) == 2 + 3
    ranks, labels, scores = zip(*[(int(r), int(lbl), float(s)) for r, lbl, s, *_ in (ln.split() for ln in lines[2:])])
    assert ranks == (1, 2, 3) and list(scores) == sorted(scores, reverse=True)
    assert lines[2].endswith(imagenet_classes()[labels[0]])


def test_predict_errors(tmp_path, image, vit_tiny_checkpoint, monkeypatch, capsys):
    path = tmp_path / "img.png"
    image.save(path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    assert predict_main([str(path), "--model", "vit_tiny_patch16_224"]) == 1
    assert "never downloads" in capsys.readouterr().err
    assert (
        predict_main(
            [str(path), "--model", "vit_tiny_patch16_224", "--checkpoint", vit_tiny_checkpoint, "--num-classes", "10"]
        )
        == 1
    )
    assert "num_classes=1000" in capsys.readouterr().err


@pytest.mark.slow  # > 4 s on 2 cores: out of the quick loop (pytest -m 'not slow'), CI runs it
def test_predict_module_entry_point(tmp_path, image, vit_tiny_checkpoint):
    """The real ``python -m fastvit.predict`` command line, once, in a fresh interpreter."""
    path = tmp_path / "img.png"
    image.save(path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastvit.predict",
            str(path),
            "--model",
            "vit_tiny_patch16_224",
            "--checkpoint",
            vit_tiny_checkpoint,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 2 + 5


@pytest.mark.gpu
def test_gpu_model_loads_and_predicts_like_cpu(tmp_path, image):
    """A model on the GPU takes a CPU-read checkpoint and gives the CPU model's prediction."""
    src = tiny_vit("fastvit", seed=0, num_classes=1000)
    path = tmp_path / "vit.npz"
    save_export(export_state_dict(src.state_dict(), "npz", num_heads=2), "npz", path)
    cpu_model = tiny_vit("fastvit", seed=1, num_classes=1000)
    gpu_model = tiny_vit("fastvit", seed=1, num_classes=1000).cuda()
    load_checkpoint(cpu_model, path)
    load_checkpoint(gpu_model, path)
    for (key, on_gpu), on_cpu in zip(gpu_model.state_dict().items(), cpu_model.state_dict().values()):
        assert torch.equal(on_gpu.cpu(), on_cpu), key
    cpu, gpu = inference_model(cpu_model, image), inference_model(gpu_model, image)
    np.testing.assert_allclose(gpu["pred_scores"], cpu["pred_scores"], rtol=1e-2, atol=1e-5)


# --- images: deep / float modes scaled or refused, broken files one line, headless models refused -----------


def _gradient_8bit() -> np.ndarray:
    return np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))


def _rgb(img) -> np.ndarray:
    from fastvit.inference import _to_image

    return np.asarray(_to_image(img))


def test_16_bit_and_unit_float_images_are_scaled_like_their_8_bit_version(tmp_path):
    g8 = _gradient_8bit()
    expected = np.asarray(Image.fromarray(g8, "L").convert("RGB"))
    g16 = Image.fromarray(g8.astype(np.uint16) * 257)  # mode I;16, full scale 65535
    assert g16.mode == "I;16"
    g16.save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as reopened:
        assert reopened.mode.startswith("I")
    for img in (g16, tmp_path / "deep.png", Image.fromarray(g8.astype(np.float32) / 255.0, "F")):
        np.testing.assert_array_equal(_rgb(img), expected)


def test_images_without_a_known_full_scale_are_refused():
    with pytest.raises(ValueError, match=r"32-bit integer image \(mode 'I', values 0\.\.255\)"):
        _rgb(Image.fromarray(_gradient_8bit().astype(np.int32), "I"))
    with pytest.raises(ValueError, match=r"float image \(mode 'F'\) with values 0\.\.255.*0\.\.1"):
        _rgb(Image.fromarray(_gradient_8bit().astype(np.float32), "F"))


def test_float_tensor_in_0_255_is_not_taken_as_0_1():
    model = tiny_vit("fastvit")
    pixels = torch.rand(3, 32, 32) * 255
    with pytest.raises(ValueError, match=r"0\.\.1, got .*divide by 255"):
        inference_model(model, pixels)
    with pytest.raises(ValueError, match="un-normalised"):
        inference_model(model, torch.randn(3, 32, 32))
    inference_model(model, pixels / 255)  # the same image in 0..1 is fine


def _png_bytes(size=(64, 48)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"this is a text file, not a picture\n", "is not an image file"),
        (_png_bytes()[:300], "truncated or corrupt"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_broken_image_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        inference_model(tiny_vit("fastvit"), path)
    assert "photo.png" in str(err.value) and "\n" not in str(err.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes((64, 48)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 pixels: over the warning limit
    with pytest.raises(ValueError, match=r"bomb\.png: refused as a possible decompression bomb"):
        inference_model(tiny_vit("fastvit"), path)


def test_headless_model_is_refused(tmp_path, image, capsys):
    with pytest.raises(ValueError, match=r"no classifier \(num_classes=0\)"):
        inference_model(tiny_vit("fastvit", num_classes=0), image)
    path = tmp_path / "img.png"
    image.save(path)
    with pytest.raises(SystemExit) as exit_info:
        predict_main([str(path), "--model", "vit_tiny_patch16_224", "--num-classes", "0", "--checkpoint", "w.pth"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--num-classes must be >= 1" in err


def test_predict_bad_image_one_line_and_debug_traceback(tmp_path, vit_tiny_checkpoint, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    args = [str(bad), "--model", "vit_tiny_patch16_224", "--checkpoint", vit_tiny_checkpoint]
    assert predict_main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.jpg" in err and "not an image file" in err
    with pytest.raises(ValueError, match="not an image file"):
        predict_main([*args, "--debug"])

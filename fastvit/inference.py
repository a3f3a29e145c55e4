"""mmpretrain-style inference: ``fastvit.inference_model(model_or_name, image)`` -> prediction dict.

The image is preprocessed the way the model's weights expect, from ``model.pretrained_cfg``
(timm's eval transform: resize, center crop by ``crop_pct``, normalise); Google ``.npz`` and jeonsworld
weights set it to Google's (resize to the square input without a crop, mean = std = 0.5) when they
are loaded. The input size is the model's own (``patch_embed.img_size``). Class names: the 1000
ImageNet-1k names shipped in ``fastvit/data/imagenet_classes.txt`` (generated from timm's ImageNet
info), timm's ImageNet-21k/22k names for those heads, else the label number.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "IMAGENET_CLASSES_FILE",
    "class_names",
    "imagenet_classes",
    "inference_model",
    "preprocessing_config",
    "build_transform",
    "load_image",
    "require_classifier",
    "to_rgb",
]

IMAGENET_CLASSES_FILE = "data/imagenet_classes.txt"
_DEFAULTS = {
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}

ImageInput = Union[str, "os.PathLike[str]", "Image.Image", torch.Tensor, np.ndarray]  # noqa: F821


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names shipped with fastvit, index = label."""
    text = resources.files("fastvit").joinpath(IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f"fastvit/{IMAGENET_CLASSES_FILE} has {len(names)} names instead of 1000: reinstall fastvit")
    return names


def class_names(model: nn.Module, num_classes: int) -> Optional[Sequence[str]]:
    """Names for the ``num_classes`` outputs of ``model``, or ``None`` when no list of that size is known."""
    if num_classes == 1000:
        return imagenet_classes()
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            if info.num_classes() == num_classes:
                return [info.index_to_description(i) for i in range(num_classes)]
    except Exception:  # older timm without ImageNetInfo, or a config it cannot read: fall back to numbers
        pass
    return None


def _model_input_size(model: nn.Module) -> Optional[tuple[int, int]]:
    for owner in (getattr(model, "patch_embed", None), model):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return int(size[0]), int(size[1])
    return None


def preprocessing_config(model: nn.Module) -> dict[str, Any]:
    """input_size, interpolation, mean, std, crop_pct, crop_mode for ``model`` (module docstring)."""
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = dict(cfg) if isinstance(cfg, Mapping) else {}
    out = {k: cfg.get(k) if cfg.get(k) is not None else v for k, v in _DEFAULTS.items()}
    size = _model_input_size(model) or tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    out["input_size"] = (3, *size)
    return out


def build_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform for :func:`preprocessing_config`; takes a PIL image or a (3, H, W) float tensor."""
    from timm.data import create_transform

    return create_transform(is_training=False, **preprocessing_config(model))


# 16-bit integer modes PIL opens (PNG / TIFF / PGM): full scale is 65535.
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Float tensors / F images may exceed [0, 1] by rounding of a resize or colour conversion; not more.
_UNIT_TOLERANCE = 1e-3


def load_image(path: Union[str, "os.PathLike[str]"]) -> "Image.Image":  # noqa: F821
    """Open an image file fully (decoded now, file closed) as PIL would, with one-line errors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty, not an image, truncated / corrupt, or larger than PIL's decompression-bomb limit
            (``PIL.Image.MAX_IMAGE_PIXELS``); the message names the file.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"image file not found: {name}")
    if os.path.getsize(name) == 0:
        raise ValueError(f"{name} is empty (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(name) as img:
                img.load()
                return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(
            f"{name}: refused as a possible decompression bomb ({' '.join(str(exc).split())}); shrink the image, "
            "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(f"{name} ({os.path.getsize(name):,} bytes) is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL's truncated / corrupt-data errors
        raise ValueError(
            f"{name} could not be decoded ({type(exc).__name__}: {' '.join(str(exc).split())}): "
            "the file looks truncated or corrupt"
        ) from None


def to_rgb(img: "Image.Image", what: str = "image") -> "Image.Image":  # noqa: F821
    """``img`` as 8-bit RGB, scaling the modes PIL's ``convert`` would clip: 16-bit integer (I;16*) by
    65535, float (F) in [0, 1] by 255. 32-bit integer (I) and floats outside [0, 1] have no known full
    scale and are refused."""
    from PIL import Image

    mode = img.mode
    if mode in _MODES_16BIT:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        return Image.fromarray((arr * 255.0).round().astype(np.uint8), "L").convert("RGB")
    if mode == "I":
        lo, hi = img.getextrema()
        raise ValueError(
            f"{what} is a 32-bit integer image (mode 'I', values {lo}..{hi}) whose full scale is unknown; "
            "convert it to 8-bit (or 16-bit) RGB first"
        )
    if mode == "F":
        lo, hi = img.getextrema()
        if not (np.isfinite([lo, hi]).all() and lo >= -_UNIT_TOLERANCE and hi <= 1 + _UNIT_TOLERANCE):
            raise ValueError(
                f"{what} is a float image (mode 'F') with values {lo:g}..{hi:g}; fastvit reads float images "
                "in 0..1: scale it to 0..1 (or convert it to 8-bit RGB) first"
            )
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return Image.fromarray((arr * 255.0).round().astype(np.uint8), "L").convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _check_unit_range(t: torch.Tensor) -> None:
    lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
    if not (np.isfinite([lo, hi]).all() and lo >= -_UNIT_TOLERANCE and hi <= 1 + _UNIT_TOLERANCE):
        hint = (
            "it looks like 0..255 pixels: divide by 255 (or pass a uint8 tensor)"
            if hi > 1 + _UNIT_TOLERANCE and lo >= -_UNIT_TOLERANCE
            else "pass the un-normalised image (fastvit normalises it with the model's mean / std)"
        )
        raise ValueError(f"a float tensor image must hold values in 0..1, got {lo:g}..{hi:g}: {hint}")


def _to_image(image: ImageInput) -> Any:
    """A PIL RGB image, or a float (3, H, W) tensor in [0, 1]."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return to_rgb(load_image(image), os.fspath(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
            raise ValueError(f"a numpy image must be uint8 (H, W, C), C in 1, 3, 4; got {image.dtype} {image.shape}")
        return Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must have shape (3, H, W) (or (1, 3, H, W)); got {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            return t.float() / 255.0
        if not t.is_floating_point():
            raise ValueError(f"a tensor image must be uint8 (0..255) or float (0..1); got {t.dtype}")
        _check_unit_range(t)
        return t.float()
    raise TypeError(f"image must be a path, PIL image, uint8 numpy array or tensor; got {type(image).__name__}")


def require_classifier(model: nn.Module) -> None:
    """Refuse a headless model (``num_classes=0``): its outputs are features, not class scores."""
    if getattr(model, "num_classes", None) == 0 or isinstance(getattr(model, "head", None), nn.Identity):
        raise ValueError(
            f"{type(model).__name__} has no classifier (num_classes=0): its outputs are pooled features, not "
            "class scores. Create it with num_classes > 0 (or load a checkpoint with a head)"
        )


@torch.inference_mode()
def inference_model(
    model: Union[nn.Module, str],
    image: Union[ImageInput, Sequence[ImageInput]],
    *,
    pretrained: Union[bool, str] = True,
    classes: Optional[Sequence[str]] = None,
) -> Union[dict[str, Any], list[dict[str, Any]]]:
    """Classify ``image`` with ``model`` (mmpretrain's ``inference_model``).

    Args:
        model: a model, or a name for :func:`fastvit.create_model` (built with ``pretrained``).
        image: an image path, PIL image, uint8 (H, W, C) numpy array or (3, H, W) tensor (float in
            [0, 1] or uint8), or a list of them.
        pretrained: weights for a model given by name (``True``: the local cache; or a checkpoint path).
        classes: class names to report instead of the built-in ones.

    Raises:
        ValueError: a headless model (``num_classes=0``), a float tensor outside 0..1, an image file that is
            empty / not an image / truncated / a decompression bomb, or a 32-bit integer / out-of-range float
            image (16-bit and 0..1 float images are scaled to 8 bits).

    Returns:
        ``{'pred_scores': np.ndarray (num_classes,) softmax probabilities, 'pred_label': int,
        'pred_score': float, 'pred_class': str}``; a list of those for a list of images.
    """
    if isinstance(model, str):
        from fastvit.models import create_model

        model = create_model(model, pretrained=pretrained)
    require_classifier(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    transform = build_transform(model)
    batch = torch.stack([transform(_to_image(img)) for img in images]).to(device)
    was_training = model.training
    model.eval()  # predictions use eval-mode dropout / distilled-head averaging; the caller's mode is restored
    try:
        logits = model(batch)
    finally:
        model.train(was_training)
    if logits.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} returned shape {tuple(logits.shape)}, not (batch, num_classes) class scores: "
            "inference_model needs a classifier"
        )
    scores = logits.float().softmax(dim=-1).cpu().numpy()
    names = list(classes) if classes is not None else class_names(model, scores.shape[-1])
    if names is not None and len(names) != scores.shape[-1]:
        raise ValueError(f"{len(names)} class names given for a model with {scores.shape[-1]} outputs")
    results = []
    for row in scores:
        label = int(row.argmax())
        results.append(
            {
                "pred_scores": row,
                "pred_label": label,
                "pred_score": float(row[label]),
                "pred_class": names[label] if names is not None else str(label),
            }
        )
    return results if isinstance(image, (list, tuple)) else results[0]

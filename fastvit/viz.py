"""Attention rollout (Abnar & Zuidema 2020, as in jeonsworld/ViT-pytorch's notebook) and a PNG overlay.

Recipe, for per-layer probabilities A_l (B, H, N, N) collected with :func:`fastvit.return_attention`::

    A_l   = mean over heads of A_l                       # (B, N, N)
    R_l   = (A_l + I) / rowsum(A_l + I)                  # the residual path, renormalised
    J     = R_L @ ... @ R_2 @ R_1                        # rollout through the layers
    mask  = J[:, 0, P:] reshaped to the patch grid       # class-token row, P prefix tokens dropped
    mask /= max(mask)                                    # per image, in [0, 1]

Command line::

    python -m fastvit.viz IMAGE --model NAME [--checkpoint PATH | --random-init] --out rollout.png

NAME is a fastvit model (``fastvit.list_models()``) or any timm model name (built by timm and patched
with :func:`fastvit.patch_model`). Without ``--checkpoint`` the cached pretrained weights are used;
``--random-init`` runs with random weights (for smoke tests: the map then shows no learned attention).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastvit._cli import ArgumentParser, add_debug_flag, check_device, run_main
from fastvit._geometry import patch_grid
from fastvit.patch import return_attention

__all__ = [
    "MAX_OVERLAY_SIDE",
    "attention_rollout",
    "main",
    "output_format",
    "overlay",
    "rollout_from_maps",
    "save_overlay",
]


def rollout_from_maps(maps: Sequence[Tensor], num_prefix_tokens: int = 1) -> Tensor:
    """The rollout recipe (module docstring) on collected probabilities, before the grid reshape.

    Args:
        maps: per-layer (B, H, N, N) attention probabilities, first layer first.
        num_prefix_tokens: P, the class (+ distillation / register) tokens in front of the patches.

    Returns:
        (B, N - P) float32 scores of the patch tokens, each row scaled to max 1.

    Raises:
        ValueError: no maps, or maps of different or non-square shapes.
    """
    if not maps:
        raise ValueError("fastvit.viz.rollout_from_maps: no attention maps (did the model run any attention layer?)")
    shape = tuple(maps[0].shape)
    for i, a in enumerate(maps):
        if a.dim() != 4 or a.shape[-1] != a.shape[-2] or tuple(a.shape) != shape:
            raise ValueError(
                f"fastvit.viz.rollout_from_maps: map {i} has shape {tuple(a.shape)}; every map must be "
                f"(B, H, N, N) with the shape of map 0 {shape}"
            )
    B, _, N, _ = shape
    if not 0 <= num_prefix_tokens < N:
        raise ValueError(
            f"fastvit.viz.rollout_from_maps: num_prefix_tokens {num_prefix_tokens} out of range for {N} tokens"
        )
    eye = torch.eye(N, device=maps[0].device, dtype=torch.float32)
    joint = eye.expand(B, N, N)
    for a in maps:
        aug = a.float().mean(dim=1) + eye
        aug = aug / aug.sum(dim=-1, keepdim=True)
        joint = aug @ joint
    scores = joint[:, 0, num_prefix_tokens:]
    return scores / scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _token_grid(model: nn.Module, num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) patch grid of ``num_patches`` tokens for an image of ``image_hw``."""
    embed = getattr(model, "patch_embed", None)
    candidates = []
    grid = getattr(embed, "grid_size", None)
    if grid is not None:
        candidates.append(tuple(int(g) for g in grid))
    patch = getattr(embed, "patch_size", None)
    if patch is not None and getattr(embed, "backbone", None) is None:
        p = patch if isinstance(patch, int) else patch[0]
        candidates.append(patch_grid(image_hw[0], image_hw[1], p))
    side = math.isqrt(num_patches)
    candidates.append((side, side))
    for h, w in candidates:
        if h * w == num_patches:
            return h, w
    raise ValueError(
        f"fastvit.viz: cannot arrange {num_patches} patch tokens on a grid for a {image_hw[0]}x{image_hw[1]} image; "
        "the model needs a patch_embed with grid_size / patch_size"
    )


@torch.no_grad()
def attention_rollout(model: nn.Module, image: Tensor, *, num_prefix_tokens: Optional[int] = None) -> Tensor:
    """Attention-rollout mask of ``model`` for preprocessed ``image`` (module docstring for the recipe).

    Args:
        model: a fastvit ViT / DeiT or a timm ViT (patched or not); run as it is (call ``.eval()`` first
            for the usual maps).
        image: (3, H, W) or (B, 3, H, W) preprocessed input on the model's device.
        num_prefix_tokens: P; default ``model.num_prefix_tokens`` (1 for ViT, 2 for distilled DeiT).

    Returns:
        (h, w) mask for a (3, H, W) image, (B, h, w) for a batch: float32 in [0, 1] on the patch grid.

    Raises:
        ValueError: not an image tensor, no attention layers, or tokens that do not form the patch grid.
    """
    if not isinstance(image, Tensor) or image.dim() not in (3, 4):
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"fastvit.viz.attention_rollout: image must be a (3, H, W) or (B, 3, H, W) tensor, got {got}")
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    prefix = int(getattr(model, "num_prefix_tokens", 1)) if num_prefix_tokens is None else num_prefix_tokens
    with return_attention(model) as maps:
        model(batch)
    scores = rollout_from_maps(maps, prefix)
    h, w = _token_grid(model, scores.shape[-1], (batch.shape[-2], batch.shape[-1]))
    mask = scores.reshape(-1, h, w)
    return mask[0] if image.dim() == 3 else mask


def _jet(mask: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) float RGB in [0, 1] (the classic 'jet' ramp, no matplotlib needed)."""
    m = mask[..., None]
    centers = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # red, green, blue peaks
    return np.clip(1.5 - np.abs(4.0 * (m - centers)), 0.0, 1.0)


MAX_OVERLAY_SIDE = 2048


def overlay(
    image: Any, mask: Union[Tensor, np.ndarray], *, alpha: float = 0.5, max_side: Optional[int] = MAX_OVERLAY_SIDE
) -> "Image.Image":  # noqa: F821
    """The mask, resized to the image and coloured, blended over it.

    Args:
        image: path, PIL image, uint8 (H, W, C) array or (3, H, W) tensor (float in [0, 1] or uint8).
        mask: (h, w) scores in [0, 1] (e.g. from :func:`attention_rollout`).
        alpha: weight of the heat map (0: image only, 1: heat map only).
        max_side: the overlay is built at most this many pixels on its longer side (the image is shrunk
            first, aspect kept), so a huge photo costs megabytes, not gigabytes; ``None``: full size.

    Returns:
        An RGB PIL image of the input's size (shrunk to ``max_side``).
    """
    from PIL import Image

    from fastvit.inference import _to_image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fastvit.viz.overlay: alpha must be in [0, 1], got {alpha}")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"fastvit.viz.overlay: max_side must be a positive int or None, got {max_side!r}")
    img = _to_image(image)
    if isinstance(img, Tensor):
        img = Image.fromarray((img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    m = mask.detach().float().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"fastvit.viz.overlay: mask must be (h, w), got shape {m.shape}")
    resized = np.asarray(Image.fromarray(m.astype(np.float32)).resize(img.size, Image.BILINEAR))
    base = np.asarray(img, dtype=np.float32) / 255.0
    blended = (1.0 - alpha) * base + alpha * _jet(np.clip(resized, 0.0, 1.0))
    return Image.fromarray((blended * 255).round().astype(np.uint8))


_OUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF"}


def output_format(path: Union[str, os.PathLike]) -> str:
    """The image format ``path``'s extension asks for (``.png``, ``.jpg``/``.jpeg``, ``.webp``, ``.bmp``, ``.tif``).

    Raises:
        ValueError: another or no extension.
    """
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in _OUT_FORMATS:
        raise ValueError(
            f"cannot tell the image format of {os.fspath(path)} from its extension {ext or '(none)'!r}: "
            f"end it with one of {', '.join(_OUT_FORMATS)}"
        )
    return _OUT_FORMATS[ext]


def save_overlay(
    image: Any,
    mask: Union[Tensor, np.ndarray],
    path: Union[str, os.PathLike],
    *,
    alpha: float = 0.5,
    max_side: Optional[int] = MAX_OVERLAY_SIDE,
) -> str:
    """Writes :func:`overlay` to ``path`` in the format its extension names (:func:`output_format`), atomically
    (:mod:`fastvit.fileio`), parent folders created; returns the path."""
    from fastvit.fileio import WriteError, atomic_write

    out = os.fspath(path)
    fmt = output_format(out)
    picture = overlay(image, mask, alpha=alpha, max_side=max_side)
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {out}: cannot create its folder {parent} ({exc.strerror})") from None
    with atomic_write(out) as f:
        picture.save(f, format=fmt)
    return out


def _build_model(name: str, checkpoint: Optional[str], random_init: bool) -> nn.Module:
    """A fastvit model by that name, else a timm model patched with fastvit's kernels."""
    import fastvit

    if name.split(".")[0] in fastvit.list_models():
        model = fastvit.create_model(name, pretrained=False if (checkpoint or random_init) else True)
        if checkpoint:
            fastvit.load_checkpoint(model, checkpoint)
        return model
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown model {name!r}: not in fastvit.list_models() nor in timm.list_models()")
    model = timm.create_model(name, pretrained=not (checkpoint or random_init), checkpoint_path=checkpoint or "")
    fastvit.patch_model(model)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(
        prog="python -m fastvit.viz",
        description="Attention rollout of a ViT on an image, written as a PNG heat-map overlay.",
    )
    parser.add_argument("image", help="image file")
    parser.add_argument("--model", required=True, help="fastvit or timm model name, e.g. vit_base_patch16_224")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="weights file; default: the cached pretrained weights")
    source.add_argument("--random-init", action="store_true", help="random weights (smoke tests; no learned maps)")
    parser.add_argument(
        "--out", default="rollout.png", help="output image; format from the extension: .png .jpg .webp .bmp .tif"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map weight in the blend (default 0.5)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=MAX_OVERLAY_SIDE,
        help=f"longest side of the overlay (default {MAX_OVERLAY_SIDE})",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.max_side < 1:
        parser.error(f"--max-side must be a positive number of pixels, got {args.max_side}")
    try:
        output_format(args.out)
    except ValueError as exc:
        parser.error(f"--out: {exc}")

    def body() -> int:
        from fastvit.inference import _to_image, build_transform

        image = _to_image(args.image)  # a bad image fails before the model is built
        model = _build_model(args.model, args.checkpoint, args.random_init).to(args.device).eval()
        x = build_transform(model)(image).to(args.device)
        mask = attention_rollout(model, x)
        out = save_overlay(image, mask, args.out, alpha=args.alpha, max_side=args.max_side)
        weights = "random init" if args.random_init else (args.checkpoint or "cached pretrained weights")
        print(f"{args.image}  model={args.model}  weights={weights}  grid={tuple(mask.shape)}  -> {out}")
        return 0

    return run_main(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

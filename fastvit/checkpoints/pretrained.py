"""``pretrained=True``: find a model's published weights in the local caches. fastvit never downloads.

Where the weights of a name come from is timm's pretrained config (``timm.models.get_pretrained_cfg``;
``name.tag`` picks a tag, a bare name the default tag), or, for the T2T-ViT models timm does not have,
the official release table below. A config names

* ``hf_hub_id`` (``org/repo[@revision]``): the file is looked up in the Hugging Face hub cache,
  ``$HF_HUB_CACHE`` (else ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
  ``~/.cache/huggingface/hub``) ``/models--ORG--REPO/snapshots/<commit>/FILE``, where ``<commit>`` is
  read from ``refs/<revision>`` (default ``main``), else any snapshot holding the file. FILE is the
  config's ``hf_hub_filename``, else ``model.safetensors`` then ``pytorch_model.bin`` (timm's order);
* ``url``: the file ``torch.hub.get_dir()/checkpoints/<basename of the url>`` (``$TORCH_HOME/hub``),
  where ``torch.hub.load_state_dict_from_url`` and older timm put it;
* ``file``: that local path.

The first existing candidate wins; none existing raises :class:`PretrainedWeightsNotFound` listing
every path tried and how to fetch one on a machine with network access.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from fastvit.checkpoints._common import shorten
from fastvit.models.t2t import PRETRAINED_CFG as _T2T_MODEL_CFG

__all__ = [
    "PretrainedWeightsNotFound",
    "T2T_OFFICIAL_CFGS",
    "hf_hub_cache_dir",
    "pretrained_cfg_for",
    "resolve_pretrained_file",
]

_T2T_RELEASE = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"
# The official weights' preprocessing, as the model states it (fastvit.models.t2t), with a center crop.
_T2T_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "mean", "std", "num_classes", "classifier")
_T2T_DATA = {**{k: _T2T_MODEL_CFG[k] for k in _T2T_DATA_KEYS}, "crop_mode": "center"}
# Official T2T-ViT releases (README of yitu-opensource/T2T-ViT); timm has no T2T-ViT.
T2T_OFFICIAL_CFGS: dict[str, dict[str, Any]] = {
    name: {"architecture": name, "tag": "in1k", "url": _T2T_RELEASE + file, **_T2T_DATA}
    for name, file in {
        "t2t_vit_7": "71.7_T2T_ViT_7.pth.tar",
        "t2t_vit_10": "75.2_T2T_ViT_10.pth.tar",
        "t2t_vit_12": "76.5_T2T_ViT_12.pth.tar",
        "t2t_vit_14": "81.5_T2T_ViT_14.pth.tar",
        "t2t_vit_19": "81.9_T2T_ViT_19.pth.tar",
        "t2t_vit_24": "82.3_T2T_ViT_24.pth.tar",
        "t2t_vit_t_14": "81.7_T2T_ViTt_14.pth.tar",
        "t2t_vit_t_19": "82.4_T2T_ViTt_19.pth.tar",
        "t2t_vit_t_24": "82.6_T2T_ViTt_24.pth.tar",
    }.items()
}

_HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsNotFound(FileNotFoundError):
    """No cached file holds the weights ``pretrained=True`` asked for; the message lists the paths tried."""


def pretrained_cfg_for(name: str) -> Optional[dict[str, Any]]:
    """The pretrained config of ``name`` (``arch`` or ``arch.tag``) as a dict, or ``None`` if no source has one.

    timm's deprecated aliases resolve to their new name and tag (``vit_base_resnet50_384`` ->
    ``vit_base_r50_s16_384.orig_in21k_ft_in1k``).

    Raises:
        PretrainedWeightsNotFound: the architecture is known but has no such tag (the message lists its tags).
    """
    arch, _, tag = name.partition(".")
    if arch in T2T_OFFICIAL_CFGS:
        if tag not in ("", "in1k"):
            raise PretrainedWeightsNotFound(f"{name!r}: T2T-ViT weights have the tag 'in1k' only (official release)")
        return dict(T2T_OFFICIAL_CFGS[arch])
    try:
        import timm
        from timm.models import get_deprecated_models, get_pretrained_cfg
    except ImportError:  # timm is a dependency; without it only the T2T-ViT table is known
        return None
    if not tag:
        name = get_deprecated_models().get(arch, name)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:  # a known architecture with an unknown tag
        tags = timm.list_pretrained(f"{arch}.*")
        raise PretrainedWeightsNotFound(f"{name!r}: {exc} Known: {shorten(tags, limit=12)}") from exc
    return cfg.to_dict() if cfg is not None else None


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, resolved from the environment at call time (module docstring)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hf_candidates(hub_id: str, filenames: tuple[str, ...]) -> list[Path]:
    repo, _, revision = hub_id.partition("@")
    revision = revision or "main"
    repo_dir = hf_hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    ref = repo_dir / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    candidates = []
    for filename in filenames:
        if commit is not None:
            candidates.append(snapshots / commit / filename)
        else:
            # No ref recorded (a hand-made or copied cache): any snapshot holding the file, newest first.
            found = sorted(snapshots.glob(f"*/{filename}"), key=lambda p: p.stat().st_mtime, reverse=True)
            candidates.extend(found or [snapshots / f"<commit of refs/{revision}>" / filename])
    return candidates


def _candidates(cfg: dict[str, Any]) -> list[Path]:
    paths: list[Path] = []
    if cfg.get("file"):
        paths.append(Path(cfg["file"]).expanduser())
    if cfg.get("hf_hub_id"):
        filename = cfg.get("hf_hub_filename")
        paths.extend(_hf_candidates(cfg["hf_hub_id"], (filename,) if filename else _HF_DEFAULT_FILES))
    if cfg.get("url"):
        paths.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg["url"]).path))
    return paths


def resolve_pretrained_file(name: str, cfg: Optional[dict[str, Any]] = None) -> Path:
    """Path of the cached weights for model ``name`` (``arch`` or ``arch.tag``); never downloads.

    Args:
        name: the model name given to ``create_model``.
        cfg: a pretrained config to use instead of looking ``name`` up (keys ``hf_hub_id``,
            ``hf_hub_filename``, ``url``, ``file``).

    Raises:
        PretrainedWeightsNotFound: no source knows ``name``, or none of the candidate files exists.
    """
    cfg = cfg if cfg is not None else pretrained_cfg_for(name)
    if cfg is None:
        raise PretrainedWeightsNotFound(
            f"no pretrained weights are known for {name!r} (neither timm's pretrained configs nor fastvit's T2T-ViT "
            "table has it); pass pretrained=PATH to load a file you have"
        )
    candidates = _candidates(cfg)
    for path in candidates:
        if path.is_file():
            return path
    hints = []
    if cfg.get("hf_hub_id"):
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        filename = cfg.get("hf_hub_filename") or _HF_DEFAULT_FILES[0]
        rev = f" --revision {revision}" if revision else ""
        hints.append(f"`huggingface-cli download {repo} {filename}{rev}`")
    if cfg.get("url"):
        hints.append(f"download {cfg['url']} into {Path(torch.hub.get_dir()) / 'checkpoints'}")
    if name.partition(".")[0] in T2T_OFFICIAL_CFGS:
        # timm has no T2T-ViT: only the official release has these files.
        source = f" (the official yitu-opensource/T2T-ViT release file {os.path.basename(urlparse(cfg['url']).path)})"
    else:
        source = f" (or run timm.create_model({name!r}, pretrained=True) once)"
    raise PretrainedWeightsNotFound(
        f"pretrained weights for {name!r} are not in the local cache and fastvit never downloads (offline). "
        f"Looked for: {shorten([str(p) for p in candidates], limit=10)}. On a machine with network access, "
        f"{' or '.join(hints) or 'fetch the file'}{source} and copy "
        "the cache here, set HF_HUB_CACHE / TORCH_HOME to where it is, or pass pretrained=PATH."
    )

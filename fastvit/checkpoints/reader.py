"""Reading a checkpoint file: container, wrappers, format detection, and the rename to fastvit's names
(:func:`read_checkpoint`, :func:`detect_format`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from fastvit.checkpoints import mmpretrain as _mmpretrain
from fastvit.checkpoints import mmseg as _mmseg
from fastvit.checkpoints import npz as _npz
from fastvit.checkpoints import t2t_official as _t2t_official
from fastvit.checkpoints import timm as _timm
from fastvit.checkpoints import vit_pytorch as _vit_pytorch
from fastvit.checkpoints._common import CheckpointError, StateDict, shorten
from fastvit.checkpoints._io import read_container

_log = logging.getLogger("fastvit.checkpoints")

PathLike = Union[str, "os.PathLike[str]"]

FORMATS: dict[str, str] = {
    "npz": "Google JAX .npz",
    "timm": "timm state dict",
    "deit": "DeiT {'model': ...} checkpoint",
    "t2t_official": "official T2T-ViT checkpoint",
    "mmpretrain": "mmpretrain classifier checkpoint",
    "mmseg": "mmseg ViT backbone",
    "vit_pytorch": "jeonsworld/ViT-pytorch checkpoint",
}

# Formats whose keys are the same names (a forced one of them is not a mismatch).
_NAME_FAMILY = {"deit": "timm"}

# Wrapper keys, most preferred first; EMA weights are what timm-trained releases (T2T-ViT) report.
_WRAPPERS_EMA = ("state_dict_ema",)
_WRAPPERS = ("state_dict", "model", "module")


@dataclass
class Checkpoint:
    """A checkpoint read from a file, its keys already in fastvit's names.

    Attributes:
        state_dict: the tensors, renamed to fastvit's (timm / official T2T) names.
        format: the detected (or forced) format, a key of :data:`FORMATS`.
        source: the file path, or ``"<state dict>"``.
        wrapper: the wrapper keys that were removed, e.g. ``["state_dict_ema"]``.
        ignored: source keys deliberately left out (segmentation heads, ``pre_logits``, ...).
        detected: what sniffing the keys found (differs from ``format`` when a format was forced).
    """

    state_dict: StateDict
    format: str
    source: str
    wrapper: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    detected: Optional[str] = None

    @property
    def description(self) -> str:
        wrapped = f" inside {'/'.join(repr(w) for w in self.wrapper)}" if self.wrapper else ""
        text = f"format {self.format!r} ({FORMATS[self.format]}{wrapped})"
        if self.detected != self.format:
            text += ", forced by format="
            if self.detected:
                text += f"; its keys look like {self.detected!r}"
            return text
        return "detected " + text


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, use_ema: bool) -> tuple[StateDict, list[str]]:
    wrapper: list[str] = []
    names = (_WRAPPERS_EMA if use_ema else ()) + _WRAPPERS
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((k for k in names if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if inner is None:
            break
        wrapper.append(inner)
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict of tensors, found a {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}  # saved from a DistributedDataParallel wrapper
    return sd, wrapper


def detect_format(state_dict: Mapping[str, torch.Tensor], wrapper: Optional[list[str]] = None) -> Optional[str]:
    """The format a state dict's keys belong to, or ``None`` if no format recognises them.

    Args:
        state_dict: the tensors, wrappers and a ``module.`` prefix already removed.
        wrapper: the wrapper keys that were removed; ``'model'`` marks a DeiT file.
    """
    if _vit_pytorch.is_vit_pytorch(state_dict):
        return "vit_pytorch"
    if _mmseg.is_mmseg(state_dict):
        return "mmseg"
    if _mmpretrain.is_mmpretrain(state_dict):
        return "mmpretrain"
    if _t2t_official.is_t2t_official(state_dict):
        return "t2t_official"
    if _timm.is_timm(state_dict):
        return "deit" if wrapper and wrapper[-1] == "model" else "timm"
    return None


def _to_native(fmt: str, sd: StateDict) -> tuple[StateDict, list[str]]:
    """Convert ``sd`` from ``fmt`` to fastvit names; also return the keys deliberately left out."""
    if fmt in ("timm", "deit"):
        return _timm.timm_to_native(sd), [k for k in sd if k.startswith("pre_logits.")]
    if fmt == "mmseg":
        backbone, ignored = _mmseg.split_segmentor(sd)
        return _mmseg.mmseg_to_timm(backbone), ignored
    if fmt == "mmpretrain":
        ignored = [k for k in sd if k.startswith(_mmpretrain.IGNORED_PARTS + ("neck.",))]
        return _mmpretrain.mmpretrain_to_native({k: v for k, v in sd.items() if k not in ignored}), ignored
    if fmt == "vit_pytorch":
        return _vit_pytorch.vit_pytorch_to_native(sd), []
    if fmt == "t2t_official":
        return _t2t_official.convert_t2t_official(sd), []
    raise CheckpointError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)} or 'auto'")


def _describe_keys(keys: list[str]) -> str:
    return shorten(sorted(keys), limit=12)


def read_checkpoint(
    source: Union[PathLike, Mapping[str, Any]], format: str = "auto", *, use_ema: bool = True
) -> Checkpoint:
    """Read a checkpoint file (or an already loaded dict) and rename its keys to fastvit's names.

    Args:
        source: a file path (any container: torch pickle, safetensors, npz) or a loaded checkpoint dict.
        format: ``"auto"`` (sniff) or a key of :data:`FORMATS` to force one.
        use_ema: prefer ``state_dict_ema`` over ``state_dict`` when a timm train checkpoint has both.

    Raises:
        CheckpointError: unreadable / truncated file, unknown format, or a layout the format cannot convert.
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    if format != "auto" and format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; choose one of {sorted(FORMATS)} or 'auto'")
    if isinstance(source, Mapping):
        arrays = len(source) > 0 and all(isinstance(v, np.ndarray) for v in source.values())
        return _from_content("<state dict>", "npz" if arrays else "torch", source, format, use_ema)
    container, content = read_container(source)
    return _from_content(os.fspath(source), container, content, format, use_ema)


def _from_content(name: str, container: str, content: Any, format: str = "auto", use_ema: bool = True) -> Checkpoint:
    """:func:`read_checkpoint` of content already read (``read_container``'s ``(container, content)``),
    so a caller that looked at a file's content first does not read the file twice."""
    if format != "auto" and format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; choose one of {sorted(FORMATS)} or 'auto'")
    if container == "npz":
        if format not in ("auto", "npz"):
            raise CheckpointError(
                f"{name} is a numpy .npz archive (Google layout), not format={format!r}; use format='npz'"
            )
        try:
            sd = _npz.npz_to_timm(content)
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from exc
        ignored = [k for k in content if "pre_logits/" in k]
        return Checkpoint(sd, "npz", name, [], ignored, "npz")
    try:
        sd, wrapper = _unwrap(content, use_ema)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    detected = detect_format(sd, wrapper)
    if (
        format not in ("auto", "npz")
        and detected is not None
        and _NAME_FAMILY.get(detected, detected) != _NAME_FAMILY.get(format, format)
    ):
        raise CheckpointError(
            f"{name}: format={format!r} was forced, but the file's keys are those of {detected!r} "
            f"({FORMATS[detected]}), e.g. {_describe_keys(list(sd)[:4])}; read as {format!r} they "
            "would be renamed wrongly. Pass "
            f"format={detected!r} or format='auto'"
        )
    if format == "auto":
        if detected is None:
            top = [str(k) for k in content] if isinstance(content, Mapping) else []
            raise CheckpointError(
                f"{name}: unknown checkpoint format: {len(sd)} tensors with keys {_describe_keys(list(sd))}"
                f"{f' (top-level keys {shorten(top)})' if top != list(sd) else ''}. fastvit reads: "
                + "; ".join(f"{k} ({v})" for k, v in FORMATS.items())
                + ". Pass format=... if you know which it is."
            )
        format = detected
    if format == "npz":
        raise CheckpointError(f"{name} is not a numpy .npz archive; detected format {detected!r}")
    native, ignored = _to_native(format, sd)
    return Checkpoint(native, format, name, wrapper, ignored, detected)

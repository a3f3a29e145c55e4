"""Google JAX/Flax ``.npz`` checkpoints (the original ViT release, incl. R50+ViT-B/16, and big_vision).

Key map (``i`` = block; JAX kernels are HWIO / (in, out), torch weights OIHW / (out, in)):

================================================================  ==================================================
npz key                                                           timm / fastvit key
================================================================  ==================================================
``embedding/kernel`` (P, P, C, D) / ``embedding/bias``            ``patch_embed.proj.weight`` / ``.bias``
``cls`` (1, 1, D)                                                 ``cls_token``
``Transformer/posembed_input/pos_embedding`` (1, N+1, D)          ``pos_embed``
``Transformer/encoder_norm/{scale,bias}``                         ``norm.{weight,bias}``
``head/{kernel,bias}`` (D, K)                                     ``head.{weight,bias}``
``pre_logits/{kernel,bias}`` (in21k files)                        dropped (timm and jeonsworld drop it)
``…/encoderblock_i/LayerNorm_0``, ``LayerNorm_2``                 ``blocks.i.norm1``, ``blocks.i.norm2``
``…/MultiHeadDotProductAttention_1/{query,key,value}/kernel``     ``blocks.i.attn.qkv.weight`` (rows q; k; v)
  (D, H, hd); ``…/bias`` (H, hd)                                  ``blocks.i.attn.qkv.bias``
``…/MultiHeadDotProductAttention_1/out/kernel`` (H, hd, D)        ``blocks.i.attn.proj.weight``
``…/MlpBlock_3/Dense_0``, ``Dense_1``                             ``blocks.i.mlp.fc1``, ``blocks.i.mlp.fc2``
hybrid ``conv_root``, ``gn_root``                                 ``patch_embed.backbone.stem.conv``, ``.stem.norm``
hybrid ``block{s}/unit{u}/conv{r}``, ``gn{r}``                    ``…stages.{s-1}.blocks.{u-1}.conv{r}``,
                                                                  ``…norm{r}`` (under ``patch_embed.backbone.``)
hybrid ``block{s}/unit{u}/conv_proj``, ``gn_proj``                ``…downsample.conv``, ``…downsample.norm``
================================================================  ==================================================

Key prefixes ``opt/target/`` (original release), ``params/`` and ``params/img/`` (big_vision) are
recognised. big_vision names the sub-modules ``MultiHeadDotProductAttention_0``, ``MlpBlock_0``,
``LayerNorm_1`` and stores ``pos_embedding`` at the top; its scanned layout stacks all blocks under
``Transformer/encoderblock/`` with a leading depth axis. Position embeddings are resampled
bilinearly without antialias when the grid differs (as timm's npz loader does).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Union

import numpy as np
import torch

from fastvit.checkpoints._common import CheckpointError, StateDict, shorten
from fastvit.fileio import atomic_write

__all__ = ["NPZ_PREFIXES", "is_npz", "npz_to_timm", "save_npz", "timm_to_npz"]

NPZ_PREFIXES = ("opt/target/", "params/img/", "params/", "")
_QKV = ("query", "key", "value")
_UNIT_TO_TIMM = {"conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}  # hybrid units; the rest: gn -> norm


def _prefix(arrays: Mapping[str, np.ndarray]) -> Optional[str]:
    for prefix in NPZ_PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return prefix
    return None


def is_npz(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether a dict of arrays read from an ``.npz`` holds a ViT in one of the recognised layouts."""
    return _prefix(arrays) is not None


def _to_torch(array: np.ndarray, transpose: bool = True) -> torch.Tensor:
    """JAX layout -> torch layout (HWIO -> OIHW, (in, out) -> (out, in)); 1x1x1xC GroupNorm params -> (C,)."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[:3] == (1, 1, 1):
        array = array.reshape(-1)
    if transpose:
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)
        elif array.ndim == 3:
            array = array.transpose(2, 0, 1)
        elif array.ndim == 2:
            array = array.T
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def npz_to_timm(arrays: Mapping[str, np.ndarray]) -> StateDict:
    """Convert the arrays of a Google ``.npz`` into a timm-named state dict (see the module docstring).

    Args:
        arrays: name -> array, as read from the file.

    Raises:
        CheckpointError: when the arrays are not a ViT in a recognised layout, or a block is incomplete.
    """
    prefix = _prefix(arrays)
    if prefix is None:
        raise CheckpointError(
            f"not a Google ViT .npz: no 'embedding/kernel' under any of the prefixes {NPZ_PREFIXES}; "
            f"its arrays are {shorten(sorted(arrays))}"
        )
    w = {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}
    big_vision = (
        prefix.startswith("params/") or "pos_embedding" in w or "Transformer/encoderblock/LayerNorm_0/scale" in w
    )
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    sd: StateDict = {}
    try:
        sd["patch_embed.proj.weight"] = _to_torch(w["embedding/kernel"])
        if "embedding/bias" in w:
            sd["patch_embed.proj.bias"] = _to_torch(w["embedding/bias"])
        if "cls" in w:
            sd["cls_token"] = _to_torch(w["cls"], transpose=False)
        pos_key = "pos_embedding" if "pos_embedding" in w else "Transformer/posembed_input/pos_embedding"
        sd["pos_embed"] = _to_torch(w[pos_key], transpose=False)
        if "Transformer/encoder_norm/scale" in w:
            sd["norm.weight"] = _to_torch(w["Transformer/encoder_norm/scale"])
            sd["norm.bias"] = _to_torch(w["Transformer/encoder_norm/bias"])
        if "head/kernel" in w:
            sd["head.weight"] = _to_torch(w["head/kernel"])
            sd["head.bias"] = _to_torch(w["head/bias"])
        sd.update(_hybrid_backbone(w))
        sd.update(_blocks(w, mha, mlp, ln2))
    except KeyError as exc:
        raise CheckpointError(f"incomplete Google ViT .npz (prefix {prefix!r}): array {exc} is missing") from exc
    return sd


def _hybrid_backbone(w: Mapping[str, np.ndarray]) -> StateDict:
    sd: StateDict = {}
    if "conv_root/kernel" not in w:
        return sd
    bb = "patch_embed.backbone."
    sd[bb + "stem.conv.weight"] = _to_torch(w["conv_root/kernel"])
    sd[bb + "stem.norm.weight"] = _to_torch(w["gn_root/scale"])
    sd[bb + "stem.norm.bias"] = _to_torch(w["gn_root/bias"])
    unit = re.compile(r"^block(\d+)/unit(\d+)/(conv\d|conv_proj|gn\d|gn_proj)/(kernel|scale|bias)$")
    for key in w:
        m = unit.match(key)
        if not m:
            continue
        stage, block, layer, param = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4]
        target = _UNIT_TO_TIMM.get(layer) or layer.replace("gn", "norm")
        name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[param]
        sd[f"{bb}stages.{stage}.blocks.{block}.{target}.{name}"] = _to_torch(w[key])
    return sd


def _blocks(w: Mapping[str, np.ndarray], mha: int, mlp: int, ln2: int) -> StateDict:
    sd: StateDict = {}
    stacked = "Transformer/encoderblock/LayerNorm_0/scale" in w
    if stacked:
        depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = len({m[1] for key in w if (m := re.match(r"^Transformer/encoderblock_(\d+)/", key))})

    for i in range(depth):
        base, idx = ("Transformer/encoderblock/", i) if stacked else (f"Transformer/encoderblock_{i}/", None)

        def get(name: str, transpose: bool = True) -> torch.Tensor:
            array = w[base + name]
            return _to_torch(array[idx] if idx is not None else array, transpose)

        attn = f"MultiHeadDotProductAttention_{mha}/"
        out = f"blocks.{i}."
        sd[out + "norm1.weight"], sd[out + "norm1.bias"] = get("LayerNorm_0/scale"), get("LayerNorm_0/bias")
        # (D, H, hd) kernels: flatten the heads to (D, D) and transpose to torch's (out, in); rows q; k; v.
        sd[out + "attn.qkv.weight"] = torch.cat([get(f"{attn}{n}/kernel", False).flatten(1).T for n in _QKV])
        sd[out + "attn.qkv.bias"] = torch.cat([get(f"{attn}{n}/bias", False).reshape(-1) for n in _QKV])
        sd[out + "attn.proj.weight"] = get(f"{attn}out/kernel").flatten(1)
        sd[out + "attn.proj.bias"] = get(f"{attn}out/bias")
        sd[out + "norm2.weight"], sd[out + "norm2.bias"] = get(f"LayerNorm_{ln2}/scale"), get(f"LayerNorm_{ln2}/bias")
        for r in range(2):
            sd[out + f"mlp.fc{r + 1}.weight"] = get(f"MlpBlock_{mlp}/Dense_{r}/kernel")
            sd[out + f"mlp.fc{r + 1}.bias"] = get(f"MlpBlock_{mlp}/Dense_{r}/bias")
    return sd


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def timm_to_npz(state_dict: Mapping[str, torch.Tensor], num_heads: int) -> dict[str, np.ndarray]:
    """Write a timm-named ViT state dict in the original Google release layout (no key prefix).

    Args:
        state_dict: timm / fastvit ViT (or R50 hybrid) parameters.
        num_heads: attention heads; Google kernels keep the head axis ((D, H, hd)), a state dict does not.

    Raises:
        CheckpointError: for parameters the Google layout has no place for (distillation token,
            LayerScale, fc_norm, ...), listed by name.
    """
    sd = dict(state_dict)
    out: dict[str, np.ndarray] = {}

    def take(key: str) -> torch.Tensor:
        return sd.pop(key)

    out["embedding/kernel"] = _np(take("patch_embed.proj.weight")).transpose(2, 3, 1, 0)
    if "patch_embed.proj.bias" in sd:
        out["embedding/bias"] = _np(take("patch_embed.proj.bias"))
    if "cls_token" in sd:
        out["cls"] = _np(take("cls_token"))
    out["Transformer/posembed_input/pos_embedding"] = _np(take("pos_embed"))
    if "norm.weight" in sd:
        out["Transformer/encoder_norm/scale"] = _np(take("norm.weight"))
        out["Transformer/encoder_norm/bias"] = _np(take("norm.bias"))
    if "head.weight" in sd:
        out["head/kernel"] = _np(take("head.weight")).T
        out["head/bias"] = _np(take("head.bias"))

    bb = "patch_embed.backbone."
    if bb + "stem.conv.weight" in sd:
        out["conv_root/kernel"] = _np(take(bb + "stem.conv.weight")).transpose(2, 3, 1, 0)
        out["gn_root/scale"] = _np(take(bb + "stem.norm.weight"))
        out["gn_root/bias"] = _np(take(bb + "stem.norm.bias"))
    unit = re.compile(
        r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\."
        r"(conv\d|norm\d|downsample\.conv|downsample\.norm)\.(weight|bias)$"
    )
    for key in [k for k in sd if unit.match(k)]:
        m = unit.match(key)
        layer = {v: k for k, v in _UNIT_TO_TIMM.items()}.get(m[3]) or m[3].replace("norm", "gn")
        param = "kernel" if layer.startswith("conv") else ("scale" if m[4] == "weight" else "bias")
        value = _np(take(key))
        name = f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}/{layer}/{param}"
        out[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value

    depth = len({m[1] for key in sd if (m := re.match(r"^blocks\.(\d+)\.", key))})
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn = dst + "MultiHeadDotProductAttention_1/"
        out[dst + "LayerNorm_0/scale"] = _np(take(src + "norm1.weight"))
        out[dst + "LayerNorm_0/bias"] = _np(take(src + "norm1.bias"))
        qkv_w, qkv_b = _np(take(src + "attn.qkv.weight")), _np(take(src + "attn.qkv.bias"))
        dim = qkv_w.shape[1]
        if dim % num_heads:
            raise CheckpointError(f"num_heads={num_heads} does not divide the embedding dim {dim}")
        head_dim = qkv_w.shape[0] // 3 // num_heads
        for j, name in enumerate(_QKV):
            rows = slice(j * num_heads * head_dim, (j + 1) * num_heads * head_dim)
            out[attn + f"{name}/kernel"] = qkv_w[rows].T.reshape(dim, num_heads, head_dim)
            out[attn + f"{name}/bias"] = qkv_b[rows].reshape(num_heads, head_dim)
        out[attn + "out/kernel"] = _np(take(src + "attn.proj.weight")).T.reshape(num_heads, head_dim, -1)
        out[attn + "out/bias"] = _np(take(src + "attn.proj.bias"))
        out[dst + "LayerNorm_2/scale"] = _np(take(src + "norm2.weight"))
        out[dst + "LayerNorm_2/bias"] = _np(take(src + "norm2.bias"))
        for r in range(2):
            out[dst + f"MlpBlock_3/Dense_{r}/kernel"] = _np(take(src + f"mlp.fc{r + 1}.weight")).T
            out[dst + f"MlpBlock_3/Dense_{r}/bias"] = _np(take(src + f"mlp.fc{r + 1}.bias"))
    if sd:
        raise CheckpointError(
            f"the Google .npz layout has no place for these parameters: {shorten(sorted(sd))}; "
            "write this model as timm, mmpretrain or mmseg instead"
        )
    return out


def save_npz(arrays: Mapping[str, np.ndarray], path: Union[str, "os.PathLike[str]"]) -> None:
    """Write arrays (e.g. from :func:`timm_to_npz`) to ``path`` uncompressed, as the Google files are
    (atomically, through :func:`fastvit.fileio.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)

"""MMSegmentation ViT backbones: the output of mmseg's ``tools/model_converters/vit2mmseg.py`` and its reverse.

``vit2mmseg`` rules, applied in this order to each timm key (reproduced exactly by :func:`timm_to_mmseg`,
including its plain string replacements):

===============================  ===========================================================
timm key                         mmseg key
===============================  ===========================================================
``head*`` (incl. ``head_dist``)  dropped
``norm*``                        ``'norm.'`` -> ``'ln1.'`` (the backbone's final-norm LN)
``patch_embed*`` with ``proj``   ``'proj'`` -> ``'projection'``
``blocks.i.*`` with ``norm``     ``'norm'`` -> ``'ln'`` (``norm1`` -> ``ln1``)
``blocks.i.mlp.fc1`` / ``fc2``   ``ffn.layers.0.0`` / ``ffn.layers.1``
``blocks.i.attn.qkv.*``          ``attn.attn.in_proj_*`` (nn.MultiheadAttention, same [q; k; v] rows)
``blocks.i.attn.proj``           ``attn.attn.out_proj``
then ``blocks.`` -> ``layers.``; everything else (``cls_token``, ``pos_embed``) unchanged
===============================  ===========================================================

Reading goes the other way (plus ``pre_ln`` -> ``norm_pre`` for mmseg-trained ``pre_norm=True``
backbones) and also accepts whole mmseg segmentor checkpoints: their
``backbone.*`` part is taken and the neck / heads (``decode_head``, ``auxiliary_head``, ``neck``)
are reported as ignored. mmseg resamples position embeddings bicubically without antialias.

Loading into fastvit's segmentation models (:mod:`fastvit.models.segmentation`; their
``load_pretrained`` / ``load_mmseg_checkpoint`` methods call these):

* :func:`load_backbone`: classification weights of any format :func:`~fastvit.checkpoints.read_checkpoint`
  reads into a ``ViTBackbone``, as mmseg's ``init_weights`` does (classifier left out, position table
  resampled with :func:`fastvit.layers.pos_embed.resample_abs_pos_embed`, ``interp='mmseg'``).
* :func:`load_segmentor_state_dict` / :func:`load_segmentor_checkpoint`: an mmseg segmentor state dict /
  file into a whole ``EncoderDecoder``.
* :func:`load_segmentor_pretrained`: either of the two, told by the file's keys.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from fastvit.checkpoints._common import CheckpointError, StateDict, rename_keys
from fastvit.checkpoints._io import read_container
from fastvit.layers.pos_embed import resample_abs_pos_embed

__all__ = [
    "SEGMENTOR_PARTS",
    "is_mmseg",
    "load_backbone",
    "load_segmentor_checkpoint",
    "load_segmentor_pretrained",
    "load_segmentor_state_dict",
    "mmseg_to_timm",
    "read_segmentor",
    "segmentor_state_dict",
    "split_segmentor",
    "timm_to_mmseg",
]

PathLike = Union[str, "os.PathLike[str]"]

SEGMENTOR_PARTS = ("decode_head.", "auxiliary_head.", "neck.", "data_preprocessor.")
_IN_PROJ = re.compile(r"^(backbone\.)?layers\.\d+\.attn\.attn\.in_proj_weight$")


def is_mmseg(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are an mmseg ViT backbone (``layers.N.attn.attn.in_proj_weight``, maybe under ``backbone.``)."""
    return any(_IN_PROJ.match(k) for k in state_dict)


def split_segmentor(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Backbone keys (``backbone.`` removed) of a segmentor checkpoint, and the segmentation keys left out."""
    if not any(k.startswith("backbone.") for k in state_dict):
        return dict(state_dict), []
    backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    ignored = [k for k in state_dict if not k.startswith("backbone.")]
    return backbone, ignored


def timm_to_mmseg(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm / DeiT ViT state dict -> mmseg backbone keys, exactly as ``vit2mmseg.convert_vit`` does."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("head"):
            continue
        if key.startswith("norm"):
            new = key.replace("norm.", "ln1.")
        elif key.startswith("patch_embed"):
            new = key.replace("proj", "projection") if "proj" in key else key
        elif key.startswith("blocks"):
            if "norm" in key:
                new = key.replace("norm", "ln")
            elif "mlp.fc1" in key:
                new = key.replace("mlp.fc1", "ffn.layers.0.0")
            elif "mlp.fc2" in key:
                new = key.replace("mlp.fc2", "ffn.layers.1")
            elif "attn.qkv" in key:
                new = key.replace("attn.qkv.", "attn.attn.in_proj_")
            elif "attn.proj" in key:
                new = key.replace("attn.proj", "attn.attn.out_proj")
            else:
                new = key
            new = new.replace("blocks.", "layers.")
        else:
            new = key
        out[new] = value
    return out


_TO_TIMM = [
    (r"^ln1\.", "norm."),
    (r"^pre_ln\.", "norm_pre."),  # mmseg ViT(pre_norm=True), e.g. CLIP-initialised backbones
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln([12])\.", r"blocks.\1.norm\2."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^layers\.(\d+)\.attn\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.", r"blocks.\1."),
]


def mmseg_to_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """mmseg ViT backbone keys (``backbone.`` already removed) -> timm / fastvit names."""
    return rename_keys(state_dict, _TO_TIMM)


def segmentor_state_dict(content: Any) -> Optional[StateDict]:
    """The tensors of an mmseg segmentor checkpoint (``state_dict`` unwrapped, a DDP ``module.`` prefix
    removed), or None when ``content`` has no ``backbone.`` keys."""
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        return None
    sd = {str(k).removeprefix("module."): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    return sd if any(k.startswith("backbone.") for k in sd) else None


def read_segmentor(
    source: Union[PathLike, Mapping[str, Any]],
) -> tuple[str, Optional[str], Any, Optional[StateDict]]:
    """Reads a segmentor checkpoint the way every fastvit reader does (``read_container``: zip CRCs, safe
    unpickling, safetensors, ``.npz``).

    Returns:
        (name for messages, container kind or None for an in-memory mapping, the loaded content, its mmseg
        segmentor state dict or None when it has no ``backbone.`` keys).
    """
    if isinstance(source, Mapping):
        return "<state dict>", None, source, segmentor_state_dict(source)
    container, content = read_container(source)
    return os.fspath(source), container, content, segmentor_state_dict(content)


# ---------------------------------------------------------------------- loading into fastvit's segmentors

# Classification-only parts of a classifier checkpoint, which mmseg's ViT backbone has no use for.
_CLASSIFIER_ROOTS = ("head", "head_dist", "fc_norm", "pre_logits")
_PATCH_BIAS = "patch_embed.proj.bias"


def load_backbone(backbone: nn.Module, source: Union[PathLike, Mapping[str, Any]], format: str = "auto") -> list[str]:
    """Loads classification weights into a ``ViTBackbone`` the way mmseg's ``init_weights`` does.

    ``source`` is anything :func:`fastvit.checkpoints.read_checkpoint` reads (timm, DeiT, Google ``.npz``,
    mmpretrain, an mmseg backbone or segmentor file). The classifier (``head``, ``head_dist``, ``fc_norm``,
    ``pre_logits``) is left out, and so are the final norm when the backbone has none
    (``final_norm=False``) and the patch bias when it has none (``patch_bias=False``, mmseg 1.2's
    default). A position table of another grid is resampled to the backbone's stored grid with
    :func:`~fastvit.layers.pos_embed.resample_abs_pos_embed` (``interp='mmseg'``: bicubic, no antialias;
    the table's grid is taken to be square). Every other key must fit (``strict=True``).

    Args:
        backbone: a :class:`fastvit.models.segmentation.ViTBackbone`.
        source: checkpoint path or an already loaded dict.
        format: ``"auto"`` or a key of :data:`fastvit.checkpoints.FORMATS`.

    Returns:
        The checkpoint keys deliberately left out, sorted (the format's ignored keys included).

    Raises:
        CheckpointError: an unreadable file, non-float tensors for float parameters, a distilled DeiT
            checkpoint (two prefix tokens), a position table that is not on a square grid, or keys that do
            not fit (another width / depth).
    """
    from fastvit.checkpoints.reader import read_checkpoint  # reader imports this module: import when called

    return _load_into_backbone(backbone, read_checkpoint(source, format))


def _load_into_backbone(backbone: nn.Module, ckpt: Any) -> list[str]:
    """:func:`load_backbone` of a :class:`~fastvit.checkpoints.Checkpoint` already read."""
    from fastvit.checkpoints.loader import check_dtypes

    sd = dict(ckpt.state_dict)
    check_dtypes(ckpt.source, sd, dict(backbone.named_parameters()))  # module names, as sd (not mmseg's keys)
    if "dist_token" in sd:
        raise CheckpointError(
            f"{ckpt.source}: a distilled DeiT checkpoint (dist_token, two prefix tokens); mmseg's ViT backbone has "
            f"one class token. Use the non-distilled weights (e.g. deit_base_patch16_224)"
        )
    skip_roots = _CLASSIFIER_ROOTS + (() if backbone.has_final_norm else ("norm",))
    left_out = sorted(k for k in sd if k.split(".", 1)[0] in skip_roots)
    if backbone.patch_embed.proj.bias is None and _PATCH_BIAS in sd:
        left_out.append(_PATCH_BIAS)  # a patch_bias=False backbone, as mmseg 1.2 drops it
    for k in left_out:
        del sd[k]
    pos = sd.get("pos_embed")
    if isinstance(pos, torch.Tensor) and pos.shape != backbone.pos_embed.shape:
        grid = tuple(backbone.patch_embed.grid_size)
        try:
            sd["pos_embed"] = resample_abs_pos_embed(pos, grid, None, num_prefix_tokens=1, interp="mmseg")
        except ValueError as err:
            raise CheckpointError(
                f"{ckpt.source}: pos_embed {tuple(pos.shape)} cannot be resampled: {err}. This loader takes tables "
                f"of a square grid only: resample it to the backbone's {grid[0]}x{grid[1]} grid yourself with "
                f"fastvit.layers.resample_abs_pos_embed(pos_embed, {grid}, old_size=(h, w), interp='mmseg') "
                "and load the result"
            ) from err
    try:
        backbone.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{ckpt.source}: {ckpt.description}; it does not fit this backbone "
            f"(embed_dim={backbone.embed_dim}, depth={len(backbone.blocks)}): {err}"
        ) from err
    return sorted(left_out + list(ckpt.ignored))


def load_segmentor_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>", strict: bool = True
) -> list[str]:
    """Loads an mmseg segmentor state dict (``backbone.`` / ``neck.`` / ``decode_head.`` /
    ``auxiliary_head.`` keys, already unwrapped: :func:`segmentor_state_dict`) into an ``EncoderDecoder``.

    ``data_preprocessor.*`` is left out, and ``auxiliary_head.*`` when the model has no auxiliary head.
    With ``strict``, a patch-projection bias present in only one of checkpoint and model is refused with
    the ``patch_bias=`` to build the model with.

    Args:
        model: a :class:`fastvit.models.segmentation.EncoderDecoder`.
        state_dict: the segmentor's tensors.
        name: what error messages call the checkpoint (its path).
        strict: every model key must be present and every checkpoint key used.

    Returns:
        The checkpoint keys left out on purpose, sorted.

    Raises:
        CheckpointError: keys that do not fit (the message lists them), or the patch bias as above.
        ValueError: a classifier with another number of classes (the model's load hook says what to build).
    """
    drop = ("data_preprocessor.",) + (("auxiliary_head.",) if model.auxiliary_head is None else ())
    left_out = sorted(k for k in state_dict if k.startswith(drop))
    sd = {k: v for k, v in state_dict.items() if k not in left_out}
    bias_key = "backbone.patch_embed.projection.bias"
    has_bias = model.backbone.patch_embed.proj.bias is not None
    if strict and (bias_key in sd) != has_bias:
        raise CheckpointError(
            f"{name}: the checkpoint {'has' if bias_key in sd else 'has no'} {bias_key} and this model "
            f"{'has one' if has_bias else 'has none'}; build the model with patch_bias={bias_key in sd} "
            f"(mmseg 1.2's ViT default is patch_bias=False, its model-zoo checkpoints have the bias)"
        )
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"{name}: does not fit {type(model).__name__}: {err}") from err
    return left_out


def load_segmentor_checkpoint(
    model: nn.Module, source: Union[PathLike, Mapping[str, Any]], strict: bool = True
) -> list[str]:
    """Loads an mmseg segmentor checkpoint (``{'meta', 'state_dict', ...}`` from mmseg's model zoo, or a
    bare state dict with ``backbone.`` keys) into an ``EncoderDecoder``: :func:`read_segmentor`, then
    :func:`load_segmentor_state_dict`.

    Args:
        model: a :class:`fastvit.models.segmentation.EncoderDecoder`.
        source: a file (read with fastvit's container reader and restricted unpickler) or a loaded dict.
        strict: every model key must be present and every checkpoint key used.

    Returns:
        The checkpoint keys left out on purpose.

    Raises:
        CheckpointError: an unreadable file, a checkpoint without ``backbone.`` keys (classification
            weights: the message names the loader for those), or keys that do not fit.
        ValueError: a classifier with another number of classes.
    """
    name, _, _, sd = read_segmentor(source)
    if sd is None:
        raise CheckpointError(
            f"{name}: not an mmseg segmentor checkpoint (no 'backbone.' keys); for classification weights use "
            f"model.load_pretrained(path) or model.backbone.load_pretrained(path)"
        )
    return load_segmentor_state_dict(model, sd, name, strict)


def load_segmentor_pretrained(
    model: nn.Module, source: Union[PathLike, Mapping[str, Any]], format: str = "auto"
) -> list[str]:
    """Loads any checkpoint a user of fastvit's segmentors holds: an mmseg segmentor checkpoint (it has
    ``decode_head.`` keys) into the whole ``EncoderDecoder``, strict (:func:`load_segmentor_state_dict`);
    classification weights (timm, DeiT, Google ``.npz``, mmpretrain, an mmseg backbone) into its backbone
    alone (:func:`load_backbone`).

    Args:
        model: a :class:`fastvit.models.segmentation.EncoderDecoder`.
        source: checkpoint path or loaded dict.
        format: for classification weights, ``"auto"`` or a key of :data:`fastvit.checkpoints.FORMATS`.

    Returns:
        The checkpoint keys left out on purpose.

    Raises:
        CheckpointError / ValueError: as the two loaders raise.
    """
    from fastvit.checkpoints import reader

    name, container, content, sd = read_segmentor(source)
    if sd is not None and any(k.startswith("decode_head.") for k in sd):
        return load_segmentor_state_dict(model, sd, name, strict=True)
    # Classification weights (or an mmseg backbone alone), in any format; a file's content is not read again.
    if container is None:
        return load_backbone(model.backbone, source, format)
    return _load_into_backbone(model.backbone, reader._from_content(name, container, content, format))

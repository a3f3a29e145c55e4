"""Checkpoint loaders, one file per foreign format; :func:`load_checkpoint` sniffs the format.

==================  ==================================================================  ======================
format              what it is                                                          module
==================  ==================================================================  ======================
``npz``             Google JAX ``.npz`` (original ViT release incl. R50 hybrid,         :mod:`.npz`
                    in21k files with ``pre_logits``; big_vision layouts)
``timm``            timm state dicts (``.pth``, ``.bin``, ``.safetensors``, also        :mod:`.timm`
                    timm train checkpoints ``{'state_dict', 'state_dict_ema'}``)
``deit``            DeiT ``{'model': state_dict}`` files (timm names)                   :mod:`.timm`
``t2t_official``    official T2T-ViT ``.pth.tar`` (``state_dict_ema``, ``module.``)     :mod:`.t2t_official`
``mmpretrain``      mmpretrain classifiers (``backbone.*`` / ``head.*``)                :mod:`.mmpretrain`
``mmseg``           mmseg ViT backbones (``vit2mmseg`` output or segmentors)            :mod:`.mmseg`
``vit_pytorch``     jeonsworld/ViT-pytorch ``.bin`` (``transformer.*``)                 :mod:`.vit_pytorch`
==================  ==================================================================  ======================

Reading a file: the container (torch pickle, safetensors, npz) is told by content; wrappers
(``state_dict_ema`` > ``state_dict`` > ``model`` > ``module``) and a DDP ``module.`` prefix are removed;
the keys tell the format; the format's module renames them to fastvit's names (timm's for ViT /
DeiT / hybrid, the official repository's for T2T-ViT). Loading into a model then resamples a
position embedding of another grid the way the source does (:mod:`fastvit.layers.pos_embed`:
timm/DeiT bicubic with antialias, Google npz bilinear, mmseg/mmpretrain/T2T bicubic) and loads with
``strict`` semantics: any missing, unexpected or mis-shaped key raises :class:`CheckpointError`
naming the detected format and the keys.
"""

from __future__ import annotations

from fastvit.checkpoints._common import CheckpointError
from fastvit.checkpoints.loader import GOOGLE_PREPROCESSING, LoadResult, check_dtypes, load_checkpoint, load_pretrained
from fastvit.checkpoints.pretrained import PretrainedWeightsNotFound, resolve_pretrained_file
from fastvit.checkpoints.reader import FORMATS, Checkpoint, detect_format, read_checkpoint

__all__ = [
    "FORMATS",
    "GOOGLE_PREPROCESSING",
    "Checkpoint",
    "CheckpointError",
    "check_dtypes",
    "LoadResult",
    "PretrainedWeightsNotFound",
    "detect_format",
    "load_checkpoint",
    "load_pretrained",
    "read_checkpoint",
    "resolve_pretrained_file",
]

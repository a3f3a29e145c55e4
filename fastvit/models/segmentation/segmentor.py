"""``EncoderDecoder``: backbone, optional neck, decode head and auxiliary head; mmseg's loss, ``predict``
and checkpoint loading."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from fastvit.checkpoints import mmseg
from fastvit.layers import to_2tuple
from fastvit.models.segmentation._common import Features, _is_compiling, _resize
from fastvit.models.segmentation.backbone import ViTBackbone
from fastvit.models.segmentation.heads import MultiLevelNeck, _DecodeHead

# -------------------------------------------------------------------------------------- segmentor


def _check_num_classes(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: a classifier of another size gets an error that says what to build."""
    for name in ("decode_head", "auxiliary_head"):
        head = getattr(module, name, None)
        weight = state_dict.get(f"{prefix}{name}.conv_seg.weight")
        if head is not None and isinstance(weight, Tensor) and weight.shape[0] != head.num_classes:
            raise ValueError(
                f"fastvit: the checkpoint's {name}.conv_seg has {weight.shape[0]} classes, "
                f"this model {head.num_classes}; build it with num_classes={weight.shape[0]} "
                f"(e.g. fastvit.create_model(name, num_classes={weight.shape[0]})), "
                f"or drop the '{name}.conv_seg.*' keys and load with strict=False to fine-tune a new classifier"
            )


class EncoderDecoder(nn.Module):
    """mmseg's ``EncoderDecoder`` (``backbone``, ``neck``, ``decode_head``, ``auxiliary_head``; same
    state-dict keys).

    Args:
        backbone: a :class:`ViTBackbone`.
        decode_head: :class:`UPerHead` or :class:`DPTHead`.
        neck: :class:`MultiLevelNeck` or None.
        auxiliary_head: :class:`FCNHead` (training loss only) or None.

    ``forward(x)`` gives the head's logits (1/4, 1/16 or 1/2 resolution), ``forward(x, seg_label)`` the
    training losses, ``predict(x)`` logits at the input size. Inputs are normalised images
    (``pretrained_cfg`` mean/std, RGB).

    Attributes:
        check_labels: the training forward checks that every label is a class index or the ignore
            index (a readable error instead of a CUDA device-side assert). The check reads one flag
            back from the device (a synchronisation per step); set False to skip it once the data is
            trusted. It is skipped while ``torch.compile`` traces.
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        decode_head: _DecodeHead,
        neck: Optional[nn.Module] = None,
        auxiliary_head: Optional[_DecodeHead] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.pretrained_cfg: dict[str, Any] = {}
        self.check_labels = True
        self._register_load_state_dict_pre_hook(_check_num_classes, with_module=True)

    def min_input_size(self) -> int:
        """The smallest image side the model takes: one patch, or as many as the neck's downscaling needs."""
        p = self.backbone.patch_embed.patch_size[0]
        grid = self.neck.min_grid() if isinstance(self.neck, MultiLevelNeck) else 1
        return (grid - 1) * p + 1 if grid > 1 else p

    def extract_feat(self, x: Tensor) -> Features:
        """Backbone (and neck) features."""
        smallest, patch = self.min_input_size(), self.backbone.patch_embed.patch_size[0]
        # Images under one patch get the backbone's own error; this one is for what the neck needs.
        if smallest > patch and isinstance(x, Tensor) and x.dim() == 4 and patch <= min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"fastvit: image size {x.shape[-2]}x{x.shape[-1]} is too small for this model: "
                "both sides must be at least "
                f"{smallest} pixels, so that the token grid is at least {self.neck.min_grid()} patches and the neck's "
                f"{min(self.neck.scales)}x resize keeps a pixel; resize the image"
            )
        feats = self.backbone(x)
        return tuple(self.neck(feats)) if self.neck is not None else feats

    def forward(self, x: Tensor, seg_label: Optional[Tensor] = None) -> Union[Tensor, dict[str, Tensor]]:
        """Logits (B, K, h, w) at the head's resolution; with ``seg_label``, the training losses
        (see :meth:`loss`).

        Args:
            x: (B, C, H, W) normalised images.
            seg_label: optional (B, H, W) or (B, 1, H, W) integer labels, 255 = ignore.
        """
        if seg_label is not None:
            return self.loss(x, seg_label)
        return self.decode_head(self.extract_feat(x))

    def _check_label(self, x: Tensor, seg_label: Tensor) -> Tensor:
        if not isinstance(seg_label, Tensor) or seg_label.is_floating_point() or seg_label.dtype == torch.bool:
            got = seg_label.dtype if isinstance(seg_label, Tensor) else type(seg_label).__name__
            raise TypeError(f"fastvit: seg_label must be an integer tensor of class indices, got {got}; use .long()")
        if seg_label.dim() == 4 and seg_label.shape[1] == 1:
            seg_label = seg_label[:, 0]
        if seg_label.dim() != 3 or seg_label.shape[0] != x.shape[0]:
            raise ValueError(
                f"fastvit: seg_label must be (B, H, W) or (B, 1, H, W) with B={x.shape[0]}, "
                f"got shape {tuple(seg_label.shape)}"
            )
        ignore = self.decode_head.ignore_index
        if not self.check_labels or _is_compiling():
            return seg_label.long()
        bad = (seg_label != ignore) & ((seg_label < 0) | (seg_label >= self.num_classes))
        if bool(bad.any()):
            values = torch.unique(seg_label[bad])[:8].tolist()
            raise ValueError(
                f"fastvit: seg_label has values {values} outside 0..{self.num_classes - 1} (and {ignore} = ignore); "
                f"map them to {ignore} or build the model with more classes"
            )
        return seg_label.long()

    def loss(self, x: Tensor, seg_label: Tensor) -> dict[str, Tensor]:
        """Training losses, mmseg's keys: ``decode.loss_ce``, ``aux.loss_ce`` (already weighted, 0.4 for
        the auxiliary head), ``decode.acc_seg`` / ``aux.acc_seg`` (pixel accuracy %, detached), and
        ``loss``, their sum, to call ``backward()`` on.

        Raises:
            TypeError / ValueError: labels that are not integer class maps of the batch, or values out of range.
        """
        seg_label = self._check_label(x, seg_label)
        feats = self.extract_feat(x)
        losses = {f"decode.{k}": v for k, v in self.decode_head.loss(feats, seg_label).items()}
        if self.auxiliary_head is not None:
            losses.update({f"aux.{k}": v for k, v in self.auxiliary_head.loss(feats, seg_label).items()})
        losses["loss"] = sum(v for k, v in losses.items() if k.endswith("loss_ce"))
        return losses

    @torch.no_grad()
    def predict(self, x: Tensor, size: Optional[Union[int, tuple[int, int]]] = None) -> Tensor:
        """Whole-image inference (mmseg ``test_cfg=dict(mode='whole')``): logits resized bilinearly to the
        input size, then to ``size`` when given (the image's original size before test-time resizing).
        Any input size works: the image is zero-padded to whole patches and the position table resampled
        to its grid (cached per grid). Call ``.eval()`` first; argmax over dim 1 gives the labels.

        Args:
            x: (B, C, H, W) normalised images.
            size: optional (H0, W0) output size.

        Returns:
            (B, K, H, W) or (B, K, H0, W0) float logits.
        """
        logits = _resize(self(x), size=x.shape[-2:], align_corners=self.decode_head.align_corners)
        if size is not None:
            logits = _resize(logits, size=to_2tuple(size), align_corners=self.decode_head.align_corners)
        return logits

    def load_mmseg_checkpoint(
        self, source: Union[str, os.PathLike[str], Mapping[str, Any]], strict: bool = True
    ) -> list[str]:
        """Loads an mmseg segmentor checkpoint (``{'meta', 'state_dict', ...}`` from mmseg's model zoo, or
        a bare state dict with ``backbone.`` / ``neck.`` / ``decode_head.`` / ``auxiliary_head.`` keys):
        :func:`fastvit.checkpoints.mmseg.load_segmentor_checkpoint`.

        Args:
            source: a file (read with fastvit's restricted unpickler) or a loaded dict.
            strict: every model key must be present and every checkpoint key used.

        Returns:
            Checkpoint keys left out on purpose (``data_preprocessor.*``, ``auxiliary_head.*`` when the
            model has no auxiliary head).

        Raises:
            CheckpointError: unreadable file, or keys that do not fit (the message lists them).
            ValueError: a classifier with another number of classes.
        """
        return mmseg.load_segmentor_checkpoint(self, source, strict)

    def load_pretrained(
        self, source: Union[str, os.PathLike[str], Mapping[str, Any]], format: str = "auto"
    ) -> list[str]:
        """Loads any checkpoint a user of these models holds: an mmseg segmentor checkpoint into the
        whole model (:meth:`load_mmseg_checkpoint`, strict), classification weights (timm, DeiT, Google
        ``.npz``, mmpretrain, an mmseg backbone) into the backbone alone (:meth:`ViTBackbone.load_pretrained`);
        :func:`fastvit.checkpoints.mmseg.load_segmentor_pretrained`.

        Args:
            source: checkpoint path or loaded dict.
            format: for classification weights, "auto" or a :data:`fastvit.checkpoints.FORMATS` name.

        Returns:
            The checkpoint keys left out on purpose.

        Raises:
            CheckpointError / ValueError: as the two loaders raise.
        """
        return mmseg.load_segmentor_pretrained(self, source, format)

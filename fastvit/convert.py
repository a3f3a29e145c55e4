"""``python -m fastvit.convert SRC DST --to FORMAT``: rewrite a checkpoint in another format's layout.

SRC is any file :func:`fastvit.load_checkpoint` reads (format sniffed, or ``--from``). DST is written as

=============  ==================================================================================
``--to``       what is written
=============  ==================================================================================
``timm``       fastvit's own names (timm's for ViT / DeiT / hybrid, the official ones for T2T-ViT),
               a plain state dict; ``.safetensors`` when DST ends with it, else ``torch.save``
``deit``       ``{'model': state_dict}`` (timm names), as DeiT publishes
``mmseg``      exactly what mmseg's ``tools/model_converters/vit2mmseg.py`` writes for the same
               weights (a plain dict of backbone keys, classifier dropped)
``mmpretrain`` ``{'meta': ..., 'state_dict': {backbone.*, head.layers.*}}``
``npz``        Google's original ViT ``.npz`` layout (needs ``--num-heads``)
``vit_pytorch`` jeonsworld/ViT-pytorch names, a plain state dict
=============  ==================================================================================
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from fastvit.checkpoints import CheckpointError, read_checkpoint
from fastvit.checkpoints import mmpretrain as _mmpretrain
from fastvit.checkpoints import mmseg as _mmseg
from fastvit.checkpoints import npz as _npz
from fastvit.checkpoints import vit_pytorch as _vit_pytorch

__all__ = ["TARGETS", "convert_checkpoint", "export_state_dict", "main", "save_export"]

TARGETS = ("timm", "deit", "mmseg", "mmpretrain", "npz", "vit_pytorch")
PathLike = Union[str, "os.PathLike[str]"]


def export_state_dict(state_dict: Mapping[str, torch.Tensor], to: str, *, num_heads: Optional[int] = None) -> Any:
    """The object a checkpoint of format ``to`` holds for fastvit-named ``state_dict`` (see the module docstring).

    Args:
        state_dict: parameters in fastvit names (``model.state_dict()`` of a fastvit or timm ViT).
        to: one of :data:`TARGETS`.
        num_heads: attention heads, needed by ``"npz"`` only (Google kernels keep the head axis).

    Returns:
        A dict of tensors / a wrapper dict (torch formats) or a dict of numpy arrays (``"npz"``).
    """
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    if to == "timm":
        return sd
    if to == "deit":
        return {"model": sd}
    if to == "mmseg":
        return OrderedDict(_mmseg.timm_to_mmseg(sd))
    if to == "mmpretrain":
        return {"meta": {"converted_by": "fastvit.convert"}, "state_dict": _mmpretrain.native_to_mmpretrain(sd)}
    if to == "vit_pytorch":
        return _vit_pytorch.native_to_vit_pytorch(sd)
    if to == "npz":
        if num_heads is None:
            raise CheckpointError("writing the Google .npz layout needs the number of attention heads: pass num_heads")
        return _npz.timm_to_npz(sd, num_heads)
    raise CheckpointError(f"cannot write format {to!r}; choose one of {TARGETS}")


def save_export(obj: Any, to: str, dst: PathLike) -> None:
    """Write what :func:`export_state_dict` returned to ``dst`` in that format's container."""
    dst = os.fspath(dst)
    if os.path.dirname(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
    if to == "npz":
        _npz.save_npz(obj, dst)
    elif to == "timm" and dst.endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors refuses views sharing storage (e.g. qkv chunks): store contiguous copies.
        save_file({k: v.contiguous().clone() for k, v in obj.items()}, dst, metadata={"format": "pt"})
    else:
        torch.save(obj, dst)


def convert_checkpoint(
    src: PathLike, dst: PathLike, to: str, *, src_format: str = "auto", num_heads: Optional[int] = None
) -> str:
    """Read ``src`` (any supported format), write it to ``dst`` as format ``to``; return the source format."""
    if to not in TARGETS:
        raise CheckpointError(f"cannot write format {to!r}; choose one of {TARGETS}")
    ckpt = read_checkpoint(src, src_format)
    save_export(export_state_dict(ckpt.state_dict, to, num_heads=num_heads), to, dst)
    return ckpt.format


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastvit.convert",
        description="Rewrite a ViT checkpoint (any format fastvit reads) in another format's layout.",
    )
    parser.add_argument("src", help="checkpoint to read (.npz, .pth, .pth.tar, .bin, .safetensors)")
    parser.add_argument("dst", help="file to write")
    parser.add_argument("--to", required=True, choices=TARGETS, help="format to write")
    parser.add_argument("--from", dest="src_format", default="auto", help="source format (default: sniff it)")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (needed for --to npz)")
    args = parser.parse_args(argv)
    try:
        fmt = convert_checkpoint(args.src, args.dst, args.to, src_format=args.src_format, num_heads=args.num_heads)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.src} ({fmt}) -> {args.dst} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

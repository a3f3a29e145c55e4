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

import os
import sys
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from fastvit._cli import ArgumentParser, add_debug_flag, run_main
from fastvit.checkpoints import CheckpointError, read_checkpoint
from fastvit.checkpoints import mmpretrain as _mmpretrain
from fastvit.checkpoints import mmseg as _mmseg
from fastvit.checkpoints import npz as _npz
from fastvit.checkpoints import vit_pytorch as _vit_pytorch
from fastvit.fileio import WriteError, atomic_save, atomic_write_bytes, same_file

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
    """Write what :func:`export_state_dict` returned to ``dst`` in that format's container.

    The file is written through :mod:`fastvit.fileio` (temporary file beside ``dst``, fsync, rename): an
    error or a kill mid-write leaves any previous ``dst`` as it was. Missing parent folders are created.

    Raises:
        WriteError: ``dst`` cannot be written (no space, permission, a folder, a parent that is a file).
    """
    dst = os.fspath(dst)
    parent = os.path.dirname(dst)
    if parent and not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise WriteError(
                exc.errno, f"cannot write {dst}: cannot create its folder {parent} ({exc.strerror})"
            ) from None
    if to == "npz":
        _npz.save_npz(obj, dst)
    elif to == "timm" and dst.endswith(".safetensors"):
        from safetensors.torch import save

        # safetensors refuses views sharing storage (e.g. qkv chunks): store contiguous copies.
        atomic_write_bytes(dst, save({k: v.contiguous().clone() for k, v in obj.items()}, metadata={"format": "pt"}))
    else:
        atomic_save(obj, dst, saver=_torch_save)


class _Recording:
    """A file wrapper that remembers the OSError of a failed write (torch.save turns it into a RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj: Any, f: Any) -> None:
    out = _Recording(f)
    try:
        torch.save(obj, out)
    except RuntimeError:
        if out.error is not None:
            raise out.error from None  # atomic_write names the path and the cause (no space, size limit, ...)
        raise


def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    to: str,
    *,
    src_format: str = "auto",
    num_heads: Optional[int] = None,
    force: bool = False,
) -> str:
    """Read ``src`` (any supported format), write it to ``dst`` as format ``to``; return the source format.

    ``dst`` naming the same file as ``src`` (also through a symlink, a hard link or another spelling) is
    refused unless ``force=True``: the conversion would replace the only copy of the weights.

    Raises:
        CheckpointError: unreadable source, unknown format, ``dst`` is ``src`` without ``force``.
        WriteError: ``dst`` cannot be written (the message names it; a previous ``dst`` is kept).
    """
    if to not in TARGETS:
        raise CheckpointError(f"cannot write format {to!r}; choose one of {TARGETS}")
    if not force and same_file(src, dst):
        raise CheckpointError(
            f"destination {os.fspath(dst)} is the same file as the source {os.fspath(src)}: converting would "
            "replace the only copy of these weights. Write to another path, or pass --force (force=True)"
        )
    ckpt = read_checkpoint(src, src_format)
    save_export(export_state_dict(ckpt.state_dict, to, num_heads=num_heads), to, dst)
    return ckpt.format


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(
        prog="python -m fastvit.convert",
        description="Rewrite a ViT checkpoint (any format fastvit reads) in another format's layout.",
    )
    parser.add_argument("src", help="checkpoint to read (.npz, .pth, .pth.tar, .bin, .safetensors)")
    parser.add_argument("dst", help="file to write")
    parser.add_argument("--to", required=True, choices=TARGETS, help="format to write")
    parser.add_argument("--from", dest="src_format", default="auto", help="source format (default: sniff it)")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (needed for --to npz)")
    parser.add_argument("--force", action="store_true", help="allow DST to be the same file as SRC (overwrite it)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.num_heads is not None and args.num_heads < 1:
        parser.error(f"--num-heads must be a positive integer, got {args.num_heads}")

    def body() -> int:
        fmt = convert_checkpoint(
            args.src, args.dst, args.to, src_format=args.src_format, num_heads=args.num_heads, force=args.force
        )
        print(f"{args.src} ({fmt}) -> {args.dst} ({args.to})")
        return 0

    return run_main(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

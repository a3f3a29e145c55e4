"""Reading checkpoint files of every container kind: torch pickles (.pth/.bin/.pth.tar), safetensors, .npz.

The container is told by content, not by extension (``.bin`` files are torch pickles, a renamed
``.npz`` is still a zip of ``.npy`` members). A file that cannot be read raises
:class:`~fastvit.checkpoints._common.CheckpointError` naming the file, its size and the reader's
complaint; a truncated download is the usual cause.

Torch pickles are read with ``weights_only=True`` first. Training checkpoints also pickle Python
objects (timm's ``argparse.Namespace`` in ``args``, mmengine's ``HistoryBuffer`` in ``message_hub``)
that the weights-only reader refuses; those files are read again with a restricted unpickler that
builds tensors, containers and numpy arrays and replaces every other global by an inert placeholder,
so no code from the file runs and no foreign library needs to be installed.
"""

from __future__ import annotations

import os
import pickle
import types
import zipfile
import zlib
from typing import Any, Union

import numpy as np
import torch

from fastvit.checkpoints._common import CheckpointError

__all__ = ["read_container"]

PathLike = Union[str, "os.PathLike[str]"]

_ZIP_MAGIC = b"PK\x03\x04"


def _corrupt(path: PathLike, kind: str, exc: BaseException) -> CheckpointError:
    size = os.path.getsize(path)
    return CheckpointError(
        f"{os.fspath(path)} ({size:,} bytes) could not be read as a {kind} file: {type(exc).__name__}: {exc}. "
        "The file looks truncated or corrupt (an interrupted download?): fetch it again."
    )


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON object.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20


class _Placeholder:
    """Stands in for any pickled Python object that is not a tensor, container or array."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} placeholder>"


_SAFE_GLOBALS = {
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {
        "set",
        "frozenset",
        "slice",
        "range",
        "complex",
        "tuple",
        "list",
        "dict",
        "int",
        "float",
        "bool",
        "str",
        "bytes",
        "bytearray",
    },
    "_codecs": {"encode"},
    "torch._utils": {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_device_tensor_from_numpy",
    },
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.nn.parameter": {"Parameter"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy": {"ndarray", "dtype"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (
            name.endswith("Storage")
            or name in ("Size", "device")
            or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return super().find_class(module, name)
        return type(name, (_Placeholder,), {"__module__": module})


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load takes a "pickle module": anything with an Unpickler class and a load function.
_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load, __name__="restricted")


def _torch_load(path: PathLike) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # non-tensor objects in the file: read it again with placeholders for them (module docstring)
    except Exception as exc:
        raise _corrupt(path, "torch", exc) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as exc:
        raise _corrupt(path, "torch", exc) from exc


def _npz_load(path: PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise _corrupt(path, "numpy .npz", exc) from exc


def _safetensors_load(path: PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as exc:
        raise _corrupt(path, "safetensors", exc) from exc


def read_container(path: PathLike) -> tuple[str, Any]:
    """Read ``path`` and return ``(container, content)``.

    ``container`` is ``"npz"`` (content: dict of numpy arrays), ``"safetensors"`` (dict of tensors) or
    ``"torch"`` (whatever was pickled: usually a dict, possibly nested).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{os.fspath(path)} is empty (0 bytes): the download did not complete; fetch it again")
    if head.startswith(_ZIP_MAGIC):
        # Both torch's zip format and .npz are zip archives; the member names tell them apart.
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                # torch's zip reader never checks the CRC-32 of a member: a flipped byte in a tensor would load.
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise _corrupt(path, "zip (torch or .npz)", exc) from exc
        if bad is not None:
            raise CheckpointError(
                f"{os.fspath(path)} ({os.path.getsize(path):,} bytes) is corrupt: the stored CRC-32 checksum of its "
                f"member {bad!r} does not match its bytes (damaged on disk or in transfer); fetch the file again"
            )
        if names and all(name.endswith(".npy") for name in names):
            return "npz", _npz_load(path)
        return "torch", _torch_load(path)
    if _looks_like_safetensors(head) or os.fspath(path).endswith(".safetensors"):
        return "safetensors", _safetensors_load(path)
    return "torch", _torch_load(path)

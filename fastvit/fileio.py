"""Files written so that nothing a user had is ever lost.

Every file fastvit writes (converted checkpoints, training checkpoints, benchmark and selftest results)
goes through :func:`atomic_write`: the bytes go to a temporary file in the destination's folder, are
flushed and fsynced, and only then is the temporary file renamed over the destination. A crash, a kill, a
full disk or a size limit mid-write leaves the previous file untouched (and no stray temporary file on a
clean error). ``os.replace`` is atomic on POSIX and Windows when both paths are on one file system, which
the same folder guarantees.

OS errors come back as :class:`WriteError`, one line naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

__all__ = ["WriteError", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_save", "same_file"]

PathLike = Union[str, "os.PathLike[str]"]


class WriteError(OSError):
    """A file could not be written; the message names the path and why (the destination is unchanged)."""


def _describe(exc: OSError, path: Path) -> str:
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large for this file system or the process's size limit",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
        errno.EISDIR: "the destination is a folder",
        errno.ENOTDIR: "a parent of the destination is a file, not a folder",
        errno.ENOENT: "the destination's folder does not exist",
    }
    why = reasons.get(exc.errno, exc.strerror or str(exc))
    return f"cannot write {path}: {why}"


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same existing file (by device and inode, so symlinks, hard links and
    relative spellings count as the same)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file beside ``path`` for writing and renames it over ``path`` when the block exits
    without an exception; on an exception the temporary file is removed and ``path`` is left as it was.

    ``mode`` is ``"wb"`` (default) or ``"w"`` (text; ``open_kwargs`` such as ``encoding`` / ``newline`` go
    to the text wrapper). An existing destination keeps its permission bits.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    dest = Path(path)
    if dest.is_dir():
        raise WriteError(errno.EISDIR, f"cannot write {dest}: the destination is a folder")
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise WriteError(exc.errno, _describe(exc, dest)) from None
    tmp = Path(tmp_name)
    try:
        raw = os.fdopen(fd, "wb")
        f: IO = raw
        if mode == "w":
            open_kwargs.setdefault("encoding", "utf-8")
            f = io.TextIOWrapper(raw, **open_kwargs)
        with f:
            yield f
            f.flush()
            os.fsync(raw.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, os.stat(dest).st_mode & 0o7777 if dest.exists() else 0o666 & ~_umask())
        os.replace(tmp, dest)
    except OSError as exc:
        _remove(tmp)
        if isinstance(exc, WriteError):
            raise
        raise WriteError(exc.errno, _describe(exc, dest)) from None
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, *, newline: str | None = None) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", newline=newline) as f:
        f.write(text)


def atomic_save(obj: Any, path: PathLike, saver: Callable[[Any, IO], None] | None = None) -> None:
    """``torch.save(obj, path)`` (or ``saver(obj, file)``) through :func:`atomic_write`."""
    if saver is None:
        import torch

        def saver(o: Any, f: IO) -> None:
            torch.save(o, f)

    with atomic_write(path, "wb") as f:
        saver(obj, f)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


def _fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""What every fastvit command line does with a failure: one line on stderr and a non-zero exit.

``run_main(body, debug)`` calls ``body()`` and turns the failures a user can cause (bad or missing
input files, unwritable outputs, bad flag values: ``ValueError``, ``TypeError``, ``OSError``, which
include :class:`~fastvit.checkpoints.CheckpointError`, ``PretrainedWeightsNotFound`` and
:class:`~fastvit.fileio.WriteError`) into ``error: <message>`` and exit status 1. Anything else is a bug
in fastvit or a library and exits 2 with its type named. ``--debug`` re-raises instead, so the traceback
shows.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

__all__ = ["ArgumentParser", "add_debug_flag", "check_device", "one_line", "run_main"]

EXPECTED = (ValueError, TypeError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad flag reported on one stderr line (``prog: error: ...``, exit 2), without the
    usage dump (``--help`` shows it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def check_device(parser: argparse.ArgumentParser, text: str) -> None:
    """``--device`` names a torch device this machine has (checked before any model is built)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a filename error's path included)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text or type(exc).__name__


def run_main(body: Callable[[], int], debug: bool) -> int:
    """``body()``'s exit status; expected failures -> 1, others -> 2, one line on stderr (see module)."""
    if debug:
        return body()
    try:
        return body()
    except EXPECTED as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not bad input: still one line, the traceback is behind --debug
        print(f"error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2

"""Pieces every checkpoint format shares: the error type, key renaming and readable key lists."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

__all__ = ["CheckpointError", "StateDict", "rename_keys", "shorten"]

StateDict = dict  # str -> torch.Tensor; a plain alias keeps signatures readable


class CheckpointError(ValueError):
    """A checkpoint cannot be read, recognised, converted or loaded; the message says why and what to do."""


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> StateDict:
    """Rename every key with the first matching ``(regex, replacement)`` rule; keys no rule matches are kept.

    Rules are anchored at the start of the key (``re.match``) so one table reads like a key map.
    """
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    out: StateDict = {}
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            if pattern.match(key):
                key = pattern.sub(repl, key, count=1)
                break
        out[key] = value
    return out


def shorten(keys: Iterable[str], limit: int = 8) -> str:
    """``keys`` as a readable list for an error message: the first ``limit`` and how many more."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... (+{len(keys) - limit} more)' if len(keys) > limit else ''}]"

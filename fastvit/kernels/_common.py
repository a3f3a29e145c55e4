"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

__all__ = [
    "MAX_GRID_YZ",
    "compile_target",
    "device_guard",
    "graph_capturing",
    "launch_autotuned",
    "rows_view",
    "shared_memory_limit",
    "target_capability",
]

# CUDA's limit on a launch grid's y and z sizes (x goes to 2**31 - 1): launchers that put the batch or the
# heads on those axes must refuse larger ones.
MAX_GRID_YZ = 65535


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s GPU the current one for the launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D (rows, last dim) with a unit last stride and non-overlapping rows, copying only if needed.

    Expanded tensors (stride 0, e.g. the gradient of a sum) and column-strided views are made contiguous;
    row-strided views such as a slice of a wider buffer pass through without a copy.
    """
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) == 1 and (t2.shape[0] <= 1 or t2.stride(0) >= t2.shape[-1]):
        return t2
    return t2.contiguous()


def graph_capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s GPU stream is being captured into a CUDA graph (False for CPU tensors, without
    touching torch.cuda, which a CPU-only build cannot query)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# (kernel name, device index, dtype, *autotune key values) -> the config its autotuner chose outside capture.
_CHOSEN: dict[tuple, Any] = {}


def launch_autotuned(tuned: Any, grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
    """Launches the ``triton.autotune``-wrapped kernel ``tuned`` as ``tuned[grid](*args, **kwargs)``, except
    during CUDA-graph capture, where autotuning must not run (its trial launches would be recorded into the
    graph): there it launches the config chosen earlier for this key, or, for a key first seen inside the
    capture, the first config that survives the kernel's ``early_config_prune`` (called as Triton calls it:
    positional arguments by name, keyword arguments as keywords)."""
    named = dict(zip(tuned.arg_names, args))  # what Triton's Autotuner.run passes its prune as named_args
    everything = {**named, **kwargs}
    key = (tuned.base_fn.__name__, args[0].device.index, args[0].dtype, *(everything.get(k) for k in tuned.keys))
    if graph_capturing(args[0]):
        config = _CHOSEN.get(key)
        if config is None:
            prune = tuned.early_config_prune
            config = (prune(tuned.configs, named, **kwargs) if prune else tuned.configs)[0]
        tuned.fn[grid](*args, **kwargs, **config.all_kwargs())
        return
    tuned[grid](*args, **kwargs)
    _CHOSEN[key] = tuned.best_config


# ------------------------------------------------------------------ shared memory of the target GPU
# Largest dynamic shared memory one block may opt into (bytes), by compute capability (major * 10 + minor).
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_COMPILE_TARGET: list = []  # compute capabilities set by compile_target(), innermost last


@contextlib.contextmanager
def compile_target(capability: int) -> Any:
    """Within the block, prunes asked about tensors that are not on a GPU (meta tensors in the compile
    report and tests/gpu_compile_child.py) answer for compute capability ``capability`` (e.g. 90)."""
    _COMPILE_TARGET.append(capability)
    try:
        yield
    finally:
        _COMPILE_TARGET.pop()


def shared_memory_limit(t: torch.Tensor) -> int:
    """Shared memory (bytes) one block may use on ``t``'s GPU: the device's opt-in limit (227 KB on
    sm_90, 163 KB on sm_80); for other tensors the compile_target()'s, else sm_80's (fits both)."""
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if index not in _SHARED_BY_DEVICE:
            props = torch.cuda.get_device_properties(index)
            limit = getattr(props, "shared_memory_per_block_optin", 0)
            _SHARED_BY_DEVICE[index] = limit or SHARED_MEMORY_PER_BLOCK.get(props.major * 10 + props.minor, 99 * 1024)
        return _SHARED_BY_DEVICE[index]
    return SHARED_MEMORY_PER_BLOCK.get(_COMPILE_TARGET[-1] if _COMPILE_TARGET else 80, 99 * 1024)


_SHARED_BY_DEVICE: dict[int, int] = {}


def target_capability(t: torch.Tensor) -> int:
    """Compute capability (major * 10 + minor) of ``t``'s GPU; for other tensors the compile_target()'s,
    else 80 (the oldest target the configs are pruned for)."""
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return major * 10 + minor
    return _COMPILE_TARGET[-1] if _COMPILE_TARGET else 80

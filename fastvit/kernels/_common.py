"""Helpers shared by the Triton launchers, and the one place that knows Triton's ``Autotuner`` internals.

Kernel modules never build a ``triton.autotune`` object at import time: ``lazy_autotune`` stands in for the
decorator and builds the real ``Autotuner`` at the first launch (on Triton 3.2 and 3.3 its constructor asks
for an active GPU driver, so importing fastvit on a machine without one would fail). Launchers read the
autotuner's fields only through ``LazyAutotune``'s properties: the configuration, key, prune and kernel come
from the arguments fastvit gave, and ``best_config`` (the one field only the running autotuner knows) is read
through the adapter below. Every read of a private field of Triton's runtime wrappers (``Autotuner``,
``Heuristics``, ``JITFunction``: ``configs``, ``fn``, ``values``, ``early_config_prune``, ``best_config``,
``arg_names``), here, in the benchmarks and in the tests, goes through the ``autotuner_*`` / ``kernel_*``
functions, which raise an error naming the installed Triton when a field is missing. No ``from __future__ import
annotations`` here or in the kernel modules: Triton's interpreter before 3.4 reads ``tl.constexpr``
annotations at run time and takes a string annotation for an ordinary argument.
"""

import contextlib
import copy
import functools
import inspect
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from fastvit.kernels import TRITON_VERSION_TUPLE

__all__ = [
    "MAX_GRID_YZ",
    "TESTED_TRITON",
    "LazyAutotune",
    "autotuner_arg_names",
    "autotuner_best_config",
    "autotuner_configs",
    "autotuner_fn",
    "autotuner_prune",
    "autotuner_set_best_config",
    "heuristics_values",
    "is_autotuner",
    "is_heuristics",
    "kernel_function",
    "launch_wrapper",
    "unwrap_kernel",
    "compile_target",
    "device_guard",
    "graph_capturing",
    "launch_autotuned",
    "lazy_autotune",
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
_CHOSEN: Dict[tuple, Any] = {}


def launch_autotuned(tuned: "LazyAutotune", grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
    """Launches the ``lazy_autotune``-wrapped kernel ``tuned`` as ``tuned[grid](*args, **kwargs)``, except
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


# ------------------------------------------------- the adapter to Triton's private autotuner fields
# The fields read: Autotuner's arg_names, best_config, configs, early_config_prune and fn; Heuristics' fn and
# values; JITFunction's (and the interpreter's) arg_names and fn. Each is set by its class's __init__
# (best_config by Autotuner.run) on every Triton in TESTED_TRITON; CI runs the tests at both ends.
TESTED_TRITON = ((3, 1), (3, 9))


@functools.lru_cache(maxsize=None)
def _triton_release() -> str:
    """The installed Triton and whether it is in TESTED_TRITON, for the adapter's errors (looked up once)."""
    import triton

    (low, high), got = TESTED_TRITON, TRITON_VERSION_TUPLE[:2]
    where = "inside" if low <= got <= high else "outside"
    return (
        f"triton {triton.__version__} ({where} the range fastvit reads these fields on, "
        f"{low[0]}.{low[1]} to {high[0]}.{high[1]})"
    )


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` for a Triton runtime wrapper, or a RuntimeError naming the installed Triton and the fix."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f"fastvit: the {type(obj).__name__} of {_triton_release()} has no field {name!r}; install a triton "
            f"in the range `python -m fastvit.info` prints"
        ) from None


@functools.lru_cache(maxsize=None)
def _triton_wrappers() -> tuple:
    from triton.runtime.autotuner import Autotuner, Heuristics

    return Autotuner, Heuristics


def is_autotuner(obj: Any) -> bool:
    """Whether ``obj`` autotunes a kernel: a ``LazyAutotune`` or a built Triton ``Autotuner``."""
    return isinstance(obj, (LazyAutotune, _triton_wrappers()[0]))


def is_heuristics(obj: Any) -> bool:
    """Whether ``obj`` is a Triton ``Heuristics`` wrapper (``triton.heuristics(...)(kernel)``)."""
    return isinstance(obj, _triton_wrappers()[1])


def autotuner_configs(obj: Any) -> List[Any]:
    """The configurations ``obj`` (a ``LazyAutotune`` or a Triton ``Autotuner``) chooses among."""
    return list(obj.configs if isinstance(obj, LazyAutotune) else _field(obj, "configs"))


def autotuner_prune(obj: Any) -> Optional[Callable]:
    """``obj``'s ``early_config_prune`` (None when it has none)."""
    return obj.early_config_prune if isinstance(obj, LazyAutotune) else _field(obj, "early_config_prune")


def autotuner_fn(obj: Any) -> Any:
    """What ``obj`` wraps: the kernel under an autotuner or heuristics wrapper, the Python function under a
    ``JITFunction``."""
    return obj.fn if isinstance(obj, LazyAutotune) else _field(obj, "fn")


def autotuner_arg_names(obj: Any) -> List[str]:
    """The kernel's argument names, in order, as ``obj`` (any wrapper or ``JITFunction``) passes them."""
    return list(obj.arg_names if isinstance(obj, LazyAutotune) else _field(obj, "arg_names"))


def heuristics_values(obj: Any) -> Dict[str, Callable]:
    """A Triton ``Heuristics`` wrapper's {argument name: function of the named arguments}."""
    return _field(obj, "values")


def autotuner_best_config(tuner: Any) -> Any:
    """The config ``tuner`` (a built ``triton.runtime.autotuner.Autotuner``) launched last."""
    return _field(tuner, "best_config")


def autotuner_set_best_config(tuner: Any, config: Any) -> None:
    """Sets what ``autotuner_best_config`` reads (for a stand-in ``Autotuner.run`` that launches nothing)."""
    _field(tuner, "configs")  # the class is the Autotuner these fields were checked for
    tuner.best_config = config


def launch_wrapper(obj: Any) -> Any:
    """The Triton object a launch through the module attribute ``obj`` passes through: a ``LazyAutotune``'s
    built ``Autotuner`` (None before its first launch), else ``obj`` itself."""
    return obj.built if isinstance(obj, LazyAutotune) else obj


def unwrap_kernel(obj: Any) -> tuple:
    """(the jit function, autotune configs or None, heuristics dicts outermost first) behind ``obj``'s autotune
    and heuristics wrappers (a ``JITFunction``, or the interpreter's stand-in under TRITON_INTERPRET=1)."""
    configs, heuristics = None, []
    while is_autotuner(obj) or is_heuristics(obj):
        if is_autotuner(obj):
            configs = autotuner_configs(obj) if configs is None else configs
        else:
            heuristics.append(heuristics_values(obj))
        obj = autotuner_fn(obj)
    return obj, configs, heuristics


def kernel_function(obj: Any) -> Callable:
    """The Python function under ``obj``'s jit, heuristics and autotune wrappers (its name is the kernel's)."""
    while not inspect.isfunction(obj):
        obj = autotuner_fn(obj)
    return obj


_WARP_SPEC_FIELDS = ("num_buffers_warp_spec", "num_consumer_groups", "reg_dec_producer", "reg_inc_consumer")


def _without_warp_spec(config: Any) -> Any:
    """A copy of a Triton 3.2 ``Config`` whose warp-specialisation fields are unset (left out of the launch)."""
    config = copy.copy(config)
    for field in _WARP_SPEC_FIELDS:
        if hasattr(config, field):
            setattr(config, field, None)
    return config


def _deferred_benchmarker(kernel_call: Callable[[], Any], quantiles: Any) -> Any:
    """The benchmarker Triton's Autotuner uses by default, looked up when a trial is timed."""
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


class LazyAutotune:
    """``triton.autotune(**options)(kernel)``, built at the first launch instead of at import.

    Indexing (``tuned[grid](*args)``) launches through the real autotuner. The fields launchers and tests
    read are answered from fastvit's own arguments, the same on every Triton and without building it:
    ``configs``, ``keys`` (the key argument names; Triton 3.2+ calls the field ``keys``, 3.1 keeps only
    ``key_idx``), ``early_config_prune``, ``fn`` (the wrapped kernel), ``base_fn`` (the Python function
    under the jit and heuristics wrappers) and ``arg_names``. ``best_config`` needs the running autotuner.
    """

    def __init__(self, kernel: Any, options: Dict[str, Any]) -> None:
        self.fn = kernel
        self.options = dict(options)
        self.configs: List[Any] = list(options["configs"])
        self.keys: List[str] = list(options["key"])
        self.early_config_prune: Optional[Callable] = (options.get("prune_configs_by") or {}).get("early_config_prune")
        self.arg_names: List[str] = autotuner_arg_names(kernel)  # what triton.autotune hands its Autotuner
        self.base_fn = kernel_function(kernel)  # through heuristics and jit wrappers, as Autotuner does
        missing = [k for k in self.keys if k not in self.arg_names]
        if missing:
            raise ValueError(f"lazy_autotune({self.base_fn.__name__}): key {missing} names no argument of the kernel")
        self.built: Any = None  # the triton Autotuner, once a launch needed it

    @property
    def tuner(self) -> Any:
        """The real ``Autotuner`` (built on first use; this is where Triton may ask for a driver)."""
        if self.built is None:
            import triton

            options = dict(self.options)
            if "do_bench" in inspect.signature(triton.autotune).parameters and options.get("do_bench") is None:
                # Triton 3.2 and 3.3 look up driver.active.get_benchmarker() in Autotuner.__init__, which raises
                # "0 active drivers" under the interpreter on a machine without a GPU; look it up at the first
                # benchmark instead (never, with a single config). Triton 3.1 has no do_bench parameter.
                options["do_bench"] = _deferred_benchmarker
            if TRITON_VERSION_TUPLE[:2] == (3, 2) and os.environ.get("TRITON_INTERPRET", "0") == "1":
                # Triton 3.2's Config.all_kwargs() passes its warp-specialisation fields (0, not None, by default)
                # to the launch, and its interpreter hands them to the kernel as arguments (TypeError).
                options["configs"] = [_without_warp_spec(c) for c in options["configs"]]
            if TRITON_VERSION_TUPLE[:2] == (3, 2):
                # Triton 3.2's triton.autotune takes do_bench but does not pass it on: build its Autotuner as
                # the decorator would, with it.
                from triton.runtime.autotuner import Autotuner

                configs, key = options.pop("configs"), options.pop("key")
                reset, restore = options.pop("reset_to_zero", None), options.pop("restore_value", None)
                self.built = Autotuner(self.fn, self.fn.arg_names, configs, key, reset, restore, **options)
            else:
                self.built = triton.autotune(**options)(self.fn)
        return self.built

    def __getitem__(self, grid: Any) -> Any:
        return self.tuner[grid]

    @property
    def best_config(self) -> Any:
        if self.built is None:
            raise RuntimeError(f"{self.base_fn.__name__}: best_config read before the autotuner's first launch")
        return autotuner_best_config(self.built)

    def __repr__(self) -> str:
        state = "built" if self.built is not None else "not built yet"
        return f"LazyAutotune({self.base_fn.__name__}, {len(self.configs)} configs, key={self.keys}, {state})"


def lazy_autotune(configs: Sequence[Any], key: Sequence[str], **options: Any) -> Callable[[Any], LazyAutotune]:
    """Drop-in for the ``@triton.autotune(configs=..., key=..., ...)`` decorator that defers building the
    autotuner to the first launch (see :class:`LazyAutotune`)."""
    return lambda kernel: LazyAutotune(kernel, {"configs": list(configs), "key": list(key), **options})


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

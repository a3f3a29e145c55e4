"""The op table and the backend choice for every op: explicit argument > ``FASTVIT_BACKEND`` > auto.

**The table.** Every op family declares itself once, as an :class:`OpDispatcher` (one row of
:func:`registered_ops`): its name, its reference (``<op>_ref``), its input checks, per backend a function
returning the reasons that backend cannot serve an input (empty: it can), the registered forward /
backward custom ops, its autocast rule, the signature key that measured dispatch and tuning use, and the
static order with the measurement behind it. Dispatch, ``python -m fastvit.info``, the per-backend test
parametrisation (:func:`backends_of`) and the op benchmarks read that row.

**Reasons.** On top of an op's own reasons the environment adds its own: Triton not importable, CPU
tensors without the Triton interpreter, the extension not built, a GPU older than sm_80. Then:

* an explicit backend (argument or ``FASTVIT_BACKEND``) that has any reason raises
  :class:`BackendNotSupported`, one error listing every reason with a hint;
* auto dispatch on CPU tensors takes "torch" (the Triton interpreter is for testing, not speed);
* auto dispatch on CUDA tensors, in mode ``measured`` (the default; ``FASTVIT_DISPATCH=static`` or
  ``dispatch_mode("static")`` turns it off), times every backend with no reasons, torch's own
  composition included, the first time a key (op, GPU name and capability, dtype, the op's shape
  signature, grad required) is seen, and keeps the fastest: in memory for the life of the process
  (a choice never changes once made) and in a per-machine JSON cache (:func:`cache_path`) keyed also by
  the torch / triton / fastvit / driver versions, written atomically and merged under a file lock so
  several processes (DDP ranks) can share it. A backend that raises (or runs out of memory) while being
  timed is recorded as refused with the reason. Inside CUDA-graph capture and compile tracing nothing is
  timed: the cached choice is used, else the static order;
* in mode ``static`` auto walks the op's static order and takes the first backend with no reasons,
  recording why the ones before it were passed over (:func:`fallback_log`).

Choices inside a backend go through the same machinery with :func:`measured_entry`: the Triton linear's
persistent TMA GEMM against its pointer GEMM (fastvit/kernels/linear_tma.py; keys ``linear_tma|...``).

The static orders are unmeasured (no GPU has timed these kernels yet): :data:`STATIC_ORDER_SOURCE`.

Environment switches (``FASTVIT_BACKEND``, ``FASTVIT_DISPATCH``, ``FASTVIT_DISPATCH_CACHE``) are read in
eager code and the last values are what a compiled graph sees, so ``torch.compile(fullgraph=True)``
never traces ``os.environ``.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import statistics
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fastvit import _ext, kernels
from fastvit.fileio import atomic_write_text

__all__ = [
    "BACKENDS",
    "CACHE_ENV",
    "ENV_VAR",
    "MODES",
    "MODE_ENV",
    "STATIC_ORDER_SOURCE",
    "BackendNotSupported",
    "OpDispatcher",
    "backends_of",
    "bucket",
    "cache_path",
    "describe_cache",
    "describe_inputs",
    "dispatch_mode",
    "environment_reasons",
    "fallback_log",
    "format_cache",
    "measured_entry",
    "measured_table",
    "no_reasons",
    "registered_ops",
    "reset",
    "set_timer",
    "tensor_signature",
    "tune",
]

BACKENDS = ("torch", "triton", "cuda")
MODES = ("measured", "static")
ENV_VAR = "FASTVIT_BACKEND"
MODE_ENV = "FASTVIT_DISPATCH"
CACHE_ENV = "FASTVIT_DISPATCH_CACHE"
CACHE_FORMAT = "fastvit-dispatch-cache-1"
STATIC_ORDER_SOURCE = (
    "unmeasured: no GPU has timed fastvit's kernels yet (2026-12-02); the order is a guess, used only "
    "inside CUDA-graph capture / compile tracing before a measurement, and under FASTVIT_DISPATCH=static"
)
_MIN_CAPABILITY = (8, 0)
AUTOCAST_ONLY = "autocast-only"  # the tag of a memo entry valid only under autocast (OpDispatcher.resolve)
_log = logging.getLogger("fastvit.dispatch")
_REGISTRY: "OrderedDict[str, OpDispatcher]" = OrderedDict()
_FALLBACKS: Dict[Tuple[str, str], List[str]] = {}

ReasonsFn = Callable[..., List[str]]


class BackendNotSupported(ValueError):
    """An explicitly requested backend cannot serve the given input; the message lists every reason."""


# ------------------------------------------------------------------------------ environment switches

# os.environ.get costs ~0.6 us (it encodes the key); the ops read their switches on every call, so
# they look in os.environ's own dict. The last values read are what compile tracing sees.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_SEEN: Dict[str, Optional[str]] = {}


def _env(name: str) -> Optional[str]:
    """The variable's value (stripped, lower case; None when unset or empty), cached for tracing."""
    if torch.compiler.is_compiling():
        return _ENV_SEEN.get(name)
    if _ENV_DATA is not None and os.name == "posix":
        raw = _ENV_DATA.get(name.encode())
        value = raw.decode(errors="replace") if raw is not None else None
    else:
        value = os.environ.get(name)
    value = value.strip().lower() if value else None
    _ENV_SEEN[name] = value or None
    return value or None


# The hot path's pieces, bound once so a memo hit pays no attribute lookups: ``env_get(ENV_KEY)`` is
# FASTVIT_BACKEND's raw value (a memo key part, ~20 ns; os.environ's own dict on POSIX), and
# ``is_compiling`` is torch.compiler.is_compiling (traced as a constant by dynamo).
if _ENV_DATA is not None and os.name == "posix":
    env_get, ENV_KEY = _ENV_DATA.get, ENV_VAR.encode()
else:  # pragma: no cover - Windows: os.environ upper-cases its keys itself
    env_get, ENV_KEY = os.environ.get, ENV_VAR
is_compiling = _is_compiling = torch.compiler.is_compiling


def _raw_env_backend() -> Any:
    """FASTVIT_BACKEND's raw value (a memo key part)."""
    return env_get(ENV_KEY)


def env_backend() -> Optional[str]:
    """``FASTVIT_BACKEND`` (None for unset, empty or "auto")."""
    value = _env(ENV_VAR)
    return None if value == "auto" else value


_MODE_OVERRIDE: List[str] = []


def current_mode() -> str:
    """ "measured" or "static": :func:`dispatch_mode` > ``FASTVIT_DISPATCH`` > "measured"."""
    if _MODE_OVERRIDE:
        return _MODE_OVERRIDE[-1]
    value = _env(MODE_ENV)
    if value is None:
        return "measured"
    if value not in MODES:
        raise ValueError(f"fastvit: unknown {MODE_ENV}={value!r}; expected one of {', '.join(MODES)} (or unset)")
    return value


@contextmanager
def dispatch_mode(mode: str) -> Iterator[None]:
    """Within the block, auto dispatch is ``mode`` ("measured" or "static"), whatever the environment says."""
    if mode not in MODES:
        raise ValueError(f"fastvit.ops.dispatch.dispatch_mode: unknown mode {mode!r}; expected one of {MODES}")
    _MODE_OVERRIDE.append(mode)
    try:
        yield
    finally:
        _MODE_OVERRIDE.pop()


# ------------------------------------------------------------------------------ environment reasons


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def environment_reasons(backend: str, device: torch.device) -> List[str]:
    """Why ``backend`` cannot run at all on ``device`` in this process, independent of the op's inputs."""
    reasons: List[str] = []
    if backend == "triton":
        if kernels.TRITON_IMPORT_ERROR is not None:
            reasons.append(f"triton is not importable ({kernels.TRITON_IMPORT_ERROR})")
        elif device.type == "cpu" and not kernels.INTERPRET:
            reasons.append(
                "tensors are on the CPU and the Triton interpreter is off: set TRITON_INTERPRET=1 before importing "
                "fastvit to run Triton kernels on the CPU (slow; for testing)"
            )
    elif backend == "cuda":
        if not _ext.available():
            reasons.append(f"the CUDA extension fastvit._C is not loaded ({_ext.load_error()})")
        if device.type != "cuda":
            reasons.append(f"tensors are on {device.type}, the 'cuda' backend needs CUDA tensors")
        elif _ext.available():
            # Only for CUDA tensors (CPU calls never pay for the query); cached per process in _ext.
            problem = _ext.device_problem()
            if problem:
                reasons.append(f"fastvit._C cannot use the GPU: {problem}")
    if backend in ("triton", "cuda") and device.type == "cuda":
        cap = _capability(_index(device))
        if cap < _MIN_CAPABILITY:
            reasons.append(f"GPU compute capability {cap[0]}.{cap[1]} is below 8.0; fastvit's kernels target sm_80+")
    if device.type not in ("cpu", "cuda"):
        if backend != "torch":
            reasons.append(f"device type {device.type!r} is only served by the 'torch' backend")
    return reasons


def no_reasons(**_: object) -> List[str]:
    """The ``reasons`` entry of a backend that serves every valid call (the torch reference): never any."""
    return []


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def describe_inputs(inputs: Dict[str, Any]) -> str:
    """One line per input: dtype, shape, device and strides for tensors, the value otherwise."""
    parts = []
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dt = str(value.dtype).replace("torch.", "")
            parts.append(f"{name}: {dt}{list(value.shape)} on {value.device}, strides {tuple(value.stride())}")
        elif value is not None:
            parts.append(f"{name}: {value!r}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------- tracing state


def tracing() -> bool:
    """True under torch.compile / torch.export tracing or any torch dispatch / function mode (FX, fake
    tensors, opcheck): the registered custom ops must be called and nothing may be timed."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
    )


def eager(t: torch.Tensor) -> bool:
    """True when a call on ``t`` may skip the torch.library dispatcher: plain tensor, no tracing, no
    autocast (the registered autocast rule then applies through the dispatcher)."""
    return type(t) is torch.Tensor and not tracing() and not torch._C._is_any_autocast_enabled()


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # no usable CUDA runtime here: nothing can be capturing
        return False


# ---------------------------------------------------------------------------------------- timing

Timer = Callable[[Callable[[], Any], torch.device], float]


def cuda_event_timer(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    """Median ms of ``reps`` CUDA-event-timed calls after ``warmup`` untimed ones, on ``device``'s stream."""
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_timer(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1, reps: int = 5) -> float:
    """Median ms of ``reps`` wall-clock timed calls (CPU tensors, e.g. the Triton interpreter in tests)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_TIMER: List[Optional[Timer]] = [None]


def set_timer(timer: Optional[Timer]) -> Optional[Timer]:
    """Replaces the timer measured dispatch uses (``timer(fn, device) -> ms``; None: CUDA events on CUDA
    tensors, wall clock otherwise). Returns the previous one. For tests and custom harnesses."""
    previous, _TIMER[0] = _TIMER[0], timer
    return previous


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    if _TIMER[0] is not None:
        return float(_TIMER[0](fn, device))
    return cuda_event_timer(fn, device) if device.type == "cuda" else wall_timer(fn, device)


# ------------------------------------------------------------------------------- persistent cache

_LOCK = threading.Lock()
_RECORDER: List[Dict[str, Dict[str, Any]]] = []  # fastvit.tune's: key -> entry of every op call
_MEASURED: Dict[str, Dict[str, Any]] = {}  # measured key -> entry (this process: stable)
_DISK: Dict[str, Any] = {"loaded_from": None, "entries": {}, "writable": True, "warned": set()}
_RESET_HOOKS: List[Callable[[], None]] = []  # reset() calls these: memos built on measured_entry's answers


def cache_path() -> Optional[str]:
    """The per-machine cache file: ``FASTVIT_DISPATCH_CACHE`` (a path; "off" for memory only), else
    ``$XDG_CACHE_HOME/fastvit/dispatch.json`` (``~/.cache/fastvit/dispatch.json``)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "none", "0"):
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastvit", "dispatch.json")


def cache_versions() -> Dict[str, Optional[str]]:
    """What a cached measurement depends on besides the GPU: a cache with other values is ignored."""
    import fastvit

    driver = None
    if torch.cuda.is_available():
        try:
            driver = str(torch._C._cuda_getDriverVersion())
        except Exception:  # noqa: BLE001 - an old torch without the query: the runtime version stands in
            driver = None
    return {
        "torch": torch.__version__,
        "triton": kernels.TRITON_VERSION,
        "fastvit": fastvit.__version__,
        "cuda": torch.version.cuda,
        "driver": driver,
    }


def _warn_once(kind: str, message: str) -> None:
    if kind not in _DISK["warned"]:
        _DISK["warned"].add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _read_cache_file(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(entries, None) for a valid cache of these versions; (None, why) for a missing/corrupt/foreign one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable or corrupt ({type(exc).__name__}: {exc})"
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return None, f"not a {CACHE_FORMAT} file"
    if data.get("versions") != cache_versions():
        return None, f"written for other versions ({data.get('versions')}; these are {cache_versions()})"
    return data["entries"], None


def _load_disk() -> Dict[str, Any]:
    path = cache_path()
    if _DISK["loaded_from"] == path:
        return _DISK["entries"]
    _DISK["loaded_from"], _DISK["entries"], _DISK["writable"] = path, {}, True
    if path is None:
        return _DISK["entries"]
    entries, why = _read_cache_file(path)
    if entries is None:
        _warn_once(
            f"bad:{path}",
            f"fastvit dispatch cache {path} is {why}; ignoring it (it is rewritten on the next measurement)",
        )
        entries = {}
    _DISK["entries"] = dict(entries)
    return _DISK["entries"]


@contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the file whole (a concurrent entry may be lost)
        yield
        return
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _persist(key: str, entry: Dict[str, Any]) -> None:
    """Merges ``key`` into the cache file under a lock (re-reading what other processes wrote)."""
    path = cache_path()
    if path is None or not _DISK["writable"]:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path):
            current, _ = _read_cache_file(path)
            merged = dict(current or {})
            merged.update(_DISK["entries"])
            merged[key] = entry
            payload = {"format": CACHE_FORMAT, "versions": cache_versions(), "entries": merged}
            atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))
        _DISK["entries"] = merged
    except Exception as exc:  # noqa: BLE001 - unwritable location: memory only, said once
        _DISK["writable"] = False
        _warn_once(
            f"unwritable:{path}",
            f"fastvit dispatch cache {path} cannot be written ({type(exc).__name__}: {exc}); measured choices are "
            f"kept in memory only. Set {CACHE_ENV} to a writable file (or 'off').",
        )


def _device_label(device: torch.device) -> str:
    """The GPU part of a measured key: name and capability ("NVIDIA H100 80GB HBM3 sm_90"), else the type."""
    if device.type == "cuda":
        cap = _capability(_index(device))
        return f"{_gpu_name(_index(device))} sm_{cap[0]}{cap[1]}"
    return device.type


def _time_candidates(
    key: str, candidates: Dict[str, Callable[[], Any]], device: torch.device, label: str
) -> Dict[str, Any]:
    """Times each candidate (name -> a call running it) with the dispatch timer and keeps the fastest (ties:
    the first listed) under ``key``: in memory (an earlier choice, e.g. another thread's, wins) and, when
    something was timed, in the cache file. A candidate that raises is refused with the reason; when all
    do, the first is the entry's choice (it then runs for real and raises its own error to the caller)."""
    times: Dict[str, float] = {}
    refused: Dict[str, str] = {}
    for name, call in candidates.items():
        try:
            times[name] = _time(call, device)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is refused, with why
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
                torch.cuda.empty_cache() if device.type == "cuda" else None
            refused[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _log.warning("%s: %r refused while timing %s: %s", label, name, key, refused[name])
    best = min(times, key=times.__getitem__) if times else next(iter(candidates))
    entry = {
        "backend": best,
        "times_ms": {b: round(t, 6) for b, t in times.items()},
        "refused": refused,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    with _LOCK:
        entry = _MEASURED.setdefault(key, entry)  # another thread's earlier choice wins: stable
        if times:
            _persist(key, entry)
    return entry


def measured_entry(
    family: str,
    signature: str,
    candidates: Dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    measure: bool = True,
) -> Optional[Dict[str, Any]]:
    """Measured dispatch for a choice that is not an op's backend (e.g. kernels/linear_tma.py's TMA vs
    pointer GEMM): the entry for key ``family|<GPU name and capability>|signature`` among ``candidates``
    (name -> a zero-argument call that runs that one), by the same machinery as the ops' auto dispatch:
    this process's choice if made (it never changes), else the cache file's (:func:`cache_path`, same
    versions), else, when ``measure``, each candidate timed by the dispatch timer (:func:`set_timer`),
    the fastest kept (ties: the first listed), one that raises refused with the reason, the entry kept
    in memory and merged into the cache file. Returns the entry (``backend``, ``times_ms``, ``refused``,
    ``date``; it shows in :func:`measured_table`), or None when nothing is known and ``measure`` is False.

    The caller decides what the ops decide before measuring: :func:`current_mode` ("static": do not ask)
    and never ``measure`` inside CUDA-graph capture or compile tracing (no lock or file there either)."""
    if not candidates:
        raise ValueError(f"fastvit.ops.dispatch.measured_entry({family!r}): no candidates; pass name -> call")
    key = f"{family}|{_device_label(device)}|{signature}"
    with _LOCK:
        entry = _MEASURED.get(key) or _load_disk().get(key)
        if entry is not None and entry.get("backend") in candidates:
            return _MEASURED.setdefault(key, entry)  # stable for the life of the process
    if not measure:
        return None
    return _time_candidates(key, candidates, device, family)


def measured_table() -> Dict[str, Dict[str, Any]]:
    """Every measured choice known here: the cache file's entries and this process's, key -> entry
    (``backend``, ``times_ms`` per backend, ``refused`` backend -> reason, ``date``)."""
    with _LOCK:
        table = dict(_load_disk())
        table.update(_MEASURED)
    return table


def reset() -> None:
    """Forgets every in-memory choice, the loaded cache and the one-time warnings (tests; a new process)."""
    with _LOCK:
        _MEASURED.clear()
        _DISK.update(loaded_from=None, entries={}, writable=True, warned=set())
        _FALLBACKS.clear()
        for op in _REGISTRY.values():
            op._memo.clear()
        for forget in _RESET_HOOKS:  # the memos of measured_entry's callers (linear_tma.CHOICES)
            forget()


# ------------------------------------------------------------------------------------- the table


def tensor_signature(t: Optional[torch.Tensor]) -> Any:
    """(shape, dtype, device) of a tensor (None for None): one part of a memo key. Raises AttributeError
    for a non-tensor, which the ops answer by running their checks."""
    return None if t is None else (t.shape, t.dtype, t.device)


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0): a size bucket for measured keys."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def _no_signature(**inputs: Any) -> str:
    return "|".join(f"{k}={tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}={v!r}" for k, v in inputs.items())


@dataclass
class OpDispatcher:
    """One row of the op table: everything dispatch, info, the tests and the benchmarks need of an op.

    Args:
        name: public op name (``fastvit.ops.<name>``).
        reasons: backend name -> function(**inputs) returning why that backend cannot serve the inputs.
        preference: the static order for CUDA tensors (see :data:`STATIC_ORDER_SOURCE`).
        reference: the op's specification in plain torch (``<op>_ref``).
        check: the input checks, function(**call arguments) raising TypeError / ValueError.
        forward_op / backward_op: the registered ``torch.library`` custom ops (what compile/export see).
        autocast: the autocast rule: "lower" (inputs cast to the autocast dtype) or "keep" (x's dtype).
        signature: function(**inputs) -> the shape signature of the measured key; it buckets sizes only
            where the bucket cannot change the winner (default: every shape exactly).
        launchers: backend -> the function the public op calls once the backend is chosen.
        static_source: the measurement the static order comes from (today: unmeasured).
        kernel_family: the kernels' name (``fastvit/kernels/<family>.py``); default ``name``. Two rows
            may share one family (attention and attention_qkvpacked run the same kernels).
        selftest: what ``python -m fastvit.selftest`` runs of this op (a
            :class:`fastvit.ops._selftest_spec.SelftestSpec`); None: the selftest lists the op as having no
            cases declared.
    """

    name: str
    reasons: Dict[str, ReasonsFn]
    preference: Sequence[str]
    reference: Optional[Callable[..., Any]] = None
    check: Optional[Callable[..., Any]] = None
    forward_op: Any = None
    backward_op: Any = None
    autocast: str = "keep"
    signature: Callable[..., str] = _no_signature
    launchers: Dict[str, Callable[..., Any]] = field(default_factory=dict)
    static_source: str = STATIC_ORDER_SOURCE
    kernel_family: str = ""
    selftest: Any = None
    _memo: Dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = [b for b in (*self.reasons, *self.preference) if b not in BACKENDS]
        if unknown:
            raise ValueError(f"op {self.name}: unknown backends {unknown}; expected some of {BACKENDS}")
        self.kernel_family = self.kernel_family or self.name
        if self.autocast not in ("lower", "keep"):
            raise ValueError(f"op {self.name}: autocast must be 'lower' or 'keep', got {self.autocast!r}")
        _REGISTRY[self.name] = self

    # -- the hot path --------------------------------------------------------------------------

    @staticmethod
    def slot(hit: Any, tensors: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
        """A memo entry as a backend (None: not remembered, check and :meth:`resolve`). The ops look up
        ``_memo`` themselves, with a flat key ending in (``backend``, ``env_get(ENV_KEY)``), and take a str
        entry as is; the rest come here: a measured entry (CUDA, auto) answers by whether grad is required,
        an autocast-only one (see :meth:`resolve`) only while autocast is on for the first tensor's device."""
        if type(hit) is tuple:  # (AUTOCAST_ONLY, entry): its signature passed the checks under autocast only
            from fastvit.ops._library import autocast_dtype

            first = next(t for t in tensors if t is not None)
            if autocast_dtype(first.device) is None:  # autocast is off for these tensors' device
                return None
            hit = hit[1]
        if hit is None or type(hit) is str:
            return hit
        return hit.get(_grad_required(tensors))

    def resolve(
        self, key: Any, backend: Optional[str], device: torch.device, run: Optional[Callable[..., Any]],
        autocast_only: bool = False, **inputs: Any,
    ) -> str:  # fmt: skip
        """Chooses the backend for a call (the caller has run ``self.check`` already) and remembers it
        under ``key``: the op's full memo key (signature, ``backend``, raw ``FASTVIT_BACKEND``), or None
        for a call that is not memoised (traced, or arguments the signature does not cover).
        ``autocast_only``: the checks passed because autocast is on for the first input's device (e.g. mixed
        dtypes autocast lowers to one), so the entry answers only then (the key need not carry the
        autocast state).

        ``run(backend, **inputs)`` is the op on these inputs with that backend (what measured dispatch times).
        """
        chosen = self.select(backend, device, _run=run, **inputs)
        if key is None or tracing() or _capturing(device):
            return chosen  # not remembered: a later eager call may still measure
        explicit = backend if backend is not None else env_backend()
        entry = self._memo.get(key)
        if type(entry) is tuple:
            entry = entry[1]
        if explicit is None and device.type == "cuda" and current_mode() == "measured":
            if not isinstance(entry, dict):
                entry = {}
            entry[_grad_required([v for v in inputs.values() if isinstance(v, torch.Tensor)])] = chosen
        else:
            entry = chosen
        self._memo[key] = (AUTOCAST_ONLY, entry) if autocast_only else entry
        return chosen

    # -- the choice ----------------------------------------------------------------------------

    def unsupported_reasons(self, backend: str, device: torch.device, inputs: Dict[str, Any]) -> List[str]:
        if backend not in self.reasons:
            return [f"op {self.name} has no {backend!r} backend (it has {', '.join(self.reasons)})"]
        return environment_reasons(backend, device) + self.reasons[backend](**inputs)

    def select(
        self, backend: Optional[str], device: torch.device, _run: Optional[Callable] = None, **inputs: Any
    ) -> str:
        """The backend to run ``inputs`` on; raises BackendNotSupported for an explicit one that cannot."""
        source = "backend="
        if backend is None:
            env = env_backend()
            if env is not None:
                backend, source = env, f"{ENV_VAR}="
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(
                    f"fastvit.ops.{self.name}: unknown backend {source}{backend!r}; expected one of "
                    f"{', '.join(BACKENDS)} or None (auto)"
                )
            reasons = self.unsupported_reasons(backend, device, inputs)
            if reasons:
                raise BackendNotSupported(self._refusal(backend, source, device, inputs, reasons))
            return backend
        if device.type != "cuda":
            return self._record(device, inputs, "torch", "CPU tensors: auto runs torch")
        eligible = []
        for candidate in self.preference:
            reasons = self.unsupported_reasons(candidate, device, inputs)
            if not reasons:
                eligible.append(candidate)
            elif not torch.compiler.is_compiling():
                self._record_fallback(candidate, reasons)
        if (
            "torch" in self.reasons
            and "torch" not in eligible
            and not self.unsupported_reasons("torch", device, inputs)
        ):
            eligible.append("torch")
        if not eligible:
            return self._record(device, inputs, "torch", "no backend eligible")
        if current_mode() == "static" or len(eligible) == 1:
            return self._record(device, inputs, eligible[0], "static order" if len(eligible) > 1 else "only one")
        key = self.measured_key(device, inputs)
        if torch.compiler.is_compiling():  # no lock, no file inside a traced region: this process's choices
            entry = _MEASURED.get(key)
            return entry["backend"] if entry is not None and entry.get("backend") in eligible else eligible[0]
        with _LOCK:
            entry = _MEASURED.get(key) or _load_disk().get(key)
            if entry is not None and entry.get("backend") in eligible:
                entry = _MEASURED.setdefault(key, entry)  # stable for the life of the process
        if entry is None or entry.get("backend") not in eligible:
            if _run is None or tracing() or _capturing(device):
                return eligible[0]  # never time here: the static order until an eager call measures
            entry = self._measure(key, eligible, device, _run, inputs)
        if _RECORDER:
            _RECORDER[-1][key] = entry
        return entry["backend"]

    def _record(self, device: torch.device, inputs: Dict[str, Any], backend: str, why: str) -> str:
        if _RECORDER and not torch.compiler.is_compiling():
            _RECORDER[-1][self.measured_key(device, inputs)] = {"backend": backend, "measured": False, "why": why}
        return backend

    def measured_key(self, device: torch.device, inputs: Dict[str, Any]) -> str:
        """(op, GPU name and capability, dtype, shape signature, grad required) as one string."""
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        dtype = str(tensors[0].dtype).replace("torch.", "") if tensors else "-"
        grad = _grad_required(tensors)
        return f"{self.name}|{_device_label(device)}|{dtype}|{self.signature(**inputs)}|{'fwd+bwd' if grad else 'fwd'}"

    def _measure(
        self, key: str, eligible: List[str], device: torch.device, run: Callable[..., Any], inputs: Dict[str, Any]
    ) -> Dict[str, Any]:
        grad = key.endswith("|fwd+bwd")
        calls = {candidate: _timed_call(run, candidate, inputs, grad) for candidate in eligible}
        return _time_candidates(key, calls, device, f"fastvit.ops.{self.name}")

    def _refusal(
        self, backend: str, source: str, device: torch.device, inputs: Dict[str, Any], reasons: List[str]
    ) -> str:
        usable = [b for b in self.reasons if b != backend and not self.unsupported_reasons(b, device, inputs)]
        hint = (
            f"use backend={usable[0]!r}"
            + (f" (or {', '.join(repr(b) for b in usable[1:])})" if usable[1:] else "")
            + " or backend=None to choose automatically"
            if usable
            else "no backend can serve this input; check the input itself"
        )
        if source.startswith(ENV_VAR):
            hint += f", or unset {ENV_VAR}"
        lines = "\n".join(f"  - {r}" for r in reasons)
        return (
            f"fastvit.ops.{self.name}: backend {source}{backend!r} cannot run these inputs "
            f"({describe_inputs(inputs)}):\n{lines}\nHint: {hint}."
        )

    def _record_fallback(self, backend: str, reasons: List[str]) -> None:
        key = (self.name, backend)
        if _FALLBACKS.get(key) != reasons:
            _FALLBACKS[key] = reasons
            _log.info("fastvit.ops.%s: auto dispatch passed over %r: %s", self.name, backend, "; ".join(reasons))

    def availability(self, device: torch.device) -> Dict[str, List[str]]:
        """Backend -> environment reasons it cannot run on ``device`` here (empty: available)."""
        return {b: environment_reasons(b, device) for b in self.reasons}


def _grad_required(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _timed_call(run: Callable[..., Any], backend: str, inputs: Dict[str, Any], grad: bool) -> Callable[[], Any]:
    """One call of the op on fresh leaves of ``inputs`` (so timing never touches the caller's graph or
    ``.grad``), forward + backward when grad is required."""
    leaves = {
        k: v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
    }
    wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def call() -> Any:
        with torch.enable_grad() if grad else torch.no_grad():
            out = run(backend, **leaves)
            if grad:
                outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
                torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
        return out

    return call


def tune(model: torch.nn.Module, *example_inputs: Any, backward: Optional[bool] = None) -> Dict[str, Dict[str, Any]]:
    """Measures every op ``model`` calls on ``example_inputs`` and returns the table: measured key -> entry
    (``backend``, ``times_ms``, ``refused``, ``date``; or ``measured: False`` with why, e.g. CPU tensors,
    where auto always runs torch). The choices are kept for this process and in the cache file
    (:func:`cache_path`), so later runs (and CUDA-graph capture / compile) start from them.

    Args:
        model: any module whose forward calls fastvit ops (a fastvit model, a patched timm model).
        example_inputs: the inputs of one forward, at the shapes and dtypes to be run.
        backward: also run a backward (so the fwd+bwd keys training uses are measured); default: when
            the model is in training mode and has parameters requiring grad.
    """
    if backward is None:
        backward = model.training and any(p.requires_grad for p in model.parameters())
    with _LOCK:
        for op in _REGISTRY.values():
            op._memo.clear()  # every call resolves (and records) again; measured choices stay
    _RECORDER.append({})
    try:
        with dispatch_mode("measured"), torch.set_grad_enabled(bool(backward)):
            out = model(*example_inputs)
            if backward:
                outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                model.zero_grad(set_to_none=True)
    finally:
        table = _RECORDER.pop()
        with _LOCK:
            for op in _REGISTRY.values():
                op._memo.clear()
    return table


def describe_cache() -> Dict[str, Any]:
    """The dispatch state ``python -m fastvit.info`` prints: mode, cache file, static-order source and the
    measured table (never raises: a bad mode variable is reported, not thrown)."""
    try:
        mode = current_mode()
    except ValueError as exc:
        mode = f"invalid ({exc})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = measured_table()
    return {
        "mode": mode,
        "cache": cache_path(),
        "cache_problems": [str(w.message) for w in caught],
        "static_order": STATIC_ORDER_SOURCE,
        "measured": table,
    }


def format_cache(state: Dict[str, Any]) -> List[str]:
    """``describe_cache()`` as the lines ``fastvit.info`` prints."""
    cache = state["cache"] or "off (memory only)"
    lines = [
        f"dispatch mode {state['mode']} (FASTVIT_DISPATCH=measured|static), cache {cache}",
        f"static order: {state['static_order']}",
    ]
    lines += [f"  cache problem: {p}" for p in state["cache_problems"]]
    if not state["measured"]:
        lines.append("measured choices: none cached (auto measures on CUDA tensors at first use; see fastvit.tune)")
    else:
        lines.append(f"measured choices ({len(state['measured'])}):")
        for key, entry in sorted(state["measured"].items()):
            times = ", ".join(f"{b} {t:.4f} ms" for b, t in entry.get("times_ms", {}).items())
            refused = "".join(f"; {b} refused: {r}" for b, r in entry.get("refused", {}).items())
            lines.append(f"  {key} -> {entry.get('backend')}  ({times}{refused}; {entry.get('date', '?')})")
    return lines


def registered_ops() -> "OrderedDict[str, OpDispatcher]":
    """The op table: name -> its row."""
    return _REGISTRY


def backends_of(name: str) -> List[str]:
    """The backends op ``name`` declares (for per-backend test parametrisation and benchmarks)."""
    return list(_REGISTRY[name].reasons)


def fallback_log() -> Dict[Tuple[str, str], List[str]]:
    """(op, backend) -> the latest reasons auto dispatch passed that backend over in this process."""
    return dict(_FALLBACKS)

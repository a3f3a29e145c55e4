"""Helpers for registering fastvit's ops with torch.library (shared by every ops/<op>.py).

Every kernel entry point is a ``torch.library.custom_op`` in namespace ``fastvit`` with a fake
implementation and autograd, so ``torch.compile(fullgraph=True)``, CUDA graphs and ``torch.export``
treat it as one opaque node. The backend is a string argument of the op, chosen by
:mod:`fastvit.ops.dispatch` before the call.

The lean eager path (:func:`eager_op`, :func:`direct`): in eager mode a call skips the torch.library
dispatcher round trip (~13 us without grad, ~37 us with grad per call on a CPU) and goes straight to the
op's implementation, through an ``autograd.Function`` built from the same setup_context / backward when
grad is required. Under compile / export / FX tracing, a dispatch mode (fake tensors, opcheck), autocast or
:func:`registered_path`, the registered custom op runs instead, so those tools see one opaque node.
"""

from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "direct",
    "eager_op",
    "registered_path",
    "autocast_dtype",
    "check_tensors",
    "new_output",
    "register_autocast_keep_dtype",
    "register_autocast_lower",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_AUTOCAST_KEYS = ("AutocastCPU", "AutocastCUDA")
_LIBS: List[Any] = []  # keep the Library fragments alive for the life of the process
# Set by fastvit.testing.poisoned_outputs(): kernel outputs start as NaN so unwritten elements show up.
POISON_OUTPUTS = False


_FORCE_REGISTERED: List[bool] = [False]


@contextmanager
def registered_path() -> Iterator[None]:
    """Within the block every op call goes through its registered torch.library op, as under tracing
    (the tests compare both paths)."""
    previous, _FORCE_REGISTERED[0] = _FORCE_REGISTERED[0], True
    try:
        yield
    finally:
        _FORCE_REGISTERED[0] = previous


def _lean(first: Any) -> bool:
    from fastvit.ops.dispatch import eager

    return not _FORCE_REGISTERED[0] and eager(first)


def direct(op: Any) -> Callable[..., Any]:
    """``op``'s implementation when the call is eager (see :func:`eager_op`), else ``op`` itself. For the
    backward custom ops (their callers, the registered backward functions, carry the autograd)."""
    impl = getattr(op, "_init_fn", None)
    if impl is None:  # a torch.library without the attribute: always the registered op
        return op

    def call(*args: Any) -> Any:
        return impl(*args) if _lean(args[0]) else op(*args)

    call.__name__ = f"direct_{impl.__name__}"
    return call


def eager_op(op: Any, setup_context: Callable[..., None], backward: Callable[..., Any]) -> Callable[..., Any]:
    """Registers ``backward`` / ``setup_context`` as ``op``'s autograd and returns the callable the public
    function uses: in eager mode ``op``'s implementation (no grad) or an ``autograd.Function`` with the same
    setup_context and backward (grad), skipping the dispatcher; otherwise ``op`` (compile, export, opcheck,
    autocast). Both give identical values and gradients (tests/ops/test_dispatch.py checks it)."""
    op.register_autograd(backward, setup_context=setup_context)
    impl = getattr(op, "_init_fn", None)
    if impl is None:
        return op

    def forward(*args: Any) -> Any:
        return impl(*args)

    def setup(ctx: Any, inputs: Any, output: Any) -> None:
        setup_context(ctx, inputs, output)

    def grad(ctx: Any, *grads: Any) -> Any:
        return backward(ctx, *grads)

    # Built with type() so the autograd node is named after the op ("<impl>_eagerBackward").
    Function = type(
        f"{impl.__name__.lstrip('_')}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "setup_context": staticmethod(setup), "backward": staticmethod(grad)},
    )
    apply = Function.apply

    def call(*args: Any) -> Any:
        if not _lean(args[0]):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return apply(*args)
        return impl(*args)

    call.__name__ = f"eager_{impl.__name__}"
    call.registered = op  # type: ignore[attr-defined]
    return call


def new_output(shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Allocates a kernel output on ``like``'s device (NaN-filled under fastvit.testing.poisoned_outputs)."""
    out = torch.empty(tuple(shape), device=like.device, dtype=dtype or like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def check_tensors(op: str, named: dict[str, Optional[torch.Tensor]]) -> None:
    """Every non-None entry is a tensor and all of them share one device; errors name the op and input."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: inputs are on different devices ({where}); move them to one device")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast lowers to on ``device``, or None when autocast is off there. Devices autocast
    does not cover (meta, used by fastvit.utils.count_flops) answer None instead of raising."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:  # torch.device.type builds a new str per read (~1 us): cached per device
        kind = _DEVICE_TYPES[device] = device.type
    if kind not in ("cpu", "cuda"):
        return None
    try:
        enabled = torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4 has no device_type argument
        enabled = torch.is_autocast_enabled() if kind == "cuda" else torch.is_autocast_cpu_enabled()
    return torch.get_autocast_dtype(kind) if enabled else None


_DEVICE_TYPES: dict = {}  # torch.device -> its type string (a handful of entries: cpu, cuda:N, meta)


def _autocast_excluded() -> Any:
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
        torch._C.DispatchKey.AutocastCUDA
    )
    return torch._C._ExcludeDispatchKeyGuard(keyset)


def _register_autocast(op: Any, cast: Optional[Callable[[Any, str], Any]]) -> None:
    qualname = op._qualname if hasattr(op, "_qualname") else op.name()
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    _LIBS.append(lib)

    for key in _AUTOCAST_KEYS:
        device_type = "cuda" if key.endswith("CUDA") else "cpu"

        def kernel(keyset: Any, *args: Any, _device_type: str = device_type) -> Any:
            with _autocast_excluded():
                if cast is not None:
                    args = tuple(cast(a, _device_type) for a in args)
                return op(*args)

        lib.impl(name, kernel, key, with_keyset=True)


def register_autocast_keep_dtype(op: Any) -> None:
    """Under autocast, run ``op`` on its inputs as given: the output keeps the input dtype.

    Used by normalisations: unlike ``F.layer_norm`` (which autocast runs in fp32 and returns fp32),
    fastvit's kernels already compute statistics in fp32 and return the activation dtype, and they
    accept fp32 weights beside fp16/bf16 activations.
    """
    _register_autocast(op, None)


def register_autocast_lower(op: Any) -> None:
    """Under autocast, cast floating-point tensor inputs to the autocast dtype (as ``F.linear`` is)."""

    def cast(arg: Any, device_type: str) -> Any:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            return arg.to(torch.get_autocast_dtype(device_type))
        return arg

    _register_autocast(op, cast)

"""Providers: the ways a user can run a model, measured side by side in one run.

timm eager (SDPA attention), timm + torch.compile (default mode and max-autotune), timm patched by
``fastvit.patch_model``, fastvit with auto dispatch, fastvit with each backend forced through
``FASTVIT_BACKEND``, fastvit + torch.compile, and fastvit replayed from a CUDA graph at batch 1.

A provider that cannot serve a row says why, as text that becomes the table cell: "n/a: ..." where
it does not apply by nature (timm has no T2T-ViT; CUDA graphs on a CPU), "not available: ..." where
something is missing now (a fastvit model not built yet, a backend not loadable here).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from _harness.rows import ModelRow

__all__ = [
    "CPU_PROVIDERS",
    "PROVIDERS",
    "Provider",
    "backend_env",
    "build_model",
    "count_gmacs",
    "count_params",
    "provider_by_key",
    "unavailable_reason",
]

# The metrics a graph-replay provider serves: a captured graph has one fixed input shape.
GRAPH_METRICS = ("latency",)


@dataclass(frozen=True)
class Provider:
    """One way to run a model.

    Args:
        key: short name used on the command line and in the results files.
        label: the table's name for it.
        library: "timm" or "fastvit" (whose model class is built).
        backend: FASTVIT_BACKEND forced while the provider runs; None = auto (the variable is cleared).
        compile_mode: None (eager), "default" or "max-autotune" for torch.compile.
        patched: timm model with ``fastvit.patch_model`` applied.
        graph: batch-1 forward captured in a CUDA graph and replayed.
    """

    key: str
    label: str
    library: str
    backend: Optional[str] = None
    compile_mode: Optional[str] = None
    patched: bool = False
    graph: bool = False

    def serves(self, metric: str) -> Optional[str]:
        """None if this provider measures ``metric``, else the reason it does not."""
        if self.graph and metric not in GRAPH_METRICS:
            return "n/a: a captured CUDA graph has one input shape; measured for batch-1 latency only"
        if self.compile_mode is not None and metric.startswith("paper_"):
            return "n/a: the paper protocol is eager fp32, as mmseg measured it; see the kernel-protocol columns"
        return None


PROVIDERS: tuple[Provider, ...] = (
    Provider("timm_eager", "timm eager (SDPA)", "timm"),
    Provider("timm_compile", "timm + compile", "timm", compile_mode="default"),
    Provider("timm_compile_max", "timm + compile max-autotune", "timm", compile_mode="max-autotune"),
    Provider("timm_patched", "timm + fastvit.patch_model", "timm", patched=True),
    Provider("fastvit_auto", "fastvit (auto)", "fastvit"),
    Provider("fastvit_torch", "fastvit backend=torch", "fastvit", backend="torch"),
    Provider("fastvit_triton", "fastvit backend=triton", "fastvit", backend="triton"),
    Provider("fastvit_cuda", "fastvit backend=cuda", "fastvit", backend="cuda"),
    Provider("fastvit_compile", "fastvit + compile", "fastvit", compile_mode="default"),
    Provider("fastvit_graph", "fastvit + CUDA graph (bs1)", "fastvit", graph=True),
)
# Without a GPU: eager timm and fastvit's torch backend (what auto picks on a CPU); torch.compile,
# graphs and the Triton / CUDA kernels are GPU stories.
CPU_PROVIDERS = ("timm_eager", "fastvit_torch")


def provider_by_key(key: str) -> Provider:
    for p in PROVIDERS:
        if p.key == key:
            return p
    raise ValueError(f"unknown provider {key!r}; expected some of {', '.join(p.key for p in PROVIDERS)}")


def _fastvit() -> Any:
    import fastvit

    return fastvit


def _fastvit_has_model(name: str) -> Optional[str]:
    """None if fastvit can build ``name``, else why not."""
    fastvit = _fastvit()
    if not hasattr(fastvit, "create_model"):
        return "not available: fastvit.create_model does not exist yet (model zoo, issue 3)"
    list_models = getattr(fastvit, "list_models", None)
    if list_models is not None and name not in list_models():
        return f"not available: fastvit has no model {name!r} yet (fastvit.list_models)"
    return None


def _timm_has_model(name: str) -> bool:
    import timm

    return name in timm.list_models(name)


def unavailable_reason(provider: Provider, row: ModelRow, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot run ``row`` on ``device`` at all (None: it can try)."""
    if provider.graph and device.type != "cuda":
        return "n/a: CUDA graph replay needs a GPU"
    if provider.library == "timm":
        if row.timm_name is None:
            return f"n/a: {row.timm_missing or 'timm has no such model'}"
        if not _timm_has_model(row.timm_name):
            return f"not available: timm {_timm_version()} has no model {row.timm_name!r}"
        if provider.patched and not hasattr(_fastvit(), "patch_model"):
            return "not available: fastvit.patch_model does not exist yet (issue 6)"
        return None
    if provider.backend is not None:
        from fastvit.ops import dispatch

        reasons = dispatch.environment_reasons(provider.backend, device)
        if reasons:
            return f"not available: backend {provider.backend!r}: " + "; ".join(reasons)
    return _fastvit_has_model(row.key)


def _timm_version() -> str:
    import timm

    return timm.__version__


@contextlib.contextmanager
def backend_env(provider: Provider) -> Iterator[None]:
    """Set FASTVIT_BACKEND for a forced-backend provider, clear it for auto; restore it afterwards.

    Dispatch reads the variable at every op call (and torch.compile at trace time), so it must stay
    set for the whole time the provider's model runs.
    """
    from fastvit.ops.dispatch import ENV_VAR

    saved = os.environ.get(ENV_VAR)
    if provider.backend is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = provider.backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = saved


def _create(provider: Provider, row: ModelRow) -> torch.nn.Module:
    """The row's model from the provider's library, on whatever device context is active."""
    if provider.library == "timm":
        import timm

        return timm.create_model(row.timm_name, pretrained=False, **row.create_kwargs())
    return _fastvit().create_model(row.key, pretrained=False, **row.create_kwargs())


def build_model(provider: Provider, row: ModelRow, device: torch.device) -> torch.nn.Module:
    """The fp32 model for ``row`` on ``device`` (random weights: speed does not depend on them).

    Built under the device context so initialisation runs on the GPU. Compilation is applied by the
    caller per measurement (eval and train graphs differ); patching is applied here.
    """
    with torch.device(device):
        model = _create(provider, row)
        if provider.patched:
            _fastvit().patch_model(model)
    return model.to(device)


def _on_meta_then_cpu(provider: Provider, row: ModelRow, use: Any) -> tuple[Any, list[str]]:
    """``use(model)`` on a meta-device model (no memory, no init), else on a CPU one; (result, errors)."""
    errors = []
    for where in ("meta", "cpu"):
        try:
            with torch.device(where):
                return use(_create(provider, row)), errors
        except Exception as exc:  # the library's own error becomes the cell's text
            errors.append(f"on {where}: {type(exc).__name__}: {exc}")
    return None, errors


def count_params(provider: Provider, row: ModelRow) -> dict[str, Any]:
    """{"value": trainable parameters, "source": ...} of the row's model, or {"reason": ...}."""

    def trainable(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    value, errors = _on_meta_then_cpu(provider, row, trainable)
    if value is None:
        return {"reason": f"error: building the {provider.library} model failed " + " | ".join(errors)}
    return {"value": int(value), "source": f"trainable parameters of the {provider.library} model"}


def count_gmacs(provider: Provider, row: ModelRow) -> dict[str, Any]:
    """GMACs of the row's model through ``fastvit.utils.count_flops``, in its labelled conventions.

    Returns {"full": ..., "linear_norm": ..., "source": ...} as the counter gives them, or
    {"reason": ...}. The harness never counts MACs itself: one counter serves the whole project.
    """
    from fastvit.utils import count_flops

    counted, errors = _on_meta_then_cpu(provider, row, lambda m: count_flops(m, img_size=row.img_size))
    if counted is None:
        return {"reason": "error: fastvit.utils.count_flops failed " + " | ".join(errors)}
    source = f"fastvit.utils.count_flops on the {provider.library} model"
    if isinstance(counted, dict):
        return {**{str(k): float(v) for k, v in counted.items()}, "source": source}
    return {"unlabelled": float(counted), "source": source + " (returned one number, convention not labelled)"}

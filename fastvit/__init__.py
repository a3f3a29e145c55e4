"""fastvit: fused Triton and CUDA kernels and drop-in models for Vision Transformers.

``import fastvit`` needs neither a GPU nor the compiled extension; ``python -m fastvit.info`` says what
this machine can run. The submodules below are attributes of the package (``fastvit.utils.count_flops``,
``fastvit.viz.attention_rollout``, ``fastvit.graphs.graph_replay``, ...), imported on first access.
"""

import importlib
from typing import Any

from fastvit import ops
from fastvit.checkpoints import load_checkpoint
from fastvit.inference import inference_model
from fastvit.models import create_model, list_models
from fastvit.ops.dispatch import tune
from fastvit.patch import PatchReport, patch_model, return_attention, unpatch_model

__version__ = "0.1.0"

# Imported on first attribute access: each pulls in more (PIL, numpy, CLI parsing) than ``import fastvit`` needs.
_LAZY_SUBMODULES = (
    "checkpoints",
    "convert",
    "fileio",
    "graphs",
    "info",
    "inference",
    "kernels",
    "layers",
    "models",
    "predict",
    "testing",
    "utils",
    "viz",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"fastvit.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastvit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
    "PatchReport",
    "__version__",
    "create_model",
    "inference_model",
    "list_models",
    "load_checkpoint",
    "ops",
    "patch_model",
    "return_attention",
    "tune",
    "unpatch_model",
]

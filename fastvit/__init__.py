"""fastvit: fused Triton and CUDA kernels and drop-in models for Vision Transformers.

``import fastvit`` needs neither a GPU nor the compiled extension; ``python -m fastvit.info`` says what
this machine can run.
"""

from fastvit import ops
from fastvit.checkpoints import load_checkpoint
from fastvit.inference import inference_model
from fastvit.models import create_model, list_models
from fastvit.ops.dispatch import tune
from fastvit.patch import PatchReport, patch_model, return_attention, unpatch_model

__version__ = "0.1.0"
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

"""fastvit: fused Triton and CUDA kernels and drop-in models for Vision Transformers.

``import fastvit`` needs neither a GPU nor the compiled extension; ``python -m fastvit.info`` says what
this machine can run.
"""

from fastvit import ops
from fastvit.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "ops"]

"""fastvit's ops. Each takes ``backend=None`` (auto) | "torch" | "triton" | "cuda"; see dispatch.py."""

from fastvit.ops.dispatch import BACKENDS, BackendNotSupported
from fastvit.ops.layer_norm import layer_norm, layer_norm_ref

__all__ = ["BACKENDS", "BackendNotSupported", "layer_norm", "layer_norm_ref"]

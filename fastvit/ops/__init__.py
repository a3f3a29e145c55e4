"""fastvit's ops. Each takes ``backend=None`` (auto) | "torch" | "triton" | "cuda"; see dispatch.py."""

from fastvit.ops.attention import attention, attention_probs, attention_probs_ref, attention_qkvpacked, attention_ref
from fastvit.ops.dispatch import BACKENDS, BackendNotSupported
from fastvit.ops.layer_norm import layer_norm, layer_norm_ref
from fastvit.ops.linear import linear, linear_ref, save_preact
from fastvit.ops.patch_embed import patch_embed, patch_embed_ref
from fastvit.ops.soft_split import soft_split, soft_split_ref

__all__ = [
    "BACKENDS",
    "BackendNotSupported",
    "attention",
    "attention_probs",
    "attention_probs_ref",
    "attention_qkvpacked",
    "attention_ref",
    "layer_norm",
    "layer_norm_ref",
    "linear",
    "linear_ref",
    "patch_embed",
    "patch_embed_ref",
    "save_preact",
    "soft_split",
    "soft_split_ref",
]

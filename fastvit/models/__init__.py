"""fastvit models (ViT, DeiT, R50+ViT hybrid, T2T-ViT, segmentors) and the create_model registry."""

from fastvit.models.registry import create_model, is_model, list_models, model_entrypoint, register_model
from fastvit.models import hybrid, vit  # registers the ViT / DeiT / hybrid names
from fastvit.models import segmentation  # noqa: F401
from fastvit.models import t2t  # noqa: F401
from fastvit.models.vit import VisionTransformer, VisionTransformerDistilled

__all__ = [
    "VisionTransformer",
    "VisionTransformerDistilled",
    "create_model",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
    "hybrid",
    "vit",
]

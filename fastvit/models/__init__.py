"""fastvit models (ViT, DeiT, R50+ViT hybrid, T2T-ViT, segmentors) and the create_model registry."""

from fastvit.models.registry import create_model, is_model, list_models, model_entrypoint, register_model
from fastvit.models import hybrid, vit  # registers the ViT / DeiT / hybrid names
from fastvit.models import segmentation, t2t  # register the segmentors and T2T-ViT names
from fastvit.models.vit import VisionTransformer, VisionTransformerDistilled

__all__ = [
    "VisionTransformer",
    "VisionTransformerDistilled",
    "create_model",
    "hybrid",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
    "segmentation",
    "t2t",
    "vit",
]

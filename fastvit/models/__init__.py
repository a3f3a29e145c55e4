"""fastvit models (ViT, DeiT, R50+ViT hybrid, T2T-ViT, segmentors) and the create_model registry."""

# importing a model module registers its names
from fastvit.models import hybrid, segmentation, t2t, vit
from fastvit.models.registry import create_model, is_model, list_models, model_entrypoint, register_model
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

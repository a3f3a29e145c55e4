"""fastvit models (ViT, DeiT, R50+ViT hybrid, T2T-ViT, segmentors) and the create_model registry."""

from fastvit.models.registry import create_model, is_model, list_models, model_entrypoint, register_model

__all__ = ["create_model", "is_model", "list_models", "model_entrypoint", "register_model"]

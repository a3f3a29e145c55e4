"""fastvit models (ViT, DeiT, R50+ViT hybrid, T2T-ViT, segmentors) and the create_model registry."""

"""nn.Modules built on fastvit.ops (PatchEmbed, Attention, Mlp, LayerNorm, Block, T2T layers)."""

"""nn.Modules built on fastvit.ops (PatchEmbed, Attention, Mlp, LayerNorm, Block, T2T layers).

They keep timm's module trees and parameter names, so ``timm_model.state_dict()`` loads into them, and
they run every op with ``backend=None`` (auto): the torch reference on CPU, fused kernels on GPUs.
"""

from fastvit.layers.attention import Attention
from fastvit.layers.block import Block, LayerScale
from fastvit.layers.drop import DropPath, drop_path
from fastvit.layers.linear import Linear
from fastvit.layers.mlp import Mlp, QuickGELU
from fastvit.layers.norm import LayerNorm
from fastvit.layers.patch_embed import PatchEmbed, to_2tuple
from fastvit.layers.pos_embed import POS_EMBED_INTERPOLATIONS, resample_abs_pos_embed

__all__ = [
    "POS_EMBED_INTERPOLATIONS",
    "Attention",
    "Block",
    "DropPath",
    "LayerNorm",
    "LayerScale",
    "Linear",
    "Mlp",
    "PatchEmbed",
    "QuickGELU",
    "drop_path",
    "resample_abs_pos_embed",
    "to_2tuple",
]

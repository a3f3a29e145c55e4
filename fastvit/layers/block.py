"""The pre-norm transformer block (timm's ``Block``) and LayerScale.

Per block the work runs as five fastvit ops::

    y      = ops.layer_norm(x)                                   # norm1
    a      = attn(y)                                             # ops.linear (qkv) -> ops.attention_qkvpacked
                                                                 #   -> ops.linear (proj)
    y, x   = ops.layer_norm(ls1(drop_path1(a)), residual=x)      # norm2 with the first residual add fused
    x      = ops.linear(ops.linear(y, gelu), residual=x)         # mlp.fc1 (+GELU), mlp.fc2 (+second residual)

The second residual is added in fc2's epilogue only when nothing sits between fc2 and the add (no
LayerScale, no active drop-path or output dropout, no hooks, no autocast lowering of the stream); otherwise
it is added after, as timm does. The rules are :mod:`fastvit.layers.fused`'s, shared with ``patch_model``.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from fastvit.layers import fused
from fastvit.layers.attention import Attention
from fastvit.layers.drop import DropPath
from fastvit.layers.mlp import Mlp
from fastvit.layers.norm import LayerNorm

__all__ = ["Block", "LayerScale"]


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (CaiT / DeiT III; key ``gamma``).

    Args:
        dim: channels.
        init_values: initial value of every gamma entry.
        inplace: multiply in place (only safe when nothing else reads x).
    """

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Block(nn.Module):
    """timm's ViT ``Block`` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2; same keys).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on the qkv projection.
        qk_norm: LayerNorm on q and k per head.
        proj_bias: bias on the attention output projection and the MLP.
        proj_drop: dropout after the attention projection and in the MLP (training only).
        attn_drop: dropout on the attention probabilities (training only).
        init_values: LayerScale init; None disables LayerScale.
        drop_path: stochastic-depth probability of both residual branches (training only).
        act_layer: MLP activation (see :class:`fastvit.layers.Mlp`).
        norm_layer: norm class (default :class:`fastvit.layers.LayerNorm`, eps 1e-6); fastvit's LayerNorm
            fuses the first residual add into norm2, any other norm class runs unfused.
        mlp_layer: MLP class.
        attn_head_dim: head dim when not ``dim // num_heads``.
        scale: attention softmax scale (multiplies q @ k.T); None means ``head_dim ** -0.5``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer: Union[str, Callable[[], nn.Module]] = "gelu",
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        attn_head_dim: Optional[int] = None,
        scale: Optional[float] = None,
    ):
        super().__init__()
        norm_layer = norm_layer or LayerNorm
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
            attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, attn_head_dim=attn_head_dim,
            scale=scale,
        )  # fmt: skip
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=proj_bias, drop=proj_drop
        )
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _mlp_plan(self) -> fused.MlpPlan:
        """(activation, backend) when ``mlp`` runs fastvit's fused Mlp forward, else None (a custom
        ``mlp_layer``: called as a module, the residual added after it)."""
        mlp = self._modules["mlp"]
        if type(mlp).forward is Mlp.forward:
            return (mlp.fused_act, None)
        return None

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C): ``x + attn(norm1(x))`` then ``+ mlp(norm2(.))``, timm's math
        (:func:`fastvit.layers.fused.block`, the function ``patch_model`` runs on timm's Block)."""
        sub = self._modules
        fuse_norm2 = type(sub["norm2"]).forward is LayerNorm.forward
        norm1, attn = sub["norm1"], sub["attn"]
        direct = None
        if (  # norm1 and attn run their fused forwards with nothing watching: the block may call them itself
            type(norm1).forward is LayerNorm.forward
            and fused.bare(norm1)
            and type(attn).forward is Attention.forward
            and attn.fused_attn
            and fused.packed_rows_ready(attn)
        ):
            direct = (None, attn.scale, None)
        return fused.block(self, x, fuse_norm2=fuse_norm2, mlp_plan=self._mlp_plan(), direct=direct)

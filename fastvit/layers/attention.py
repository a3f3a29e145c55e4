"""Multi-head self-attention on ``fastvit.ops``: qkv Linear -> packed flash attention -> proj Linear.

Two paths, one module:

* fused (default, ``fused_attn=True``): :func:`fastvit.layers.fused.attention`, the same function
  ``patch_model`` runs on timm's Attention: ``ops.attention_qkvpacked`` reads q, k, v straight from the qkv
  GEMM's output (``ops.attention`` when q/k norms sit in between);
* explicit (``fused_attn=False``, timm's switch of the same name): ``ops.attention_probs`` materialises the
  softmax probabilities, passes them through ``attn_drop`` (the module ``timm.utils.AttentionExtract``'s
  hook method watches; hooks on ``attn_drop`` select this path too) and keeps them, detached, in
  ``last_attn`` for attention rollout.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from fastvit import ops
from fastvit.layers import fused
from fastvit.layers.fused import hooked
from fastvit.layers.linear import Linear
from fastvit.layers.norm import LayerNorm
from fastvit.ops.attention import split_qkv

__all__ = ["Attention"]


class Attention(nn.Module):
    """timm's ``Attention`` (qkv, q_norm, k_norm, attn_drop, norm, proj, proj_drop; same keys).

    Args:
        dim: token width C.
        num_heads: H; the head dim is ``attn_head_dim`` or ``dim // num_heads``.
        qkv_bias: bias on the qkv projection (ViT: True; T2T encoder blocks: False).
        qk_norm: LayerNorm over the head dim of q and k (timm's ``qk_norm``).
        proj_bias: bias on the output projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection (training only).
        norm_layer: the q/k norm class (default :class:`fastvit.layers.LayerNorm`, eps 1e-6).
        attn_head_dim: head dim when it is not ``dim // num_heads``.
        scale: multiplies q @ k.T; None means ``head_dim ** -0.5``.

    Attributes:
        fused_attn: False selects the explicit path that keeps the probabilities.
        last_attn: (B, H, N, N) probabilities of the last explicit-path forward (detached), else None.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        attn_head_dim: Optional[int] = None,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if attn_head_dim is None and dim % num_heads != 0:
            raise ValueError(
                f"fastvit.layers.Attention: dim {dim} is not divisible by num_heads {num_heads}; pass attn_head_dim"
            )
        norm_layer = norm_layer or LayerNorm
        self.num_heads = num_heads
        self.head_dim = attn_head_dim or dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = scale if scale is not None else self.head_dim**-0.5
        self.fused_attn = True
        self.last_attn: Optional[Tensor] = None

        self.qkv = Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) tokens -> (B, N, C) attention output (after proj and proj_drop)."""
        if self.fused_attn and not hooked(self.attn_drop):
            return fused.attention(self, x, scale=self.scale)
        # explicit path: the probabilities pass through attn_drop (hooks see them) and are kept
        B, N, _ = x.shape
        q, k, v = split_qkv(fused.linear(self.qkv, x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out, probs = ops.attention_probs(q, k, v, scale=self.scale)
        self.last_attn = probs.detach()
        probs = self.attn_drop(probs)
        if self.training and self.attn_drop.p > 0.0:  # the op's output used the undropped probabilities
            out = probs @ v
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(fused.linear(self.proj, self.norm(out)))

    def extra_macs(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        """The attention matmuls (q @ k.T and probs @ v) for a (B, N, C) input; the qkv and proj
        GEMMs are counted through their Linear modules. See :func:`fastvit.utils.count_flops`."""
        B, N = input_shape[0], input_shape[1]
        return {"attention": 2 * B * self.num_heads * N * N * self.head_dim}

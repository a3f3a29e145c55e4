"""T2T-ViT (Yuan et al., "Tokens-to-Token ViT", ICCV 2021) on fastvit's ops, with the parameter names of the
official repository (yitu-opensource/T2T-ViT, ``models/t2t_vit.py``), so its ``.pth.tar`` files load strict.

Architecture for a 224 x 224 input (``token_dim`` = 64, D = embed_dim)::

    image (B, 3, 224, 224)
      soft_split0 = unfold(k=7, s=4, p=2)            -> (B, 3136, 147)   56 x 56 grid
      attention1  = token layer 147 -> 64             -> (B, 3136, 64)
      soft_split1 = unfold(k=3, s=2, p=1) of tokens   -> (B, 784, 576)    28 x 28
      attention2  = token layer 576 -> 64             -> (B, 784, 64)
      soft_split2 = unfold(k=3, s=2, p=1)             -> (B, 196, 576)    14 x 14
      project     = Linear(576, D)                    -> (B, 196, D)
    [cls; tokens] + sinusoid pos_embed -> depth x Block(D) -> LayerNorm -> head(cls token)

The token layers come in two kinds (``tokens_type``):

* ``"transformer"`` (t2t_vit_t_*, ``Token_transformer``): one-head attention from ``dim`` (147 / 576)
  down to ``in_dim`` (64) whose output adds the **value** as the shortcut, ``y = v + proj(attn(q, k, v))``
  (the input cannot be the shortcut: its width differs), then ``y + mlp(norm2(y))`` with an MLP of ratio 1.
  Its softmax scale is ``dim ** -0.5`` with ``dim`` the **input** width: 147 ** -0.5 and 576 ** -0.5,
  not ``64 ** -0.5``.
* ``"performer"`` (t2t_vit_7 ... t2t_vit_24, ``Token_performer``): linear attention through 32 positive
  random features ``phi(x) = exp(x @ w.T - |x|^2 / 2) / sqrt(m)`` of a frozen orthogonal ``w`` (m=32, 64),
  computed in fp32, again with the value as the shortcut; ``kqv`` splits in the order k, q, v.

Both kinds only ever see their input through ``norm1``, so the soft split before them is fused with that
LayerNorm (``ops.soft_split(..., norm_weight=norm1.weight)``); the second and third soft splits read the
previous layer's (B, L, C) tokens directly (``hw=``), with no transpose or reshape to an image.

The encoder blocks are ViT pre-norm blocks with ``qkv_bias=False`` and ``nn.LayerNorm``'s eps 1e-5, scaled
by ``head_dim ** -0.5``: the official factory functions switch to ``embed_dim ** -0.5`` only under
``pretrained=True``, a path their released weights never took (empty URLs; issue #62), so the released
weights are evaluated with ``head_dim ** -0.5``. ``qk_scale=`` overrides it for anyone reproducing the other.

Position embedding: the fixed sinusoid table ``angle[p, j] = p / 10000 ** (2 * (j // 2) / D)``, sin on even
j and cos on odd j, row 0 for the cls token, stored as a persistent **buffer** named ``pos_embed`` (the
official repository keeps it as a frozen ``nn.Parameter``: same state-dict key, not a trainable
parameter). Checkpoints carry it (fine-tuned 384 models hold a bicubic-resized table, not a fresh
sinusoid), so it is loaded, not recomputed. The performer's ``w`` is likewise a persistent buffer.

Parameter counts (trainable, 1000 classes; mission.md section 1.3): t2t_vit_t_14 21,465,422,
t2t_vit_t_19 39,084,686, t2t_vit_t_24 64,000,590; the performer variants add the 2 x 192 ``kqv`` biases.
MACs at 224 (``fastvit.utils.count_flops``; the fused ``norm1`` is reported by :meth:`T2TModule.extra_macs`,
the attention products by the token layers): t2t_vit_t_14/19/24 4.3407 / 7.7960 / 12.6881 G Linear +
LayerNorm (mmpretrain's 4.34 / 7.80 / 12.69) and 6.0954 / 9.7941 / 14.9791 G with the attention matmuls
(official README 6.1 / 9.8 / 15.0); t2t_vit_14/19 4.79 / 8.49 G (README 4.8 / 8.5).
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from fastvit import ops
from fastvit._geometry import int_pair, unfold_size
from fastvit.layers.block import Block
from fastvit.layers.linear import Linear
from fastvit.layers.mlp import Mlp
from fastvit.layers.norm import LayerNorm
from fastvit.layers.pos_embed import resample_abs_pos_embed
from fastvit.models._timm_compat import TimmCfgMixin
from fastvit.models._validate import check_model_args, image_size
from fastvit.models.registry import register_variant
from fastvit.models.vit import VisionTransformer

__all__ = [
    "T2TModule",
    "T2TViT",
    "SoftSplit",
    "TokenAttention",
    "TokenPerformer",
    "TokenTransformer",
    "sinusoid_position_table",
]

TOKENS_TYPES = ("transformer", "performer")
# nn.LayerNorm's default: every LayerNorm of the official T2T-ViT is a plain nn.LayerNorm.
_NORM_EPS = 1e-5


def sinusoid_position_table(num_positions: int, dim: int) -> Tensor:
    """The official fixed position table, (1, num_positions, dim) float32.

    ``angle[p, j] = p / 10000 ** (2 * (j // 2) / dim)``; sin on even j, cos on odd j. Computed in float64
    (the official code uses numpy float64) and rounded once to float32.

    Args:
        num_positions: table rows, ``num_patches + 1`` (row 0 is the cls token's position).
        dim: embedding width.
    """
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angle = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)


def _fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device`` (a no-op on devices autocast does not know, e.g. meta)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class SoftSplit(nn.Module):
    """``nn.Unfold(kernel_size, stride, padding)(x).transpose(1, 2)`` through ``ops.soft_split``: overlapping
    k x k patches, each flattened channel-major (``C * k * k``), tokens in row-major order.

    Holds no parameters (the official modules are plain ``nn.Unfold``); ``forward`` optionally applies the
    next layer's LayerNorm in the same pass.

    Args:
        kernel_size: patch side.
        stride: step between patches.
        padding: zero padding on every side.
    """

    def __init__(self, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

    def output_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) grid of patch positions for an (H, W) input."""
        return tuple(unfold_size(s, self.kernel_size, self.stride, self.padding) for s in hw)  # type: ignore[return-value]

    def forward(
        self, x: Tensor, hw: Optional[tuple[int, int]] = None, norm: Optional[LayerNorm] = None
    ) -> tuple[Tensor, tuple[int, int]]:
        """Returns ``(tokens (B, L, C*k*k), (H', W'))``.

        Args:
            x: an image (B, C, H, W), or tokens (B, H*W, C) with ``hw=(H, W)``.
            hw: the token grid when ``x`` is tokens; None for an image.
            norm: a LayerNorm over the output width to fuse into the split, or None.
        """
        in_hw = (x.shape[-2], x.shape[-1]) if hw is None else hw
        out = ops.soft_split(
            x,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            hw=hw,
            norm_weight=None if norm is None else norm.weight,
            norm_bias=None if norm is None else norm.bias,
            norm_eps=_NORM_EPS if norm is None else norm.eps,
        )
        return out, self.output_grid(in_hw)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class TokenAttention(nn.Module):
    """The official T2T ``Attention``: ``dim`` -> ``in_dim`` attention with the value as the shortcut.

    ``y = v + proj(softmax(scale * q @ k.T) @ v)`` with ``q, k, v`` from one bias-free ``qkv`` Linear; the
    shortcut is added in ``proj``'s epilogue.

    Args:
        dim: input width (147 or 576 in T2T-ViT).
        in_dim: output width (``token_dim``, 64).
        num_heads: heads; the value shortcut (official ``v.squeeze(1)``) is defined for 1 only.
        qkv_bias: bias on ``qkv`` (off in the official module).
        qk_scale: softmax scale; None means ``(dim // num_heads) ** -0.5`` of the **input** width, as official.
    """

    def __init__(
        self, dim: int, in_dim: int, num_heads: int = 1, qkv_bias: bool = False, qk_scale: Optional[float] = None
    ) -> None:
        super().__init__()
        if num_heads != 1:
            raise ValueError(f"T2T-ViT TokenAttention: the value shortcut needs num_heads=1, got {num_heads}")
        self.num_heads = num_heads
        self.in_dim = in_dim
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, in_dim * 3, bias=qkv_bias)
        self.proj = Linear(in_dim, in_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, dim) normalised tokens -> (B, N, in_dim)."""
        qkv = self.qkv(x)
        out = ops.attention_qkvpacked(qkv, self.num_heads, scale=self.scale)
        return self.proj(out, residual=qkv[..., 2 * self.in_dim :])

    def extra_macs(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        """q @ k.T and probs @ v for a (B, N, dim) input (the GEMMs count through their Linear modules).
        See :func:`fastvit.utils.count_flops`."""
        B, N = input_shape[0], input_shape[1]
        return {"attention": 2 * B * N * N * self.in_dim}


class TokenTransformer(nn.Module):
    """The official ``Token_transformer``: ``y = attn(norm1(x)); y + mlp(norm2(y))``.

    Args:
        dim: input width.
        in_dim: output width.
        num_heads: attention heads (1).
        mlp_ratio: MLP hidden width / ``in_dim`` (1.0 in T2T-ViT).
        qkv_bias: bias on the qkv Linear (off, as official).
        qk_scale: softmax scale; None means ``dim ** -0.5`` (the input width; see :class:`TokenAttention`).
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        num_heads: int = 1,
        mlp_ratio: float = 1.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=_NORM_EPS)
        self.attn = TokenAttention(dim, in_dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = LayerNorm(in_dim, eps=_NORM_EPS)
        self.mlp = Mlp(in_dim, hidden_features=int(in_dim * mlp_ratio), out_features=in_dim)

    def forward(self, x: Tensor, *, normed: bool = False) -> Tensor:
        """x: (B, N, dim) -> (B, N, in_dim).

        Args:
            x: tokens; already ``norm1(tokens)`` when ``normed`` (the soft split fused it).
            normed: whether ``norm1`` has been applied.
        """
        x = self.attn(x if normed else self.norm1(x))
        return self.mlp(self.norm2(x), residual=x)


class TokenPerformer(nn.Module):
    """The official ``Token_performer``: single-head linear attention through positive random features.

    With ``k, q, v = split(kqv(norm1(x)))`` (that order), ``phi(t) = exp(t @ w.T - |t|^2 / 2) / sqrt(m)``
    in fp32::

        y = phi(q) @ (phi(k).T @ v) / (phi(q) @ sum_n phi(k)_n + 1e-8)
        y = v + dropout(proj(y));  y + mlp(norm2(y))

    Args:
        dim: input width.
        in_dim: output width (``emb``).
        kernel_ratio: random features per output channel (m = int(in_dim * kernel_ratio) = 32).
        dropout: the official dp1 / dp2 (0.1), after ``proj`` and at the end of the MLP, training only.
    """

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, dropout: float = 0.1) -> None:
        super().__init__()
        self.emb = in_dim
        self.kqv = Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(dropout)
        self.proj = Linear(in_dim, in_dim)
        self.norm1 = LayerNorm(dim, eps=_NORM_EPS)
        self.norm2 = LayerNorm(in_dim, eps=_NORM_EPS)
        self.epsilon = 1e-8
        # Indexed as official (state-dict keys mlp.0.*, mlp.2.*): Linear, GELU, Linear, Dropout.
        self.mlp = nn.Sequential(Linear(in_dim, in_dim), nn.GELU(), Linear(in_dim, in_dim), nn.Dropout(dropout))
        self.m = int(in_dim * kernel_ratio)
        # Frozen random features: a buffer (official: Parameter(requires_grad=False); same state-dict key).
        self.register_buffer("w", torch.empty(self.m, in_dim))
        self.reset_random_features()

    def reset_random_features(self) -> None:
        """Redraws ``w`` as the official init does: an orthogonal (m, emb) matrix times sqrt(m)."""
        with torch.no_grad():
            nn.init.orthogonal_(self.w)
            self.w.mul_(math.sqrt(self.m))

    def _features(self, t: Tensor) -> Tensor:
        t = t.float()
        return torch.exp(t @ self.w.float().t() - 0.5 * (t * t).sum(dim=-1, keepdim=True)) / math.sqrt(self.m)

    def _linear_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """phi(q) @ (phi(k).T @ v) / (phi(q) @ sum_n phi(k)_n + eps), in fp32 even under autocast (exp of
        a half-precision logit overflows), returned in v's dtype."""
        with _fp32_region(v.device):
            kp, qp = self._features(k), self._features(q)  # (B, N, m)
            normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, N, 1)
            y = (qp @ (kp.transpose(1, 2) @ v.float())) / (normaliser + self.epsilon)
        return y.to(v.dtype)

    def forward(self, x: Tensor, *, normed: bool = False) -> Tensor:
        """x: (B, N, dim) -> (B, N, in_dim).

        Args:
            x: tokens; already ``norm1(tokens)`` when ``normed`` (the soft split fused it).
            normed: whether ``norm1`` has been applied.
        """
        k, q, v = self.kqv(x if normed else self.norm1(x)).split(self.emb, dim=-1)
        y = self._residual_linear(self.proj, self._linear_attention(q, k, v), v, self.dp)
        h = self.mlp[0](self.norm2(y), activation="gelu")
        return self._residual_linear(self.mlp[2], h, y, self.mlp[3])

    @staticmethod
    def _residual_linear(linear: Linear, x: Tensor, shortcut: Tensor, dropout: nn.Dropout) -> Tensor:
        """``shortcut + dropout(linear(x))``; the add goes into the GEMM's epilogue when dropout is inactive."""
        if dropout.training and dropout.p > 0:
            return shortcut + dropout(linear(x))
        return linear(x, residual=shortcut)

    def extra_macs(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        """The random-feature products (phi(q), phi(k), phi(k).T @ v, phi(q) @ that, the normaliser) for a
        (B, N, dim) input; the Linear GEMMs count through their modules. See :func:`fastvit.utils.count_flops`."""
        B, N = input_shape[0], input_shape[1]
        features = 2 * N * self.m * self.emb  # t @ w.T for q and k
        products = 2 * N * self.m * self.emb + N * self.m  # phi(k).T @ v, phi(q) @ kv, phi(q) @ sum phi(k)
        return {"attention": B * (features + products)}


class T2TModule(nn.Module):
    """Tokens-to-token: three soft splits with two token layers between them, then ``project`` to D.

    Args:
        img_size: input side, or (H, W).
        tokens_type: "transformer" (:class:`TokenTransformer`) or "performer" (:class:`TokenPerformer`).
        in_chans: image channels.
        embed_dim: width D of the projected tokens.
        token_dim: width of the token layers (64).
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        embed_dim: int = 768,
        token_dim: int = 64,
    ) -> None:
        super().__init__()
        if tokens_type not in TOKENS_TYPES:
            raise ValueError(
                f"T2T-ViT: tokens_type must be one of {TOKENS_TYPES}, got {tokens_type!r} (the official "
                f"'convolution' ablation is not provided)"
            )
        self.tokens_type = tokens_type
        self.soft_split0 = SoftSplit(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = SoftSplit(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = SoftSplit(kernel_size=3, stride=2, padding=1)
        dim1, dim2 = in_chans * 7 * 7, token_dim * 3 * 3
        if tokens_type == "transformer":
            self.attention1: Union[TokenTransformer, TokenPerformer] = TokenTransformer(dim1, token_dim)
            self.attention2: Union[TokenTransformer, TokenPerformer] = TokenTransformer(dim2, token_dim)
        else:
            self.attention1 = TokenPerformer(dim1, token_dim, kernel_ratio=0.5)
            self.attention2 = TokenPerformer(dim2, token_dim, kernel_ratio=0.5)
        self.project = Linear(dim2, embed_dim)
        self.img_size = _pair(img_size)
        self.grid_size = self.output_grid(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def output_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The token grid after the three soft splits (224 -> 56 -> 28 -> 14)."""
        for split in (self.soft_split0, self.soft_split1, self.soft_split2):
            hw = split.output_grid(hw)
        return hw

    def extra_macs(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        """The two token layers' ``norm1``, which run fused into the soft splits (not as module calls),
        at 2 MACs per element (see :func:`fastvit.utils.count_flops`); input_shape is the image's."""
        B, hw = input_shape[0], (input_shape[-2], input_shape[-1])
        macs = 0
        for split, layer in ((self.soft_split0, self.attention1), (self.soft_split1, self.attention2)):
            hw = split.output_grid(hw)
            macs += 2 * B * hw[0] * hw[1] * layer.norm1.normalized_shape[0]
        return {"norm": macs}

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) image -> (B, num_patches, embed_dim) tokens."""
        x, hw = self.soft_split0(x, norm=self.attention1.norm1)
        x = self.attention1(x, normed=True)
        x, hw = self.soft_split1(x, hw, norm=self.attention2.norm1)
        x = self.attention2(x, normed=True)
        x, hw = self.soft_split2(x, hw)
        return self.project(x)


def _img_size_error(size: object) -> Exception:
    return TypeError(f"T2T-ViT: img_size must be an int or an (H, W) pair of ints, got {size!r}")


def _pair(size: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return int_pair(size, _img_size_error)


# Preprocessing of the official weights (their timm-0.3 default_cfg): bicubic resize to img / 0.9, center crop.
PRETRAINED_CFG = {
    "input_size": (3, 224, 224),
    "crop_pct": 0.9,
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "num_classes": 1000,
    "first_conv": "tokens_to_token.soft_split0",
    "classifier": "head",
    "fixed_input_size": True,
}


class T2TViT(TimmCfgMixin, nn.Module):
    """Tokens-to-Token ViT with the official module tree and state-dict keys (see the module docstring).

    Args:
        img_size: input side or (H, W); the position table is built for this grid and inputs must match it.
        tokens_type: "transformer" (t2t_vit_t_*) or "performer" (t2t_vit_*).
        in_chans: image channels.
        num_classes: classifier size; 0 builds no head (``nn.Identity``).
        embed_dim: token width D.
        depth: encoder blocks.
        num_heads: encoder attention heads.
        mlp_ratio: encoder MLP hidden width / D.
        qkv_bias: bias on the encoder qkv projections (off in T2T-ViT).
        qk_scale: encoder softmax scale; None means ``head_dim ** -0.5`` (what the released weights use).
        drop_rate: dropout after the position embedding and inside the blocks (training only).
        attn_drop_rate: dropout on the encoder attention probabilities (training only).
        drop_path_rate: stochastic depth, rising linearly to this over the blocks (training only).
        token_dim: width of the tokens-to-token layers (64).
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_dim: int = 64,
    ) -> None:
        super().__init__()
        check_model_args(
            "T2TViT", img_size=img_size, heads=(embed_dim, num_heads),
            positive=dict(in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads, token_dim=token_dim),
            non_negative=dict(num_classes=num_classes, depth=depth),
            ratios=dict(mlp_ratio=mlp_ratio, **({} if qk_scale is None else {"qk_scale": qk_scale})),
            rates=dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate),
        )  # fmt: skip
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.pretrained_cfg = dict(PRETRAINED_CFG, input_size=(in_chans, *_pair(img_size)))
        self.tokens_to_token = T2TModule(img_size, tokens_type, in_chans, embed_dim, token_dim)
        self.img_size = self.tokens_to_token.img_size
        num_patches = self.tokens_to_token.num_patches
        if min(self.tokens_to_token.grid_size) < 1:
            raise ValueError(f"T2T-ViT: img_size {img_size!r} is too small: the soft splits leave no token")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_position_table(num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth rising linearly over the blocks (plain floats: works under a meta device too).
        drop_path = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        norm_layer = partial(LayerNorm, eps=_NORM_EPS)
        # The encoder's softmax scale: head_dim ** -0.5 unless qk_scale overrides it.
        self.qk_scale = qk_scale if qk_scale is not None else (embed_dim // num_heads) ** -0.5
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path[i],
                norm_layer=norm_layer,
                scale=self.qk_scale,
            )  # fmt: skip
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head: nn.Module = Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """The official init: truncated normal (std 0.02) for cls_token and every Linear weight, zero biases,
        LayerNorms at (1, 0). The performers' ``w`` and the sinusoid table are left as built."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names the official training excludes from weight decay."""
        return {"cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head with a freshly initialised one of ``num_classes`` outputs (0: no head).

        Args:
            num_classes: new classifier size.
        """
        check_model_args("reset_classifier", non_negative=dict(num_classes=num_classes))
        self.num_classes = num_classes
        self.head = Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_input_size(self, img_size: Optional[Union[int, tuple[int, int]]] = None, patch_size: Any = None) -> None:
        """Rebuilds the model for a new input resolution (as ``VisionTransformer.set_input_size``): the
        position table is resampled on the token grid, bicubic as load_checkpoint resamples T2T tables.

        Args:
            img_size: new (H, W) or side; None keeps the current one.
            patch_size: must be None or 16 (the soft splits' fixed total stride).

        Raises:
            ValueError / TypeError: another patch size, or a size that is not positive / leaves no token.
                Everything is checked and computed before anything changes.
        """
        if patch_size is not None and patch_size not in (16, (16, 16)):
            raise ValueError(f"T2T-ViT: set_input_size cannot change the patch size (16, fixed), got {patch_size!r}")
        if img_size is None:
            return
        size = image_size("T2T-ViT set_input_size", img_size)
        grid = self.tokens_to_token.output_grid(size)
        if min(grid) < 1:
            raise ValueError(f"T2T-ViT: set_input_size({img_size!r}) is too small: the soft splits leave no token")
        with torch.no_grad():
            table = resample_abs_pos_embed(self.pos_embed, grid, self.tokens_to_token.grid_size, 1, "mmpretrain")
        t2t = self.tokens_to_token
        t2t.img_size, t2t.grid_size, t2t.num_patches = size, grid, grid[0] * grid[1]
        self.img_size = size
        self.pos_embed = table
        self.pretrained_cfg = dict(self.pretrained_cfg, input_size=(self.in_chans, *size))

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"T2T-ViT: expected an image batch (B, {self.in_chans}, H, W), got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"T2T-ViT: input has {x.shape[1]} channels, the model was built for in_chans={self.in_chans} "
                f"(input shape {tuple(x.shape)})"
            )
        if (x.shape[2], x.shape[3]) != self.img_size:
            raise ValueError(
                f"T2T-ViT: input is {x.shape[2]}x{x.shape[3]} but the model's position table is built for "
                f"{self.img_size[0]}x{self.img_size[1]}; resize the input, or build the model with "
                f"img_size=({x.shape[2]}, {x.shape[3]}) and load weights through fastvit.load_checkpoint, "
                f"which resizes the table"
            )

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Image -> (B, 1 + N, D) tokens (cls token and position table included) and the token grid."""
        self._check_input(x)
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1) + self.pos_embed.to(x.dtype)
        return self.pos_drop(x), self.tokens_to_token.grid_size

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) image -> (B, 1 + num_patches, D) tokens after the final LayerNorm (cls first)."""
        x, _ = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    # The encoder is ViT's (blocks, final norm, one prefix token): the same functions serve it, on the grid
    # the soft splits leave. grad checkpointing recomputes each encoder block (the T2T stages are small).
    set_grad_checkpointing = VisionTransformer.set_grad_checkpointing
    _run_block = VisionTransformer._run_block
    forward_intermediates = VisionTransformer.forward_intermediates

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info``: one entry per encoder block (module path, channels, reduction in pixels),
        the levels ``forward_intermediates`` and ``create_model(..., features_only=True)`` return."""
        reduction = self.img_size[0] // max(self.tokens_to_token.grid_size[0], 1)
        return [
            dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=reduction) for i in range(len(self.blocks))
        ]

    get_intermediate_layers = VisionTransformer.get_intermediate_layers

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class token of ``forward_features``' output -> logits (or the (B, D) token when ``pre_logits``)."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) image -> (B, num_classes) logits (the cls features when ``num_classes=0``)."""
        return self.forward_head(self.forward_features(x))

    def extract_feat(self, x: Tensor, stage: str = "backbone") -> Union[tuple[Tensor], Tensor]:
        """mmpretrain's ``ImageClassifier.extract_feat``, as :meth:`fastvit.models.VisionTransformer.extract_feat`.

        Args:
            x: (B, C, H, W) image.
            stage: "backbone" (or "neck": T2T-ViT has none) -> a 1-tuple with the (B, D) final-norm class
                token (mmpretrain's ``out_type='cls_token'``); "pre_logits" -> the (B, D) tensor the head reads.

        Raises:
            ValueError: another stage.
        """
        if stage not in ("backbone", "neck", "pre_logits"):
            raise ValueError(f"T2T-ViT.extract_feat: stage must be 'backbone' or 'pre_logits', got {stage!r}")
        cls = self.forward_head(self.forward_features(x), pre_logits=True)
        return cls if stage == "pre_logits" else (cls,)


# name -> (tokens_type, embed_dim, depth, num_heads, mlp_ratio): the official factory functions.
_CONFIGS: dict[str, tuple[str, int, int, int, float]] = {
    "t2t_vit_7": ("performer", 256, 7, 4, 2.0),
    "t2t_vit_10": ("performer", 256, 10, 4, 2.0),
    "t2t_vit_12": ("performer", 256, 12, 4, 2.0),
    "t2t_vit_14": ("performer", 384, 14, 6, 3.0),
    "t2t_vit_19": ("performer", 448, 19, 7, 3.0),
    "t2t_vit_24": ("performer", 512, 24, 8, 3.0),
    "t2t_vit_t_14": ("transformer", 384, 14, 6, 3.0),
    "t2t_vit_t_19": ("transformer", 448, 19, 7, 3.0),
    "t2t_vit_t_24": ("transformer", 512, 24, 8, 3.0),
}


def _build(config: dict[str, Any], **kwargs: Any) -> T2TViT:
    return T2TViT(**{**config, **kwargs})  # the caller's overrides win


# Parameter counts of the official released weights, where the docstring states them.
_PARAMS = {"t2t_vit_t_14": "21,465,422", "t2t_vit_t_19": "39,084,686", "t2t_vit_t_24": "64,000,590"}

for _name, (_tokens, _dim, _depth, _heads, _ratio) in _CONFIGS.items():
    _title = "T2T-ViT" + ("_t-" if _name.startswith("t2t_vit_t_") else "-") + _name.rsplit("_", 1)[1]
    _doc = f"{_title}: {_tokens} T2T, D={_dim}, {_depth} blocks, {_heads} heads, MLP {int(_dim * _ratio)}" + (
        f" ({_PARAMS[_name]} parameters)." if _name in _PARAMS else "."
    )
    # Also a module attribute, as the explicit entrypoints of earlier releases were (``t2t.t2t_vit_t_14()``).
    globals()[_name] = register_variant(
        _name,
        partial(_build, dict(tokens_type=_tokens, embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_ratio=_ratio)),
        _doc,
        __name__,
    )

del _name, _tokens, _dim, _depth, _heads, _ratio, _title, _doc

"""Vision Transformer (ViT, DeiT, DeiT distilled) with timm's module tree and parameter names.

``timm_model.state_dict()`` loads with ``strict=True`` and gives timm's outputs; the compute runs through
``fastvit.layers`` (and so ``fastvit.ops``)::

    tokens = ops.patch_embed(x, W, b, pos_embed=pos_embed, prefix_tokens=[cls(, dist), reg])   # one op
    tokens = blocks(tokens)                    # fastvit.layers.Block: 5 fused ops per block
    feats  = ops.layer_norm(tokens)            # norm
    logits = ops.linear(pool(feats))           # fc_norm (avg pool only), head

Registered names are timm's (``fastvit.list_models("vit_*")``, ``"deit_*"``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastvit.layers import Attention, Block, LayerNorm, Linear, Mlp, PatchEmbed, resample_abs_pos_embed, to_2tuple
from fastvit.layers.pos_embed import POS_EMBED_INTERPOLATIONS
from fastvit.models._timm_compat import TimmCfgMixin
from fastvit.models._validate import check_model_args, image_size
from fastvit.models.registry import register_variant

__all__ = ["VisionTransformer", "VisionTransformerDistilled", "feature_take_indices"]

_POOL_TYPES = ("", "token", "avg", "avgmax", "max")

# Preprocessing of each architecture's default timm weights (timm 1.0.x pretrained_cfg of the first tag).
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _cfg(
    tag: str, img: int = 224, num_classes: int = 1000, norm: Optional[dict] = None, **kwargs: Any
) -> dict[str, Any]:
    return dict(
        tag=tag, input_size=(3, img, img), crop_pct=0.9 if img == 224 else 1.0, interpolation="bicubic",
        num_classes=num_classes, first_conv="patch_embed.proj", classifier="head", fixed_input_size=True,
        **(norm or _INCEPTION), **kwargs,
    )  # fmt: skip


def feature_take_indices(num_blocks: int, indices: Optional[Union[int, Sequence[int]]] = None) -> tuple[list[int], int]:
    """Block indices to return and the last one needed: None = all, an int n = the last n, a sequence =
    those blocks (negative indices count from the end).

    Raises:
        ValueError: an index outside the model's blocks.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"fastvit: asked for the last {indices} blocks of a {num_blocks}-block model")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            j = num_blocks + i if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ValueError(f"fastvit: block index {i} is out of range for a {num_blocks}-block model")
            take.append(j)
    return take, max(take)


class VisionTransformer(TimmCfgMixin, nn.Module):
    """timm's ``VisionTransformer`` on fastvit layers (same constructor arguments where supported,
    same attributes, module tree and state-dict keys).

    Args:
        img_size: input resolution the position table is built for.
        patch_size: square patch side.
        in_chans: image channels.
        num_classes: classifier outputs; 0 = no head (``forward`` returns pooled features).
        global_pool: "token" (class token), "avg", "avgmax", "max" (over patch tokens) or "" (no pooling).
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on the qkv projections.
        qk_norm: LayerNorm on q and k per head.
        proj_bias: bias on the attention output projections and MLPs.
        init_values: LayerScale init (None: no LayerScale).
        class_token: prepend a class token.
        no_embed_class: the position table covers the patch tokens only (DeiT III / big_vision layout).
        reg_tokens: number of register tokens after the class token.
        pre_norm: LayerNorm after the embedding (CLIP); the patch conv then has no bias.
        final_norm: LayerNorm after the blocks (off: Identity).
        fc_norm: LayerNorm after pooling instead of before; None = on for the avg/max pools.
        dynamic_img_size: accept any input size, resampling the position table per forward.
        dynamic_img_pad: zero-pad inputs to a multiple of the patch.
        drop_rate: dropout before the head (training only).
        pos_drop_rate: dropout after the position embedding (training only).
        proj_drop_rate: dropout after attention / MLP projections (training only).
        attn_drop_rate: dropout on attention probabilities (training only).
        drop_path_rate: stochastic depth, linearly increasing over the blocks to this value.
        weight_init: "" (timm's init) or "skip" (leave the freshly constructed values).
        embed_layer: image -> tokens module class (PatchEmbed; the hybrid passes its ResNet embed).
        norm_layer: norm class (default fastvit LayerNorm, eps 1e-6).
        act_layer: MLP activation ("gelu" default; see :class:`fastvit.layers.Mlp`).
        block_fn: block class.
        mlp_layer: MLP class.
        pos_embed: "learn" (a learned table) or "none".
        pos_embed_interp: how the position table is resampled for new grids (dynamic_img_size and
            set_input_size): "timm" (bicubic, antialias), "npz" (bilinear), "mmseg" / "mmpretrain"
            (bicubic, no antialias). Checkpoint loaders set it to their source's convention.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        act_layer: Union[str, Callable[[], nn.Module], None] = None,
        block_fn: Callable[..., nn.Module] = Block,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        pos_embed: str = "learn",
        pos_embed_interp: str = "timm",
    ):
        super().__init__()
        check_model_args(
            type(self).__name__, img_size=img_size, patch_size=patch_size, heads=(embed_dim, num_heads),
            positive=dict(in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads),
            non_negative=dict(num_classes=num_classes, depth=depth, reg_tokens=reg_tokens),
            ratios=dict(mlp_ratio=mlp_ratio),
            rates=dict(drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                       attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate),
        )  # fmt: skip
        if global_pool not in _POOL_TYPES:
            raise ValueError(f"fastvit: global_pool {global_pool!r} is not supported; expected one of {_POOL_TYPES}")
        if global_pool == "token" and not class_token:
            raise ValueError(
                "fastvit: global_pool='token' needs class_token=True; use global_pool='avg' without a class token"
            )
        if pos_embed not in ("", "none", "learn"):
            raise ValueError(f"fastvit: pos_embed must be 'learn' or 'none', got {pos_embed!r}")
        if pos_embed_interp not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(
                f"fastvit: pos_embed_interp must be one of {sorted(POS_EMBED_INTERPOLATIONS)}, got {pos_embed_interp!r}"
            )
        if weight_init not in ("", "skip"):
            raise ValueError(
                f"fastvit: weight_init {weight_init!r} is not supported; use '' (timm's default) or 'skip'"
            )
        norm_layer = norm_layer or LayerNorm
        act_layer = act_layer or "gelu"
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_interp = pos_embed_interp
        self.grad_checkpointing = False

        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=not pre_norm,
            strict_img_size=not dynamic_img_size, dynamic_img_pad=dynamic_img_pad,
        )  # fmt: skip
        num_patches = self.patch_embed.num_patches
        if num_patches < 1:
            raise ValueError(
                f"{type(self).__name__}: img_size {img_size!r} gives no patch token (grid "
                f"{tuple(self.patch_embed.grid_size)}): use a larger image"
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02) if pos_embed == "learn" else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.Sequential(*[
            block_fn(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                proj_bias=proj_bias, init_values=init_values, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer, mlp_layer=mlp_layer,
            )
            for i in range(depth)
        ])  # fmt: skip
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg: dict[str, Any] = {}

        if weight_init != "skip":
            self.init_weights()

    # ------------------------------------------------------------------------------- timm metadata

    @property
    def in_chans(self) -> int:
        """Image channels (timm's model trait)."""
        return self.patch_embed.in_chans

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info``: one entry per block (module path, channels, reduction in pixels), the levels
        ``forward_intermediates`` and ``create_model(..., features_only=True)`` return."""
        reduction = self.patch_embed.img_size[0] // max(self.patch_embed.grid_size[0], 1)
        depth = len(self.blocks)
        return [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=reduction) for i in range(depth)]

    # ------------------------------------------------------------------------------- parameters

    def init_weights(self) -> None:
        """timm's default init: truncated-normal(0.02) tables and Linear weights, zero biases, tiny
        class/register tokens."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's optimizer factory exempts from weight decay."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the head with a fresh ``num_classes`` Linear (0: none), optionally changing the pooling.

        Raises:
            ValueError: an unsupported pool, or "token" on a model without a class token.
        """
        check_model_args("reset_classifier", non_negative=dict(num_classes=num_classes))
        if global_pool is not None:
            if global_pool not in _POOL_TYPES:
                raise ValueError(
                    f"fastvit: global_pool {global_pool!r} is not supported; expected one of {_POOL_TYPES}"
                )
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("fastvit: global_pool='token' needs a class token; this model has none")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.patch_embed.proj.weight.device
        dtype = self.patch_embed.proj.weight.dtype
        self.head = (
            Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
        )
        self.head.train(self.training)

    def set_input_size(
        self, img_size: Optional[Union[int, tuple[int, int]]] = None, patch_size: Optional[int] = None
    ) -> None:
        """Rebuilds the model for a new input resolution, resampling the position table with
        ``self.pos_embed_interp`` (timm: bicubic + antialias).

        Args:
            img_size: new (H, W) or side; None keeps the current one.
            patch_size: must equal the current patch size (re-patching is not supported).

        Raises:
            ValueError: a different patch size, or a size giving no token. Everything is checked and computed
                before anything changes: a refused size leaves the model as it was.
        """
        if patch_size is not None and to_2tuple(patch_size) != to_2tuple(self.patch_embed.patch_size):
            raise ValueError(
                "fastvit: set_input_size cannot change the patch size "
                f"({self.patch_embed.patch_size} -> {patch_size}); only the image size can change"
            )
        if img_size is None:
            return
        size = image_size("set_input_size", img_size)
        old_grid, new_grid = self.patch_embed.grid_size, tuple(self.patch_embed.feat_size(size))
        if min(new_grid) < 1:
            raise ValueError(
                f"fastvit: set_input_size({img_size!r}) gives a {new_grid} token grid: the image is too small"
            )
        new = None
        if self.pos_embed is not None and new_grid != tuple(old_grid):
            with torch.no_grad():
                new = resample_abs_pos_embed(
                    self.pos_embed, new_grid, old_grid, self._pos_prefix_rows(), self.pos_embed_interp
                )
        self.patch_embed.set_input_size(size)
        if new is not None:
            self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)
        if "input_size" in self.pretrained_cfg:
            self.pretrained_cfg = dict(
                self.pretrained_cfg, input_size=(self.patch_embed.in_chans, *self.patch_embed.img_size)
            )

    # ---------------------------------------------------------------------------------- forward

    def _pos_prefix_rows(self) -> int:
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def pos_embed_for_grid(self, grid_hw: tuple[int, int]) -> Tensor:
        """The position table for an (h, w) token grid: ``pos_embed`` itself for the grid it is built
        for, else its resampling with ``pos_embed_interp`` (prefix rows kept), as ``dynamic_img_size``
        forwards use it.

        Args:
            grid_hw: the token grid (h, w), ``patch_embed.feat_size((H, W))`` for an H x W image.

        Returns:
            (1, P + h*w, D), or (1, h*w, D) with ``no_embed_class``; differentiable with respect to ``pos_embed``.

        Raises:
            ValueError: the model has no position table (``pos_embed="none"``).
        """
        if self.pos_embed is None:
            raise ValueError("fastvit: this model has no position table (built with pos_embed='none')")
        return resample_abs_pos_embed(
            self.pos_embed, grid_hw, self.patch_embed.grid_size, self._pos_prefix_rows(), self.pos_embed_interp
        )

    def _prefix_params(self) -> list[Tensor]:
        return [t for t in (self.cls_token, self.reg_token) if t is not None]

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Image -> (B, P + N, D) tokens (prefix + position embedding included) and the token grid."""
        grid = self.patch_embed.check_input(x)
        pos_embed = self.pos_embed
        if pos_embed is not None and self.dynamic_img_size:
            pos_embed = self.pos_embed_for_grid(grid)
        prefix = self._prefix_params()
        prefix_tokens = torch.cat(prefix, dim=1) if len(prefix) > 1 else (prefix[0] if prefix else None)
        x = self.patch_embed(x, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
        return self.norm_pre(self.pos_drop(x)), grid

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, P + N, D) normalised tokens (prefix tokens first)."""
        x, _ = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        """(B, P + N, D) -> (B, D) by ``pool_type`` (default ``self.global_pool``); "" returns x."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens -> logits (or, with ``pre_logits``, the pooled features the head reads)."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits (no softmax)."""
        return self.forward_head(self.forward_features(x))

    def extract_feat(self, x: Tensor, stage: str = "backbone") -> Union[tuple[Tensor, ...], Tensor]:
        """mmpretrain's ``ImageClassifier.extract_feat``.

        Args:
            x: (B, C, H, W) images.
            stage: "backbone" (or "neck", mmpretrain's default, the same here: no neck) -> a 1-tuple with
                the backbone's pooled output (B, D) (the final-norm class token for token-pool models,
                mmpretrain's ``out_type='cls_token'``); "pre_logits" -> the (B, D) tensor the head reads
                (``forward_head(..., pre_logits=True)``).

        Raises:
            ValueError: another stage.
        """
        if stage not in ("backbone", "neck", "pre_logits"):
            raise ValueError(f"fastvit: extract_feat stage must be 'backbone', 'neck' or 'pre_logits', got {stage!r}")
        feats = self.forward_features(x)
        if stage == "pre_logits":
            return self.forward_head(feats, pre_logits=True)
        return (self.pool(feats),)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> Union[list[Any], tuple[Tensor, list[Any]], dict[str, Any]]:
        """timm's ``forward_intermediates``: block outputs as NCHW maps or NLC tokens.

        Args:
            x: (B, C, H, W) images.
            indices: None = every block, n = the last n blocks, a sequence = those block indices.
            return_prefix_tokens: pair each intermediate with its prefix tokens (B, P, D).
            norm: apply the final norm to the intermediates.
            stop_early: skip the blocks after the last requested one (only with intermediates_only).
            output_fmt: "NCHW" (B, D, h, w) maps or "NLC" (B, N, D) patch tokens.
            intermediates_only: return only the list.
            output_dict: return {"image_intermediates", ["image_intermediates_prefix"], ["image_features"]}.

        Returns:
            ``(final normalised tokens, intermediates)``, the list alone, or the dict.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"fastvit: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, (h, w) = self._embed(x)
        blocks = self.blocks[: last + 1] if stop_early and intermediates_only else self.blocks
        feats = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x)
            if i in take:
                feats.append(self.norm(x) if norm else x)
        P = self.num_prefix_tokens
        prefixes = [y[:, :P] for y in feats] if P else None
        feats = [y[:, P:] for y in feats]
        if output_fmt == "NCHW":
            feats = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in feats]
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": feats}
            if return_prefix_tokens and prefixes is not None:
                out["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefixes is not None:
            feats = list(zip(feats, prefixes))
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
    ) -> list[Any]:
        """DINO-style ``get_intermediate_layers``: the last ``n`` (or the listed) block outputs, as
        NCHW maps when ``reshape`` else NLC patch tokens."""
        return self.forward_intermediates(
            x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
            output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
        )  # fmt: skip

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drops the blocks after the last of ``indices`` (and optionally the final norm / head)."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def attention_maps(self, x: Tensor) -> list[Tensor]:
        """Runs ``forward`` on the explicit attention path and returns every block's softmax
        probabilities (B, H, N, N), detached, in block order (for attention rollout, §5.4 of the seeds).
        The model's fused setting is restored afterwards."""
        attns = [m for m in self.modules() if isinstance(m, Attention)]
        saved = [m.fused_attn for m in attns]
        try:
            for m in attns:
                m.fused_attn = False
            self.forward(x)
            return [m.last_attn for m in attns]
        finally:
            for m, fused in zip(attns, saved):
                m.fused_attn = fused
                m.last_attn = None


class VisionTransformerDistilled(VisionTransformer):
    """DeiT with a distillation token (``dist_token``, ``head_dist``; position table N + 2 rows).

    ``forward`` averages the two heads, except in training with ``distilled_training`` set, where it
    returns ``(head(cls), head_dist(dist))`` for the distillation loss.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        weight_init = kwargs.pop("weight_init", "")
        super().__init__(*args, weight_init="skip", **kwargs)
        if self.global_pool != "token":
            raise ValueError(
                "fastvit: the distilled head reads the class and distillation tokens; use global_pool='token'"
            )
        if self.num_reg_tokens:
            raise ValueError("fastvit: register tokens are not supported with the distillation token")
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        if self.pos_embed is not None:
            embed_len = self.patch_embed.num_patches + (0 if self.no_embed_class else 2)
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, self.embed_dim))
        self.head_dist = Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False
        if weight_init != "skip":
            self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        super().init_weights()

    def _prefix_params(self) -> list[Tensor]:
        return [self.cls_token, self.dist_token]

    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return both heads' logits in training (for the distillation loss)."""
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "", "token"):
            raise ValueError(
                "fastvit: the distilled head reads the class and distillation tokens; global_pool must stay 'token'"
            )
        super().reset_classifier(num_classes)
        device, dtype = self.dist_token.device, self.dist_token.dtype
        self.head_dist = (
            Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()
        )
        self.head_dist.train(self.training)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return x, x_dist
        return (x + x_dist) / 2

    def extract_feat(self, x: Tensor, stage: str = "backbone") -> Union[tuple[Tensor, ...], Tensor]:
        """As :meth:`VisionTransformer.extract_feat`; "backbone" gives ``((cls, dist),)`` like
        mmpretrain's ``DistilledVisionTransformer``."""
        if stage == "backbone":
            feats = self.forward_features(x)
            return ((feats[:, 0], feats[:, 1]),)
        return super().extract_feat(x, stage)


# ------------------------------------------------------------------------------------- registry


def _create(cls: type, cfg: dict[str, Any], model_args: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    # Like timm, the default head size is that of the architecture's default weights (0 for the
    # in21k feature extractors such as vit_huge_patch14_224.orig_in21k).
    kwargs.setdefault("num_classes", cfg["num_classes"])
    model = cls(**{**model_args, **kwargs})
    model.pretrained_cfg = dict(cfg, input_size=(model.patch_embed.in_chans, *model.patch_embed.img_size))
    return model


def _vit_entry(name: str, cfg: dict[str, Any], cls: type = VisionTransformer, **model_args: Any) -> None:
    doc = f"``{name}``: {', '.join(f'{k}={v}' for k, v in model_args.items())} (timm's configuration)."
    register_variant(name, functools.partial(_create, cls, cfg, model_args), doc, __name__)


_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_HUGE = dict(embed_dim=1280, depth=32, num_heads=16)

# ViT-Ti/S/B/L/H at patch 14/16/32 and 224/384: every such name timm 1.0.31 registers.
for _name, _shape, _patch, _img, _tag, _classes in (
    ("vit_tiny_patch16_224", _TINY, 16, 224, "augreg_in21k_ft_in1k", 1000),
    ("vit_tiny_patch16_384", _TINY, 16, 384, "augreg_in21k_ft_in1k", 1000),
    ("vit_small_patch16_224", _SMALL, 16, 224, "augreg_in21k_ft_in1k", 1000),
    ("vit_small_patch16_384", _SMALL, 16, 384, "augreg_in21k_ft_in1k", 1000),
    ("vit_small_patch32_224", _SMALL, 32, 224, "augreg_in21k_ft_in1k", 1000),
    ("vit_small_patch32_384", _SMALL, 32, 384, "augreg_in21k_ft_in1k", 1000),
    ("vit_base_patch16_224", _BASE, 16, 224, "augreg2_in21k_ft_in1k", 1000),
    ("vit_base_patch16_384", _BASE, 16, 384, "augreg_in21k_ft_in1k", 1000),
    ("vit_base_patch32_224", _BASE, 32, 224, "augreg_in21k_ft_in1k", 1000),
    ("vit_base_patch32_384", _BASE, 32, 384, "augreg_in21k_ft_in1k", 1000),
    ("vit_large_patch14_224", _LARGE, 14, 224, "untrained", 1000),
    ("vit_large_patch16_224", _LARGE, 16, 224, "augreg_in21k_ft_in1k", 1000),
    ("vit_large_patch16_384", _LARGE, 16, 384, "augreg_in21k_ft_in1k", 1000),
    ("vit_large_patch32_224", _LARGE, 32, 224, "orig_in21k", 0),
    ("vit_large_patch32_384", _LARGE, 32, 384, "orig_in21k_ft_in1k", 1000),
    ("vit_huge_patch14_224", _HUGE, 14, 224, "orig_in21k", 0),
):
    _vit_entry(_name, _cfg(_tag, _img, _classes), patch_size=_patch, img_size=_img, **_shape)

_MIIL_CFG = _cfg("in21k", 224, 11221, norm=dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
_vit_entry(
    "vit_base_patch16_224_miil",
    _MIIL_CFG | dict(crop_pct=0.875, interpolation="bilinear"),
    patch_size=16,
    img_size=224,
    qkv_bias=False,
    **_BASE,
)

# DeiT (facebookresearch/deit weights; ImageNet mean/std).
for _name, _shape, _img, _cls in (
    ("deit_tiny_patch16_224", _TINY, 224, VisionTransformer),
    ("deit_small_patch16_224", _SMALL, 224, VisionTransformer),
    ("deit_base_patch16_224", _BASE, 224, VisionTransformer),
    ("deit_base_patch16_384", _BASE, 384, VisionTransformer),
    ("deit_tiny_distilled_patch16_224", _TINY, 224, VisionTransformerDistilled),
    ("deit_small_distilled_patch16_224", _SMALL, 224, VisionTransformerDistilled),
    ("deit_base_distilled_patch16_224", _BASE, 224, VisionTransformerDistilled),
    ("deit_base_distilled_patch16_384", _BASE, 384, VisionTransformerDistilled),
):
    _extra = dict(classifier=("head", "head_dist")) if _cls is VisionTransformerDistilled else {}
    _vit_entry(
        _name, _cfg("fb_in1k", _img, 1000, norm=_IMAGENET) | _extra, cls=_cls, patch_size=16, img_size=_img, **_shape
    )

del _name, _shape, _patch, _img, _tag, _classes, _cls, _extra

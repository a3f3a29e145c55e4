"""The ViT backbone in mmseg's layout: fastvit's VisionTransformer with mmseg's state-dict keys,
multi-level (B, D, h, w) outputs and a position table resampled (and cached) per token grid."""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastvit.checkpoints import mmseg
from fastvit.layers import LayerNorm
from fastvit.models.segmentation._common import _POS_CACHE_SIZE, Features, _is_compiling
from fastvit.models.vit import VisionTransformer

# --------------------------------------------------------------------------------------- backbone


def _to_mmseg_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict hook: this backbone's timm-named entries -> mmseg's names, in place, order kept."""
    items = list(state_dict.items())
    ours = {k[len(prefix) :]: v for k, v in items if k.startswith(prefix)}
    renamed = iter(mmseg.timm_to_mmseg(ours).items())
    for k, _ in items:
        del state_dict[k]
    done = False
    for k, v in items:
        if not k.startswith(prefix):
            state_dict[k] = v
        elif not done:  # the backbone's entries are contiguous: emit them all at the first one
            for new_key, new_value in renamed:
                state_dict[prefix + new_key] = new_value
            done = True


def _from_mmseg_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: mmseg's backbone names -> timm's, in place. timm-named keys match no
    rule and pass unchanged, so both layouts load."""
    ours = [k for k in state_dict if k.startswith(prefix)]
    sub = {k[len(prefix) :]: state_dict.pop(k) for k in ours}
    for k, v in mmseg.mmseg_to_timm(sub).items():
        state_dict[prefix + k] = v


class ViTBackbone(VisionTransformer):
    """mmseg's ``VisionTransformer`` backbone on fastvit layers: the outputs of ``out_indices`` blocks as
    (B, D, h, w) maps, state dict in mmseg's layout.

    Args:
        img_size: the grid the position table is stored for (512 for UPerNet, 224 for DPT).
        patch_size: patch side (16).
        in_chans: image channels.
        embed_dim: D.
        depth: blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width / D.
        qkv_bias: bias on the qkv projection.
        out_indices: blocks whose outputs are returned (negative counts from the end).
        final_norm: LayerNorm (mmseg ``ln1``) on the last block's output (the "+ LN" rows).
        with_cls_token: keep the class token through the blocks (mmseg's default); False drops it
            after the position embedding.
        output_cls_token: return ``(map, cls token)`` per level (DPT's readout).
        norm_eps: LayerNorm eps (1e-6 in the UPerNet configs, mmcv's default 1e-5 for DPT).
        drop_rate: dropout after the position embedding and in attention/MLP outputs (training only).
        attn_drop_rate: dropout on attention probabilities (training only).
        drop_path_rate: stochastic depth, linear over the blocks (training only).
        patch_bias: bias on the patch projection. True matches timm weights and mmseg's model-zoo
            checkpoints (trained with mmseg 0.x); recent mmseg 1.x (1.2.2) builds its ViT with
            ``patch_bias=False`` by default, and state dicts saved from such a model have no
            ``patch_embed.projection.bias``.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 512,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        out_indices: Sequence[int] = (2, 5, 8, 11),
        final_norm: bool = False,
        with_cls_token: bool = True,
        output_cls_token: bool = False,
        norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_bias: bool = True,
    ):
        if output_cls_token and not with_cls_token:
            raise ValueError("fastvit: output_cls_token=True needs with_cls_token=True (mmseg asserts the same)")
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="",
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            final_norm=final_norm, dynamic_img_size=True, dynamic_img_pad=True, pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            norm_layer=partial(LayerNorm, eps=norm_eps), pos_embed_interp="mmseg",
        )  # fmt: skip
        indices = []
        for i in out_indices:
            j = depth + i if i < 0 else i
            if not 0 <= j < depth:
                raise ValueError(f"fastvit: out_indices entry {i} is outside the backbone's {depth} blocks")
            indices.append(j)
        self.out_indices = tuple(indices)
        if not patch_bias:
            self.patch_embed.proj.register_parameter("bias", None)
        self.has_final_norm = final_norm
        self.with_cls_token = with_cls_token
        self.output_cls_token = output_cls_token
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self._pos_cache_stamp: Optional[tuple] = None
        self._register_state_dict_hook(_to_mmseg_keys)
        self._register_load_state_dict_pre_hook(_from_mmseg_keys, with_module=True)

    # ------------------------------------------------------------------------- position table

    def pos_embed_for_grid(self, grid_hw: tuple[int, int]) -> Tensor:
        """The (1, 1 + h*w, D) position table for a token grid: the stored one, or its bicubic
        (no antialias) resampling (:meth:`VisionTransformer.pos_embed_for_grid`, mmseg's convention).
        Resamplings are cached per grid unless autograd needs them (training) or the model is being
        compiled; the cache empties itself when the table changes (an optimizer step, a load, ``.to()``).
        Entries are ordinary tensors even when made under ``inference_mode``, so a later autograd pass
        over a frozen backbone can use them."""
        base = self.patch_embed.grid_size
        pos = self.pos_embed
        if tuple(grid_hw) == tuple(base):
            return pos
        if (torch.is_grad_enabled() and pos.requires_grad) or _is_compiling():
            return super().pos_embed_for_grid(grid_hw)
        stamp = (pos.data_ptr(), pos._version, pos.dtype, pos.device, tuple(base), self.pos_embed_interp)
        if stamp != self._pos_cache_stamp:
            self._pos_cache.clear()
            self._pos_cache_stamp = stamp
        grid = (int(grid_hw[0]), int(grid_hw[1]))
        cached = self._pos_cache.pop(grid, None)  # re-inserted below: the dict's order is recency
        if cached is None:
            if len(self._pos_cache) >= _POS_CACHE_SIZE:
                self._pos_cache.pop(next(iter(self._pos_cache)))
            # inference_mode(False) re-enables grad mode: no_grad keeps the entry free of a graph to pos_embed.
            with torch.inference_mode(False), torch.no_grad():
                cached = super().pos_embed_for_grid(grid)
        self._pos_cache[grid] = cached
        return cached

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> ViTBackbone:
        self._pos_cache.clear()  # .to() / .half() / .cuda(): entries of the old table would only hold memory
        return super()._apply(fn, *args, **kwargs)

    def check_image(self, x: Tensor) -> tuple[int, int]:
        """Validates an image batch and returns its token grid (padded up to whole patches).

        Raises:
            TypeError: not a floating-point tensor.
            ValueError: not (B, C, H, W), wrong channel count, or a side shorter than one patch.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"fastvit: expected an image tensor (B, C, H, W), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"fastvit: images must be a floating-point tensor, got {x.dtype}; convert with .float() and "
                f"normalise with the model's mean/std (model.pretrained_cfg)"
            )
        grid = self.patch_embed.check_input(x)
        p = self.patch_embed.patch_size[0]
        if x.shape[-2] < p or x.shape[-1] < p:
            raise ValueError(
                f"fastvit: image size {x.shape[-2]}x{x.shape[-1]} is smaller than one {p}x{p} patch; "
                f"resize the image so both sides are at least {p} pixels"
            )
        return grid

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = self.check_image(x)
        tokens = self.patch_embed(x, pos_embed=self.pos_embed_for_grid(grid), prefix_tokens=self.cls_token)
        tokens = self.pos_drop(tokens)
        if not self.with_cls_token:
            tokens = tokens[:, 1:]
        return self.norm_pre(tokens), grid

    # ---------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Features:
        """(B, C, H, W) -> one (B, D, h, w) map per ``out_indices`` block (h, w = ceil(H/16), ceil(W/16));
        with ``output_cls_token`` each level is ``(map, cls token (B, D))``. The final norm, when on,
        applies to the last block's output only (mmseg)."""
        B = x.shape[0]
        x, (h, w) = self._embed(x)
        prefix = 1 if self.with_cls_token else 0
        last = len(self.blocks) - 1
        outs: list[Any] = []
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x)
            if i == last:
                x = self.norm(x)
            if i in self.out_indices:
                fmap = x[:, prefix:].reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()
                outs.append((fmap, x[:, 0]) if self.output_cls_token else fmap)
        return tuple(outs)

    # ------------------------------------------------------------------------------- weights

    def load_pretrained(
        self, source: Union[str, os.PathLike[str], Mapping[str, Any]], format: str = "auto"
    ) -> list[str]:
        """Loads classification weights (timm, DeiT, Google ``.npz``, mmpretrain, an mmseg backbone or
        segmentor file; anything :func:`fastvit.checkpoints.read_checkpoint` reads) into this backbone
        (:func:`fastvit.checkpoints.mmseg.load_backbone`), as mmseg's ``init_weights`` does: the position
        table is resampled bicubically to the backbone's grid, the classifier (and the final norm, or the
        patch bias, when this backbone has none) is left out; every other key must fit.

        Args:
            source: checkpoint path or an already loaded state dict.
            format: "auto" or a format name of :data:`fastvit.checkpoints.FORMATS`.

        Returns:
            The checkpoint keys deliberately left out.

        Raises:
            CheckpointError: an unreadable file, a distilled DeiT checkpoint (two prefix tokens), or keys
                that do not fit (another width / depth).
        """
        return mmseg.load_backbone(self, source, format)

"""Image -> tokens: the ViT patch embedding on ``fastvit.ops.patch_embed`` (conv as a GEMM, with the
prefix tokens prepended and the position embedding added in the same op)."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from fastvit._geometry import patch_grid, to_2tuple  # to_2tuple: re-exported, timm-style code imports it here
from fastvit.layers import fused
from fastvit.layers.fused import fx_symbolic_tracing

__all__ = ["PatchEmbed", "check_image_batch", "fx_symbolic_tracing", "to_2tuple", "traced_grid"]


def check_image_batch(x: Tensor, in_chans: int, img_size: Optional[tuple[int, int]]) -> tuple[int, int]:
    """Validates a (B, C, H, W) batch for an embedding layer and returns (H, W).

    Args:
        x: the images.
        in_chans: channels the layer takes.
        img_size: the only size accepted (strict models), or None for any size.

    Raises:
        ValueError: not 4-D, a wrong channel count or a wrong size, naming the fix.
    """
    if x.dim() != 4:
        raise ValueError(f"fastvit: expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"fastvit: the model takes {in_chans}-channel images, got {x.shape[1]} channels "
            f"(input shape {tuple(x.shape)}); build the model with in_chans={x.shape[1]} or convert the images"
        )
    H, W = x.shape[-2:]
    if img_size is not None and (H, W) != tuple(img_size):
        raise ValueError(
            f"fastvit: input size {H}x{W} does not match the model's img_size {img_size[0]}x{img_size[1]}; "
            f"resize the images, build with img_size=({H}, {W}), call model.set_input_size(({H}, {W})) or "
            f"build with dynamic_img_size=True"
        )
    return H, W


def traced_grid(embed: nn.Module, x: Tensor) -> Optional[tuple[Any, Any]]:
    """Under FX symbolic tracing, the token grid of an embedding layer without checking ``x`` (its shapes are
    proxies, so no control flow may depend on them): the built grid for strict layers, else the grid computed
    from the traced shapes. None when not tracing (the caller validates ``x``)."""
    if not fx_symbolic_tracing():
        return None
    if embed.strict_img_size:
        return embed.grid_size
    return embed.feat_size((x.shape[-2], x.shape[-1]))


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed`` (``proj`` Conv2d with kernel = stride = patch, ``norm`` Identity; same keys).

    Args:
        img_size: the input resolution the position table is built for.
        patch_size: square patch side.
        in_chans: image channels.
        embed_dim: token width D.
        bias: conv bias.
        strict_img_size: refuse any other input size (timm's default; dynamic_img_size turns it off).
        dynamic_img_pad: zero-pad right/bottom to a multiple of the patch instead of refusing.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
    ):
        super().__init__()
        ph, pw = to_2tuple(patch_size)
        if ph != pw:
            raise ValueError(f"fastvit.layers.PatchEmbed: non-square patches {(ph, pw)} are not supported")
        self.patch_size = (ph, pw)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=ph, stride=ph, bias=bias)
        self.norm = nn.Identity()
        self.set_input_size(img_size)

    def set_input_size(self, img_size: Union[int, tuple[int, int]]) -> None:
        """Sets ``img_size``, ``grid_size`` and ``num_patches`` for a new resolution (the owning model
        resamples its position table; see ``VisionTransformer.set_input_size``)."""
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid (h, w) for an (H, W) image (rounded up when padding is on)."""
        p = self.patch_size[0]
        if self.dynamic_img_pad:
            return patch_grid(img_size[0], img_size[1], p)
        return img_size[0] // p, img_size[1] // p

    def check_input(self, x: Tensor) -> tuple[int, int]:
        """Validates an image batch and returns its token grid.

        Raises:
            ValueError: not (B, C, H, W), wrong channel count, or a size the module cannot take.
        """
        grid = traced_grid(self, x)
        if grid is not None:
            return grid
        H, W = check_image_batch(x, self.in_chans, self.img_size if self.strict_img_size else None)
        p = self.patch_size[0]
        if not self.dynamic_img_pad and (H % p or W % p):
            raise ValueError(
                f"fastvit: input size {H}x{W} is not a multiple of the patch size {p}; "
                f"crop/resize the images or build with dynamic_img_pad=True"
            )
        return self.feat_size((H, W))

    def forward(self, x: Tensor, pos_embed: Optional[Tensor] = None, prefix_tokens: Optional[Tensor] = None) -> Tensor:
        """(B, C, H, W) -> (B, P + N, D): patches, with ``prefix_tokens`` (P, D) prepended and
        ``pos_embed`` (rows P + N or N, see ``fastvit.ops.patch_embed``) added in the same op."""
        self.check_input(x)
        return fused.patch_embed(self, x, pos_embed=pos_embed, prefix_tokens=prefix_tokens)

    def extra_macs(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        """The patch GEMM (a conv run through the op, so no Conv2d hook sees it).
        See :func:`fastvit.utils.count_flops`."""
        h, w = self.feat_size((input_shape[-2], input_shape[-1]))
        p = self.patch_size[0]
        return {"linear": input_shape[0] * h * w * self.embed_dim * self.in_chans * p * p}

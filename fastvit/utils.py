"""Model-level utilities: multiply-accumulate (MAC) counts in the conventions the seed tables use.

``count_flops(model, img_size)`` runs the model once on the ``meta`` device (shapes only: no memory, no
arithmetic, any model size) with forward hooks on every module, and adds up:

=============  ===========================================================================================
category       what is counted (per image)
=============  ===========================================================================================
``linear``     every ``nn.Linear`` call: tokens x in x out; every ``nn.Conv2d`` call: output positions x
               out x (in / groups) x kh x kw; plus GEMMs a module runs through an op on its own weights
               (PatchEmbed's patch GEMM, the hybrid's projection), reported by that module
``norm``       every ``nn.LayerNorm`` / ``nn.GroupNorm`` / BatchNorm call: 2 MACs per element with an affine
               (normalise + scale-and-shift; 1 without), mmcv's convention; plus norms a module fuses into
               an op (reported by that module)
``attention``  products between activations: q @ k.T and probs @ v (2 x N x N x head_dim per head), the
               performer's random-feature products, reported by the modules that compute them
=============  ===========================================================================================

Conventions returned, in GMACs:

* ``"linear_norm"`` = linear + norm: mmpretrain's convention (Linear / conv and LayerNorm only, the
  attention matmuls missed). T2T-ViT-t-14/19/24: 4.3407 / 7.7960 / 12.6881 (mmpretrain prints 4.34 /
  7.80 / 12.69).
* ``"full"`` = linear_norm + attention. T2T-ViT-t-14/19/24: 6.0954 / 9.7941 / 14.9791 (the official
  README's 6.1 / 9.8 / 15.0G); vit_base_patch16_224: 17.5714 (timm's benchmark CSV prints 17.58, which
  adds GELU and softmax). Without the LayerNorms ViT-B/16 is 17.5638, the "17.56" often quoted.

The module protocol (how a new module plugs in): a module that does work its child modules' calls do not
show (because it calls ``fastvit.ops`` on its own parameters, or multiplies activations) implements::

    def extra_macs(self, input_shape: tuple[int, ...]) -> dict[str, int]:
        # input_shape: the shape of the first positional argument of this call of forward
        return {"attention": ..., "linear": ..., "norm": ...}   # any subset, MACs for the whole batch

It is called once per forward call of the module, after the call. Children that are called as modules
(``self.qkv(x)``) are counted by their own hooks and must not be reported again.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastvit.layers.patch_embed import to_2tuple

__all__ = ["count_flops", "count_macs"]

_CATEGORIES = ("linear", "norm", "attention")


def _module_macs(module: nn.Module, x: Tensor, output: object) -> dict[str, int]:
    if isinstance(module, nn.Linear):
        return {"linear": (x.numel() // x.shape[-1]) * module.in_features * module.out_features}
    if isinstance(module, nn.Conv2d) and isinstance(output, Tensor):
        per_position = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        return {"linear": output.numel() * per_position}
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        affine = module.elementwise_affine if isinstance(module, nn.LayerNorm) else module.affine
        return {"norm": x.numel() * (2 if affine else 1)}
    if isinstance(module, _BatchNorm):
        return {"norm": x.numel() * (2 if module.affine else 1)}
    return {}


def _infer_in_chans(model: nn.Module) -> int:
    for owner in (model, getattr(model, "patch_embed", None)):
        if owner is not None and isinstance(getattr(owner, "in_chans", None), int):
            return owner.in_chans
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def count_macs(
    model: nn.Module, img_size: Union[int, tuple[int, int]] = 224, in_chans: Optional[int] = None
) -> dict[str, int]:
    """MACs of one forward pass of one image, by category (``linear``, ``norm``, ``attention``).

    Args:
        model: any image model; fastvit's modules report their fused work through ``extra_macs``.
        img_size: input side or (H, W); the model must accept it (strict-size models: their img_size).
        in_chans: image channels; None reads ``model.in_chans`` / ``model.patch_embed.in_chans``, else the
            first Conv2d's input channels, else 3.

    Returns:
        ``{"linear": int, "norm": int, "attention": int}``.

    Raises:
        ValueError: the model refuses the input (e.g. a strict img_size that differs).
    """
    H, W = to_2tuple(img_size)
    in_chans = in_chans or _infer_in_chans(model)
    totals = dict.fromkeys(_CATEGORIES, 0)

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None:
            return
        found = _module_macs(module, x, output)
        extra = getattr(module, "extra_macs", None)
        if callable(extra):
            for key, value in extra(tuple(x.shape)).items():
                if key not in totals:
                    raise ValueError(
                        f"fastvit.utils.count_macs: {type(module).__name__}.extra_macs returned unknown "
                        f"category {key!r}; use {_CATEGORIES}"
                    )
                found[key] = found.get(key, 0) + int(value)
        for key, value in found.items():
            totals[key] += value

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    training = {m: m.training for m in model.modules()}
    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    }
    try:
        model.eval()
        x = torch.empty(1, in_chans, H, W, device="meta")
        with torch.no_grad():
            torch.func.functional_call(model, meta_state, (x,))
    finally:
        for h in handles:
            h.remove()
        for m, was_training in training.items():
            m.training = was_training
    return totals


def count_flops(
    model: nn.Module, img_size: Union[int, tuple[int, int]] = 224, in_chans: Optional[int] = None
) -> dict[str, float]:
    """GMACs of one image's forward pass in two labelled conventions (see the module docstring).

    Args:
        model: the model (fastvit or plain torch modules).
        img_size: input side or (H, W).
        in_chans: image channels (None: inferred).

    Returns:
        ``{"linear_norm": GMACs, "full": GMACs}``: Linear/conv + norms (mmpretrain's convention), and that
        plus the attention matmuls. Unrounded; 1 GMAC = 1e9 multiply-accumulates (FLOPs = 2 x MACs).
    """
    macs = count_macs(model, img_size, in_chans)
    linear_norm = macs["linear"] + macs["norm"]
    return {"linear_norm": linear_norm / 1e9, "full": (linear_norm + macs["attention"]) / 1e9}

"""Patch embedding with the class token and position embedding: fastvit (per backend) vs torch
(``fastvit.ops.patch_embed_ref``: timm's PatchEmbed conv + flatten + transpose, cat the class token, + pos_embed).

Per ViT shape (image C x S x S, patch p, width D, N = (S/p)^2 patches, one class token) and dtype, including the
R50 hybrid's 1x1 projection of its 1024-channel feature map (patch 1). TFLOP/s count 2 B N K D (K = C p^2;
fwd_bwd: 2x, the weight gradient: the image needs none, as in training); GB/s the bytes that must move (read
the image and the weight, write the (B, N + 1, D) tokens) against the device copy bandwidth measured in the
same run (the issue's goal: >= 2x torch). ``fwd_bwd`` takes gradients for the weight, bias, pos_embed and
class token.

    python benchmarks/bench_patch_embed.py [--models S B B384 B32 L H R50] [--batches 1 256] [--channels-last]
"""

from __future__ import annotations

import torch
from _harness.opbench import Case, OpSpec, Option, run

from fastvit import ops

# name -> (label, input channels, input size, patch, width)
MODELS = {
    "S": ("DeiT-S/16", 3, 224, 16, 384),
    "B": ("ViT-B/16", 3, 224, 16, 768),
    "B384": ("ViT-B/16@384", 3, 384, 16, 768),
    "B32": ("ViT-B/32", 3, 224, 32, 768),
    "L": ("ViT-L/16", 3, 224, 16, 1024),
    "H": ("ViT-H/14", 3, 224, 14, 1280),
    "R50": ("R50+ViT-B/16@384 1x1 proj", 1024, 24, 1, 768),
}


def _inputs(batch, chans, size, patch, width, channels_last, device, dtype):
    n, k = (size // patch) ** 2, chans * patch * patch
    x = torch.randn(batch, chans, size, size, device=device, dtype=dtype)
    return {
        "x": x.to(memory_format=torch.channels_last) if channels_last else x,
        "weight": (torch.randn(width, chans, patch, patch, device=device) * k**-0.5).to(dtype),
        "bias": torch.randn(width, device=device, dtype=dtype),
        "cls": torch.randn(1, 1, width, device=device, dtype=dtype),
        "pos": torch.randn(1, n + 1, width, device=device, dtype=dtype),
    }


def cases(args, dtype):
    for key in args.models:
        label, chans, size, patch, width = MODELS[key]
        n, k = (size // patch) ** 2, chans * patch * patch
        for batch in args.batches:
            flops = 2 * batch * n * k * width
            nbytes = (batch * chans * size * size + width * k + batch * (n + 1) * width) * dtype.itemsize
            yield Case(
                {"model": label, "batch": batch, "patch": patch},
                lambda dev, dt, b=batch, m=MODELS[key][1:]: _inputs(b, *m, args.channels_last, dev, dt),
                flops={"fwd": flops, "fwd_bwd": 2 * flops},
                bytes={"fwd": nbytes},
                leaves=("weight", "bias", "cls", "pos"),
            )


def providers(case, t, backends):
    call = {"patch_size": case.label["patch"], "pos_embed": t["pos"], "prefix_tokens": t["cls"]}
    return {
        "torch": lambda: ops.patch_embed_ref(t["x"], t["weight"], t["bias"], **call),
        **{
            f"fastvit_{bk}": lambda bk=bk: ops.patch_embed(t["x"], t["weight"], t["bias"], **call, backend=bk)
            for bk in backends
        },
    }


SPEC = OpSpec(
    name="patch_embed",
    op="patch_embed",
    doc=__doc__,
    cases=cases,
    providers=providers,
    ceiling="copy",
    options=(
        Option(("--models",), {"nargs": "+", "default": list(MODELS), "choices": list(MODELS)}),
        Option(("--batches",), {"type": int, "nargs": "+", "default": [1, 256]}),
        Option(("--channels-last",), {"action": "store_true", "help": "feed a channels_last image"}),
    ),
)

if __name__ == "__main__":
    raise SystemExit(run(SPEC))

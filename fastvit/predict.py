"""``python -m fastvit.predict IMAGE --model NAME [--checkpoint PATH] [--topk 5]``: print the top-k classes.

Without ``--checkpoint`` the model's published weights come from the local timm / Hugging Face cache
(fastvit never downloads). ``--checkpoint`` takes a file of any format :func:`fastvit.load_checkpoint`
reads, loaded strictly (``--num-classes`` when its classifier is not 1000-way).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import numpy as np

from fastvit._cli import ArgumentParser, add_debug_flag, check_device, run_main

__all__ = ["format_table", "main"]


def format_table(result: dict[str, Any], names: Optional[Sequence[str]], topk: int) -> str:
    """The top-``topk`` rows of an :func:`fastvit.inference_model` result as an aligned text table."""
    scores = result["pred_scores"]
    order = np.argsort(-scores, kind="stable")[:topk]
    rows = [("rank", "label", "score", "class")]
    for rank, label in enumerate(order, 1):
        rows.append((str(rank), str(int(label)), f"{scores[label]:.4f}", names[label] if names else str(int(label))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(
        prog="python -m fastvit.predict", description="Classify an image and print the top-k ImageNet classes."
    )
    parser.add_argument("image", help="image file")
    parser.add_argument("--model", required=True, help="model name, e.g. vit_base_patch16_224")
    parser.add_argument(
        "--checkpoint", default=None, help="weights file (any supported format); default: the cached pretrained weights"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classifier size of --checkpoint (default: the model's)"
    )
    parser.add_argument("--topk", type=int, default=5, help="rows to print (default 5)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.topk < 1:
        parser.error("--topk must be >= 1")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(
            f"--num-classes must be >= 1 (a model without a classifier cannot classify), got {args.num_classes}"
        )

    def body() -> int:
        from fastvit.checkpoints import load_checkpoint
        from fastvit.inference import _to_image, class_names, inference_model, require_classifier
        from fastvit.models import create_model

        image = _to_image(args.image)  # a bad image fails before the model is built
        overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
        if args.checkpoint:
            model = create_model(args.model, pretrained=False, **overrides)
            require_classifier(model)
            load_checkpoint(model, args.checkpoint)
        else:
            model = create_model(args.model, pretrained=True, **overrides)
        model = model.to(args.device)
        result = inference_model(model, image)
        names = class_names(model, len(result["pred_scores"]))
        weights = args.checkpoint or "cached pretrained weights"
        print(f"{args.image}  model={args.model}  weights={weights}")
        print(format_table(result, names, min(args.topk, len(result["pred_scores"]))))
        return 0

    return run_main(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

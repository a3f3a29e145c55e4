"""The rows of the benchmark tables: every model of the seed tables, with its default batch sizes.

A row names the fastvit model and, where timm has the same architecture, the timm model; rows
where timm has nothing comparable carry the reason, which becomes the timm cells' text.
Batch sizes are per row because "a batch that fills the GPU" depends on the model: the inference
batch keeps an H100/H200 busy (thousands of tokens per GEMM) and fits easily in 80 GB in bf16; the
training batch is smaller because activations are kept for the backward.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["CPU_QUICK_BATCH", "CPU_QUICK_MODELS", "ROWS", "SUITES", "ModelRow", "select_rows"]

SUITES = ("classification", "segmentation", "all")
# The no-argument run on a machine without a GPU: the smallest ViT, and T2T-ViT (which timm lacks, so
# the table shows an "n/a" cell too). DeiT-S as a third model took the run to 3m18s on the busy 2-core
# CI machine (load 7.5), past the 3-minute budget.
CPU_QUICK_MODELS = ("deit_tiny_patch16_224", "t2t_vit_t_14")
CPU_QUICK_BATCH = 8


@dataclass(frozen=True)
class ModelRow:
    """One model of the tables.

    Args:
        key: the fastvit model name (also the timm name for the classification models).
        label: the paper's name, e.g. "ViT-B/16 @224".
        suite: "classification" or "segmentation".
        img_size: square input size in pixels.
        infer_batch: default inference batch on a GPU.
        train_batch: default training-step batch on a GPU.
        timm_name: the timm model with the same architecture, or None.
        timm_missing: why there is no timm model (the text of the timm cells) when timm_name is None.
        num_classes: classifier width; set explicitly so timm and fastvit build the same model
            (timm's in21k-only defaults would otherwise drop the head).
        model_kwargs: extra constructor arguments for both libraries (tests build reduced models).
    """

    key: str
    label: str
    suite: str
    img_size: int
    infer_batch: int
    train_batch: int
    timm_name: Optional[str] = None
    timm_missing: str = ""
    num_classes: Optional[int] = 1000
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def create_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.model_kwargs)
        if self.num_classes is not None:
            kwargs.setdefault("num_classes", self.num_classes)
        return kwargs


def _cls(key: str, label: str, img: int, infer: int, train: int) -> ModelRow:
    return ModelRow(key, label, "classification", img, infer, train, timm_name=key)


def _t2t(key: str, label: str) -> ModelRow:
    return ModelRow(key, label, "classification", 224, 256, 64, timm_missing="timm has no T2T-ViT")


def _seg(key: str, label: str) -> ModelRow:
    return ModelRow(
        key, label, "segmentation", 512, 16, 8, timm_missing="timm has no UPerNet/DPT segmentor", num_classes=None
    )


ROWS: tuple[ModelRow, ...] = (
    _cls("vit_base_patch16_224", "ViT-B/16 @224", 224, 256, 128),
    _cls("vit_base_patch16_384", "ViT-B/16 @384", 384, 64, 32),
    _cls("vit_base_patch32_224", "ViT-B/32 @224", 224, 1024, 256),
    _cls("vit_base_patch32_384", "ViT-B/32 @384", 384, 256, 128),
    _cls("vit_large_patch16_224", "ViT-L/16 @224", 224, 128, 64),
    _cls("vit_large_patch16_384", "ViT-L/16 @384", 384, 32, 16),
    _cls("vit_large_patch32_224", "ViT-L/32 @224", 224, 512, 128),
    _cls("vit_large_patch32_384", "ViT-L/32 @384", 384, 128, 64),
    _cls("vit_huge_patch14_224", "ViT-H/14 @224", 224, 64, 32),
    _cls("vit_base_r50_s16_384", "R50+ViT-B/16 @384", 384, 64, 32),
    _cls("deit_tiny_patch16_224", "DeiT-Ti @224", 224, 1024, 256),
    _cls("deit_small_patch16_224", "DeiT-S @224", 224, 512, 256),
    _cls("deit_base_patch16_224", "DeiT-B @224", 224, 256, 128),
    _t2t("t2t_vit_t_14", "T2T-ViT-t-14 @224"),
    _t2t("t2t_vit_t_19", "T2T-ViT-t-19 @224"),
    _t2t("t2t_vit_t_24", "T2T-ViT-t-24 @224"),
    # Segmentation names follow issue 7; one row per architecture (the 80k / 160k checkpoints of the
    # seed tables are the same network, so both published values stand beside one measurement).
    _seg("upernet_vit_b16_mln_512", "UPerNet ViT-B + MLN"),
    _seg("upernet_vit_b16_ln_mln_512", "UPerNet ViT-B + LN + MLN"),
    _seg("upernet_deit_s16_512", "UPerNet DeiT-S"),
    _seg("upernet_deit_s16_mln_512", "UPerNet DeiT-S + MLN"),
    _seg("upernet_deit_s16_ln_mln_512", "UPerNet DeiT-S + LN + MLN"),
    _seg("upernet_deit_b16_512", "UPerNet DeiT-B"),
    _seg("upernet_deit_b16_mln_512", "UPerNet DeiT-B + MLN"),
    _seg("upernet_deit_b16_ln_mln_512", "UPerNet DeiT-B + LN + MLN"),
    _seg("dpt_vit_b16_512", "DPT ViT-B"),
)


def select_rows(
    suite: str = "all", patterns: Optional[Sequence[str]] = None, rows: Optional[Sequence[ModelRow]] = None
) -> list[ModelRow]:
    """Rows of ``suite`` matching any of ``patterns`` (model keys or labels, shell-style wildcards).

    ``rows`` defaults to :data:`ROWS`, read at call time (tests add reduced rows to it).

    Raises:
        ValueError: an unknown suite, or a pattern that matches no row (the message lists the keys).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    pool = [r for r in (ROWS if rows is None else rows) if suite == "all" or r.suite == suite]
    if not patterns:
        return pool
    chosen: list[ModelRow] = []
    for pattern in patterns:
        hits = [r for r in pool if fnmatch.fnmatchcase(r.key, pattern) or fnmatch.fnmatchcase(r.label, pattern)]
        if not hits:
            keys = ", ".join(r.key for r in pool)
            raise ValueError(f"--models {pattern!r} matches no model of suite {suite!r}; known models: {keys}")
        chosen.extend(r for r in hits if r not in chosen)
    return chosen

"""Published numbers that ``benchmarks/run.py`` prints beside its own measurements.

Every value carries the GPU it was measured on (None for hardware-free facts such as parameter
counts and MACs), the setting, and its source, so nothing here can be mistaken for a measurement of
this run. Where ../shared/reference marks a value "(verify)" the entry says so.

Sources (see the project's reference notes for the full citations):
* MMSeg ADE20K tables: open-mmlab/mmsegmentation configs/vit/README.md and configs/dpt/README.md
  (the seed tables). Mem = peak allocated memory in training, 2 images of 512x512 per GPU, 8x V100;
  fps = batch-1 whole-image predict, fp32, 5 warm-up + 200 iterations; inference GPU not stated
  (V100 era), hence "(verify)".
* Parameter counts: reference/mission.md §1.1 / §1.3, recomputed and matching the published numbers
  (timm model cards, mmpretrain README 21.47 / 39.08 / 64.00M).
* GMACs: timm results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv ``infer_gmacs`` (attention
  matmuls included: the "full" convention); mmpretrain T2T README "Flops (G)" = Linear + LayerNorm
  MACs only (the "linear_norm" convention); official T2T-ViT README MACs (full).
* Throughput: the same timm CSV (RTX 4090, AMP fp16, batch 1024 or 768, torch 2.4 eager); DeiT paper
  Tables 1 and 5 (one V100-16GB, largest batch), marked "(verify)" in reference/performance.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

__all__ = ["PUBLISHED", "Published", "published_for"]


@dataclass(frozen=True)
class Published:
    """One published number.

    Args:
        metric: which of our values it stands beside: "params", "gmacs_full", "gmacs_linear_norm",
            "infer_img_s", "paper_mem_gib", "paper_fps".
        value: the number as published (params as an exact count, memory in GB as printed).
        gpu: the GPU it was measured on; None for hardware-free facts.
        setting: how it was measured (precision, batch, software, checkpoint schedule).
        source: where it is printed.
        verify: True where the reference notes have not re-read the number from its primary source.
    """

    metric: str
    value: float
    gpu: Optional[str]
    setting: str
    source: str
    verify: bool = False

    def label(self) -> str:
        where = f"{self.gpu}, " if self.gpu else ""
        return f"{where}{self.setting}" + (" (verify)" if self.verify else "")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_TIMM_4090 = "huggingface/pytorch-image-models: results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv"
_TIMM_4090_SETTING = "timm benchmark.py, AMP fp16, batch 1024/768, torch 2.4 eager"
_DEIT = "DeiT paper arXiv:2012.12877, Tables 1 and 5"
_DEIT_SETTING = "DeiT paper, one V100-16GB, largest batch"
_MMSEG_VIT = "open-mmlab/mmsegmentation: configs/vit/README.md (ADE20K)"
_MMSEG_DPT = "open-mmlab/mmsegmentation: configs/dpt/README.md (ADE20K)"
_MMSEG_MEM = "mmseg training, 2 img/GPU 512x512, fp32"
_MMSEG_FPS = "mmseg benchmark.py, batch 1, fp32, ADE20K val whole images"
_MISSION = "reference/mission.md §1.1 (timm model definitions; matches the model cards)"
_T2T_MISSION = "reference/mission.md §1.3 (trainable params; mmpretrain README 21.47 / 39.08 / 64.00M)"


def _classification(
    params: int,
    gmacs: Optional[float],
    img_s: Optional[float],
    extra: tuple[Published, ...] = (),
    csv_row: str = "",
) -> list[Published]:
    """``csv_row`` names the timm CSV row when it is another name for the same architecture."""
    same_shape = f" ({csv_row}, same shape)" if csv_row else ""
    out = [Published("params", params, None, "num_classes=1000", _MISSION)]
    if gmacs is not None:
        setting = "timm infer_gmacs (attention matmuls included)" + same_shape
        out.append(Published("gmacs_full", gmacs, None, setting, _TIMM_4090))
    if img_s is not None:
        out.append(Published("infer_img_s", img_s, "RTX 4090", _TIMM_4090_SETTING + same_shape, _TIMM_4090))
    return out + list(extra)


def _t2t(params: int, linear_norm: float, full: float) -> list[Published]:
    return [
        Published("params", params, None, "trainable (sinusoid pos-embed is a buffer)", _T2T_MISSION),
        Published(
            "gmacs_linear_norm",
            linear_norm,
            None,
            "mmpretrain 'Flops (G)': Linear + LayerNorm MACs only",
            "open-mmlab/mmpretrain: configs/t2t_vit/README.md",
        ),
        Published(
            "gmacs_full",
            full,
            None,
            "official README MACs (attention matmuls included)",
            "yitu-opensource/T2T-ViT: README.md",
        ),
    ]


def _segmentation(
    source: str, mem: tuple[float, ...], fps: tuple[float, ...], schedules: tuple[str, ...]
) -> list[Published]:
    out = []
    for m, f, sched in zip(mem, fps, schedules):
        out.append(Published("paper_mem_gib", m, "V100", f"{_MMSEG_MEM}, {sched} checkpoint", source))
        out.append(Published("paper_fps", f, "V100", f"{_MMSEG_FPS}, {sched} checkpoint", source, verify=True))
    return out


# Model key (= fastvit / timm model name) -> published values.
PUBLISHED: dict[str, list[Published]] = {
    "vit_base_patch16_224": _classification(86_567_656, 17.58, 2787),
    "vit_base_patch16_384": _classification(
        86_859_496, 55.54, 916, (Published("infer_img_s", 85.9, "V100", _DEIT_SETTING, _DEIT, verify=True),)
    ),
    "vit_base_patch32_224": _classification(88_224_232, 4.41, 10113),
    "vit_base_patch32_384": _classification(88_297_192, 13.06, None),
    "vit_large_patch16_224": _classification(304_326_632, 61.6, 913),
    "vit_large_patch16_384": _classification(
        304_715_752, 191.21, 297, (Published("infer_img_s", 27.3, "V100", _DEIT_SETTING, _DEIT, verify=True),)
    ),
    "vit_large_patch32_224": _classification(306_535_400, None, None),
    "vit_large_patch32_384": _classification(306_632_680, 45.31, 1197),
    "vit_huge_patch14_224": _classification(632_045_800, 167.4, 346),
    "vit_base_r50_s16_384": _classification(98_950_952, 67.43, 528),
    "deit_tiny_patch16_224": _classification(
        5_717_416, 1.26, 17674, (Published("infer_img_s", 2536, "V100", _DEIT_SETTING, _DEIT, verify=True),)
    ),
    "deit_small_patch16_224": _classification(
        22_050_664,
        4.61,
        7693,
        (Published("infer_img_s", 940, "V100", _DEIT_SETTING, _DEIT, verify=True),),
        csv_row="vit_small_patch16_224",
    ),
    "deit_base_patch16_224": _classification(
        86_567_656,
        17.58,
        2787,
        (Published("infer_img_s", 292, "V100", _DEIT_SETTING, _DEIT, verify=True),),
        csv_row="vit_base_patch16_224",
    ),
    "t2t_vit_t_14": _t2t(21_465_422, 4.34, 6.1),
    "t2t_vit_t_19": _t2t(39_084_686, 7.80, 9.8),
    "t2t_vit_t_24": _t2t(64_000_590, 12.69, 15.0),
    "upernet_vit_b16_mln_512": _segmentation(_MMSEG_VIT, (9.20, 9.20), (6.94, 7.58), ("80k", "160k")),
    "upernet_vit_b16_ln_mln_512": _segmentation(_MMSEG_VIT, (9.21,), (6.82,), ("160k",)),
    "upernet_deit_s16_512": _segmentation(_MMSEG_VIT, (4.68, 4.68), (29.85, 29.19), ("80k", "160k")),
    "upernet_deit_s16_mln_512": _segmentation(_MMSEG_VIT, (5.69,), (11.18,), ("160k",)),
    "upernet_deit_s16_ln_mln_512": _segmentation(_MMSEG_VIT, (5.69,), (12.39,), ("160k",)),
    "upernet_deit_b16_512": _segmentation(_MMSEG_VIT, (7.75, 7.75), (9.69, 10.39), ("80k", "160k")),
    "upernet_deit_b16_mln_512": _segmentation(_MMSEG_VIT, (9.21,), (7.78,), ("160k",)),
    "upernet_deit_b16_ln_mln_512": _segmentation(_MMSEG_VIT, (9.21,), (7.75,), ("160k",)),
    "dpt_vit_b16_512": _segmentation(_MMSEG_DPT, (8.09,), (10.41,), ("160k",)),
}


def published_for(model: str, metric: Optional[str] = None) -> list[Published]:
    """The published values for ``model`` (optionally one metric), possibly empty."""
    return [p for p in PUBLISHED.get(model, []) if metric is None or p.metric == metric]

"""Fine-tuning on fastvit's kernels: ``python -m fastvit.train``, from one process to many nodes.

The recipe defaults are jeonsworld/ViT-pytorch's ``train.py``: SGD with momentum 0.9, learning rate 3e-2,
warmup (100 steps) then cosine decay over 500 steps, gradient clipping at 1.0, a global batch of 512
(``--accum-steps`` splits it when memory is short), evaluation every 100 steps. Its CIFAR transforms
(RandomResizedCrop with scale (0.05, 1) for training, a plain resize for evaluation, mean = std = 0.5 as
Google's weights expect) are the default; the model's ``pretrained_cfg`` sets mean / std / interpolation.

One optimizer step (:class:`TrainStep`) is: ``accum_steps`` micro-batches of forward under autocast,
loss (cross-entropy with optional label smoothing, in fp32) divided by ``accum_steps``, backward
(through the GradScaler for fp16; gradients all-reduced by DDP / reduce-scattered by FSDP on the last
micro-batch only), unscale, clip, optimizer step, scheduler step, EMA update. ``benchmarks/run.py``
times this same object for its training columns.

Distributed runs go through torchrun (``torch.distributed`` with the ``env://`` rendezvous: NCCL on
GPUs, gloo on CPUs): the same command line runs under ``python -m fastvit.train`` and
``torchrun --nnodes N --nproc-per-node 8 -m fastvit.train``. ``--batch-size`` is the global batch; each
rank takes ``batch / (world * accum)`` samples per micro-batch from a DistributedSampler seeded per epoch,
so a step sees the same samples whatever the world size. Data augmentation is seeded per (seed, epoch,
sample), independent of workers and ranks. Rank 0 alone writes files; metrics are all-reduced.

Files (``--output``): ``last.pth`` (the model's state dict in timm's format: ``timm.create_model(...,
checkpoint_path=)`` and ``fastvit.load_checkpoint`` read it), ``last_ema.pth`` with ``--ema-decay``,
``resume.pth`` (optimizer, scheduler, scaler, EMA, step, sampler position and every rank's RNG states),
``metrics.jsonl``, ``metrics.csv`` and ``curves.png``. Every write is atomic (:mod:`fastvit.fileio`).
Ctrl-C (SIGINT) or SIGTERM stops after the current step, saves a resumable checkpoint and the curves;
a second Ctrl-C aborts at once. ``--resume DIR_OR_FILE`` continues bit for bit on CPU.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fastvit.fileio import atomic_save, atomic_write_bytes, atomic_write_text
from fastvit.kernels import release_tuple

__all__ = [
    "DatasetNotFoundError",
    "Recipe",
    "ResumeError",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "WarmupSchedule",
    "build_parser",
    "main",
    "train",
]

RESUME_FORMAT = "fastvit.train.resume/1"
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was asked for; the message names the files expected and where."""


class ResumeError(RuntimeError):
    """A resume file cannot continue this run (another model, world size or batch); the message says why."""


# --------------------------------------------------------------------------------------------- recipe


@dataclass
class Recipe:
    """How parameters are updated. Defaults are ViT-pytorch's CIFAR fine-tuning recipe.

    Args:
        optimizer: "sgd" (momentum) or "adamw".
        lr: peak learning rate, reached at the end of the warmup.
        momentum: SGD momentum.
        weight_decay: decoupled for AdamW, L2 for SGD.
        schedule: "cosine" (warmup then cosine to 0) or "linear" (warmup then linear to 0).
        warmup_steps: linear warmup from 0 to ``lr``.
        total_steps: optimizer steps of the whole run.
        clip_grad: max global gradient norm; 0 disables clipping.
        accum_steps: micro-batches per optimizer step.
        amp: "none", "bf16", "fp16" (fp16 adds a GradScaler) or "auto" (bf16 on a GPU that has it, else
            none; resolved by :meth:`for_device`).
        label_smoothing: cross-entropy label smoothing.
        ema_decay: EMA of the weights after each step; 0 disables it.
    """

    optimizer: str = "sgd"
    lr: float = 3e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 100
    total_steps: int = 500
    clip_grad: float = 1.0
    accum_steps: int = 1
    amp: str = "none"
    label_smoothing: float = 0.0
    ema_decay: float = 0.0

    def validate(self) -> None:
        problems = []
        if self.optimizer not in ("sgd", "adamw"):
            problems.append(f"optimizer {self.optimizer!r} is not one of 'sgd', 'adamw'")
        if self.schedule not in ("cosine", "linear"):
            problems.append(f"schedule {self.schedule!r} is not one of 'cosine', 'linear'")
        if self.amp not in ("auto", "none", *AMP_DTYPES):
            problems.append(f"amp {self.amp!r} is not one of 'auto', 'none', 'bf16', 'fp16'")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.total_steps < 1:
            problems.append(f"steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            problems.append(f"warmup steps must be in [0, steps={self.total_steps}), got {self.warmup_steps}")
        if self.accum_steps < 1:
            problems.append(f"accum steps must be >= 1, got {self.accum_steps}")
        if self.clip_grad < 0:
            problems.append(f"clip grad must be >= 0 (0 disables it), got {self.clip_grad}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}")
        if problems:
            raise ValueError("fastvit.train: bad recipe: " + "; ".join(problems))

    def for_device(self, device: torch.device) -> Recipe:
        """This recipe with ``amp="auto"`` resolved for ``device``."""
        if self.amp != "auto":
            return self
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return dataclasses.replace(self, amp="bf16" if bf16 else "none")

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES.get(self.amp)


class WarmupSchedule:
    """ViT-pytorch's WarmupCosineSchedule / WarmupLinearSchedule as a LambdaLR factor of the step."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        self.kind, self.warmup, self.total = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(recipe.schedule, recipe.warmup_steps, recipe.total_steps)
    )


class ModelEma:
    """Exponential moving average of a model's parameters (buffers copied), kept in fp32 beside it."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = list(self.module.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


@contextlib.contextmanager
def _grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """DDP's no_sync / FSDP2's set_requires_gradient_sync for all but the last micro-batch."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@dataclass
class StepStats:
    loss: torch.Tensor  # the step's mean loss on this rank (a 0-d tensor: no host sync)
    grad_norm: Optional[torch.Tensor]
    skipped: bool = False  # fp16: the GradScaler found inf/NaN gradients and skipped the update


class TrainStep:
    """One optimizer step of the recipe: the object ``fastvit.train`` runs and the benchmark times.

    Args:
        model: the module whose parameters are trained (DDP / FSDP wrapped when distributed).
        recipe: the recipe (AMP, clipping, accumulation, label smoothing).
        device: where the step runs (autocast and GradScaler device type).
        optimizer: built from the recipe when None.
        scheduler: built from the recipe when None; stepped after every optimizer step.
        forward: the callable run on inputs (e.g. a torch.compile'd model); default ``model``.
        loss_fn: ``loss_fn(x, y) -> loss`` replacing cross-entropy on ``forward(x)`` (segmentors).
        ema: updated from ``ema_source`` (default ``model``) after each step.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        device: torch.device,
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
        forward: Optional[Callable[..., Any]] = None,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        ema: Optional[ModelEma] = None,
        ema_source: Optional[nn.Module] = None,
    ):
        recipe.validate()
        recipe = recipe.for_device(device)
        self.model, self.recipe, self.device = model, recipe, device
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, recipe)
        self.scheduler = scheduler if scheduler is not None else build_scheduler(self.optimizer, recipe)
        self.forward = forward if forward is not None else model
        self.loss_fn = loss_fn if loss_fn is not None else self._cross_entropy
        self.scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp == "fp16")
        self.ema, self.ema_source = ema, ema_source if ema_source is not None else model
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _cross_entropy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.forward(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return F.cross_entropy(logits.float(), y, label_smoothing=self.recipe.label_smoothing)

    def __call__(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        n = len(micro_batches)
        dtype = self.recipe.amp_dtype
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            with _grad_sync(self.model, i == n - 1):
                with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                    loss = self.loss_fn(x, y) / n
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.recipe.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.recipe.clip_grad)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = scale is not None and self.scaler.get_scale() < scale  # fp16 overflow: no update this step
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # the schedule follows steps taken, also when the GradScaler skipped an overflowing one
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        if self.ema is not None and not skipped:
            self.ema.update(self.ema_source)
        return StepStats(total, grad_norm, skipped)


# ------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a run is made of; the command line fills it (``python -m fastvit.train --help``)."""

    model: Optional[str] = None
    timm: Optional[str] = None
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = None
    head_init: str = "zero"
    dataset: str = "cifar10"
    data_dir: str = "data"
    img_size: Optional[int] = None
    num_classes: Optional[int] = None
    synthetic_samples: int = 2048
    batch_size: int = 512
    eval_batch_size: Optional[int] = None
    recipe: Recipe = field(default_factory=lambda: Recipe(amp="auto"))
    drop_path: Optional[float] = None
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 42
    eval_every: int = 100
    save_every: Optional[int] = None
    log_every: int = 10
    workers: int = 4
    device: Optional[str] = None
    output: Optional[str] = None
    resume: Optional[str] = None
    progress: bool = True

    def model_id(self) -> dict[str, Any]:
        """What a resume file must match: which model, built how."""
        return {
            "library": "timm" if self.timm else "fastvit",
            "name": self.timm or self.model,
            "model_args": dict(sorted(self.model_args.items())),
            "img_size": self.img_size,
            "num_classes": self.num_classes,
            "dataset": self.dataset,
        }


@dataclass
class TrainResult:
    """What a run ended with."""

    step: int
    interrupted: bool
    metrics: dict[str, float]
    output: Optional[Path]
    records: list[dict[str, Any]]


# ----------------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _init_distributed(device_arg: Optional[str]) -> tuple[DistContext, bool]:
    """The process group from torchrun's environment (env:// rendezvous); (context, whether we created it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("fastvit.train: --device cuda asked for, but torch sees no GPU; use --device cpu")
    device = torch.device(f"cuda:{local}" if kind == "cuda" else kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return DistContext(rank, world, local, device), created


def _all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ------------------------------------------------------------------------------------------ models


def _parse_model_args(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"--model-args wants key=value[,key=value], got {part!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def build_model(cfg: TrainConfig, num_classes: int, log: Callable[[str], None]) -> nn.Module:
    """The model of ``cfg`` with a ``num_classes`` head at ``cfg.img_size``; ``--pretrained`` weights loaded
    (position embeddings resampled, the classifier kept fresh when its size differs) and reported."""
    import fastvit

    kwargs = dict(cfg.model_args)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.timm:
        import timm

        model = timm.create_model(cfg.timm, pretrained=False, num_classes=num_classes, **kwargs)
        report = fastvit.patch_model(model)
        log(f"timm {cfg.timm}: {report}" if report.skipped else f"timm {cfg.timm}: {str(report).splitlines()[0]}")
    else:
        model = fastvit.create_model(cfg.model, pretrained=False, num_classes=num_classes, **kwargs)
    if cfg.pretrained:
        result = fastvit.load_checkpoint(model, cfg.pretrained, adapt_classifier=True)
        what = [f"loaded {cfg.pretrained} ({result.format})"]
        if result.resampled_pos_embed:
            what.append(f"position embedding resampled to {_input_size(model)}")
        if result.reset_classifier_keys:
            if cfg.head_init == "zero":  # ViT-pytorch's zero_head=True
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for k in result.reset_classifier_keys:
                        params[k].zero_()
            init = "zero-initialised as ViT-pytorch's zero_head" if cfg.head_init == "zero" else "fresh random init"
            what.append(
                f"classifier reset to {num_classes} classes ({init}): {', '.join(result.reset_classifier_keys)}"
            )
        if result.ignored_keys:
            what.append(f"ignored from the file: {', '.join(result.ignored_keys[:6])}")
        log("; ".join(what))
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"fastvit.train: {type(model).__name__} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    return model


def _input_size(model: nn.Module) -> int:
    """The side the model is built for: its patch embedding's (timm keeps pretrained_cfg at the default)."""
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is None:
        img = ((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (None,))[-1]
    if img is None:
        raise ValueError("fastvit.train: cannot tell the model's input size; pass --img-size")
    return int(img[-1] if isinstance(img, (tuple, list)) else img)


def _preprocessing(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean") or (0.5, 0.5, 0.5))
    std = tuple(cfg.get("std") or (0.5, 0.5, 0.5))
    return mean, std, str(cfg.get("interpolation") or "bilinear")


# -------------------------------------------------------------------------------------------- data


class SyntheticTask(Dataset):
    """A task only attention solves: noise images with one marker square (a fixed random pattern per
    class) at a random cell of a 4x4 grid; the label is the marker's class. A class-token ViT must find
    the marker through attention. Deterministic per index; already normalised tensors."""

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int, split: str):
        if img_size < 4:
            raise ValueError(f"fastvit.train: synthetic images need img_size >= 4, got {img_size}")
        self.n, self.k, self.size = num_samples, num_classes, img_size
        self.cell = img_size // 4
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, self.cell, self.cell, generator=g).sign()
        self.seed = seed * 2 + (1 if split == "eval" else 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(self.k, (), generator=g))
        cell = int(torch.randint(16, (), generator=g))
        img = 0.3 * torch.randn(3, self.size, self.size, generator=g)
        r, c = (cell // 4) * self.cell, (cell % 4) * self.cell
        img[:, r : r + self.cell, c : c + self.cell] = self.patterns[label]
        return img, label


class EpochSeeded(Dataset):
    """Runs the wrapped dataset's random transforms from a generator seeded by (seed, epoch, index), so
    augmentation does not depend on workers, ranks or where a resumed run starts."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            return self.dataset[i]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (``skip`` samples of this rank's share)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        it = super().__iter__()
        for _ in range(self.skip):
            next(it)
        return it

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EvalShard(Dataset):
    """This rank's share of the eval set, ``rank::world``, padded to the same length on every rank (FSDP
    runs collectives in each forward); padding items repeat sample 0 and come with ``valid=False``."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.dataset, self.world, self.rank = dataset, num_replicas, rank
        self.n = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __getitem__(self, j: int) -> tuple[Any, Any, bool]:
        i = self.rank + j * self.world
        x, y = self.dataset[i if i < self.n else 0]
        return x, y, i < self.n


def _cifar_root(name: str, data_dir: Path) -> Path:
    folder, files = CIFAR_FILES[name]
    root = data_dir.parent if data_dir.name == folder else data_dir
    missing = [f for f in files if not (root / folder / f).is_file()]
    if missing:
        label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
        raise DatasetNotFoundError(
            f"fastvit.train: {label} not found: expected torchvision's on-disk format, {root / folder}/ holding "
            f"{', '.join(files)} (missing: {', '.join(missing)}). fastvit.train never downloads: extract "
            f"{CIFAR_URLS[name]} into {root} (tar xzf), or point --data-dir at the folder that holds {folder}/."
        )
    return root


def _imagefolder_split(data_dir: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (data_dir / n).is_dir():
            return data_dir / n
    raise DatasetNotFoundError(
        f"fastvit.train: ImageFolder tree not found: expected {data_dir}/{names[0]}/<class>/<image> "
        f"(or {' / '.join(str(data_dir / n) for n in names[1:])}); none of these folders exists"
    )


def build_datasets(cfg: TrainConfig, model_img_size: int, mean: Any, std: Any, interp: str) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets; train yields through :class:`EpochSeeded`."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"fastvit.train: --dataset {cfg.dataset!r} is not one of {', '.join(DATASETS)}")
    size = cfg.img_size or model_img_size
    if cfg.dataset == "synthetic":
        k = cfg.num_classes or 10
        return (
            SyntheticTask(cfg.synthetic_samples, k, size, cfg.seed, "train"),
            SyntheticTask(max(cfg.synthetic_samples // 4, 1), k, size, cfg.seed, "eval"),
        )
    import torchvision
    from torchvision import transforms as T

    mode = T.InterpolationMode(interp) if interp in {m.value for m in T.InterpolationMode} else None
    kw = {"interpolation": mode} if mode else {}
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([T.RandomResizedCrop((size, size), scale=(0.05, 1.0), **kw), *norm])
    eval_tf = T.Compose([T.Resize((size, size), **kw), *norm])
    data_dir = Path(cfg.data_dir).expanduser()
    if cfg.dataset in CIFAR_FILES:
        root = _cifar_root(cfg.dataset, data_dir)
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        return (
            cls(str(root), train=True, transform=train_tf, download=False),
            cls(str(root), train=False, transform=eval_tf, download=False),
        )
    train_dir = _imagefolder_split(data_dir, ("train",))
    eval_dir = _imagefolder_split(data_dir, ("val", "validation", "test"))
    return (
        torchvision.datasets.ImageFolder(str(train_dir), transform=train_tf),
        torchvision.datasets.ImageFolder(str(eval_dir), transform=eval_tf),
    )


def _num_classes(cfg: TrainConfig, data_dir: Path) -> int:
    if cfg.num_classes:
        return cfg.num_classes
    if cfg.dataset == "cifar10" or cfg.dataset == "synthetic":
        return 10
    if cfg.dataset == "cifar100":
        return 100
    train_dir = _imagefolder_split(data_dir, ("train",))
    classes = [p for p in train_dir.iterdir() if p.is_dir()]
    if not classes:
        raise DatasetNotFoundError(f"fastvit.train: {train_dir} has no class folders (<class>/<image>)")
    return len(classes)


# ---------------------------------------------------------------------------------- checkpointing


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def _load_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict, osd: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(sd)
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=sd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip


def _resume_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "resume.pth"
    if not p.is_file():
        raise ResumeError(
            f"fastvit.train: --resume {path}: no resume file at {p} (a run's --output folder holds resume.pth)"
        )
    return p


def _check_resume(state: dict[str, Any], cfg: TrainConfig, ctx: DistContext, path: Path) -> None:
    if state.get("format") != RESUME_FORMAT:
        raise ResumeError(f"fastvit.train: {path} is not a fastvit.train resume file (format {state.get('format')!r})")
    reasons = []
    if state["world_size"] != ctx.world_size:
        reasons.append(
            f"it was written by {state['world_size']} processes and this run has {ctx.world_size}: the data "
            f"order per rank and every rank's RNG state depend on the world size; resume with "
            f"{state['world_size']} processes"
        )
    if state["model_id"] != cfg.model_id():
        reasons.append(f"it trains another model ({state['model_id']}, this run: {cfg.model_id()})")
    ours = (cfg.batch_size, cfg.recipe.accum_steps, cfg.recipe.total_steps, cfg.fsdp)
    saved = state["config"]
    theirs = (saved["batch_size"], saved["recipe"]["accum_steps"], saved["recipe"]["total_steps"], saved["fsdp"])
    if ours != theirs:
        reasons.append(f"batch / accum / steps / fsdp differ (file {theirs}, this run {ours})")
    if reasons:
        raise ResumeError(
            f"fastvit.train: cannot resume from {path}: "
            + "; ".join(reasons)
            + ". To start a new run from its weights instead, pass --pretrained "
            + str(path.with_name("last.pth"))
        )


# ------------------------------------------------------------------------------------ what we see


class MetricsLog:
    """metrics.jsonl, metrics.csv and curves.png in ``folder`` (rank 0; None writes nothing)."""

    def __init__(self, folder: Optional[Path], records: Optional[list[dict[str, Any]]] = None):
        self.folder, self.records = folder, list(records or [])

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def flush(self) -> None:
        if self.folder is None:
            return
        atomic_write_text(self.folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records))
        columns: list[str] = []
        for r in self.records:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(self.folder / "metrics.csv", buf.getvalue())

    def plot(self) -> Optional[Path]:
        if self.folder is None or not self.records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(split: str, key: str) -> tuple[list[int], list[float]]:
            rows = [r for r in self.records if r["split"] == split and r.get(key) is not None]
            return [r["step"] for r in rows], [r[key] for r in rows]

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for split, key, label in (
            ("train", "loss", "train"),
            ("eval", "loss", "eval"),
            ("eval", "ema_loss", "eval EMA"),
        ):
            steps, values = series(split, key)
            if steps:
                axes[0].plot(steps, values, label=label)
        for key, label in (("top1", "top-1"), ("top5", "top-5"), ("ema_top1", "EMA top-1")):
            steps, values = series("eval", key)
            if steps:
                axes[1].plot(steps, values, marker="o", label=label)
        axes[2].plot(*series("train", "lr"))
        for ax, title in zip(axes, ("loss", "eval accuracy", "learning rate")):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes[:2]:
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        path = self.folder / "curves.png"
        atomic_write_bytes(path, buf.getvalue())
        return path


class _StopFlag:
    """First SIGINT / SIGTERM: stop after the current step and save; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.stop = False
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        print("\nfastvit.train: stopping after this step and saving a resumable checkpoint "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)  # fmt: skip

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------------- train


def _check_config(cfg: TrainConfig, ctx: DistContext) -> None:
    problems = []
    if bool(cfg.model) == bool(cfg.timm):
        problems.append("give exactly one of --model NAME (fastvit.list_models()) or --timm NAME")
    per_step = ctx.world_size * cfg.recipe.accum_steps
    if cfg.batch_size < 1 or cfg.batch_size % per_step:
        problems.append(
            f"--batch-size {cfg.batch_size} (global) must be a positive multiple of world size x accum steps "
            f"= {ctx.world_size} x {cfg.recipe.accum_steps} = {per_step}"
        )
    for name in ("eval_every", "log_every", "synthetic_samples"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.save_every is not None and cfg.save_every < 1:
        problems.append(f"--save-every must be >= 1, got {cfg.save_every}")
    if cfg.workers < 0:
        problems.append(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.fsdp and not ctx.distributed:
        problems.append("--fsdp shards over several processes: run it under torchrun with --nproc-per-node >= 2")
    if cfg.fsdp and ctx.device.type == "cpu" and release_tuple(torch.__version__) < (2, 6):
        problems.append(
            f"--fsdp on CPU needs torch >= 2.6 (torch {torch.__version__}'s fully_shard sets up CUDA streams): "
            "leave out --fsdp (DDP replicas over gloo), or run on GPUs, or upgrade torch"
        )
    if cfg.fsdp and cfg.recipe.ema_decay:
        problems.append("--ema-decay with --fsdp is not supported (the EMA copy would not be sharded)")
    if cfg.pretrained and not Path(cfg.pretrained).expanduser().is_file():
        problems.append(f"--pretrained {cfg.pretrained}: no such file")
    if problems:
        raise ValueError("fastvit.train: " + "; ".join(problems))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext, amp: Optional[torch.dtype]) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole eval set (sums all-reduced over ranks)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, n
    for x, y, valid in loader:
        x, y, valid = (t.to(ctx.device, non_blocking=True) for t in (x, y, valid))
        with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
        k = min(5, logits.shape[-1])
        hit = (logits.topk(k, dim=-1).indices == y[:, None]) & valid[:, None]
        losses = F.cross_entropy(logits, y, reduction="none") * valid
        sums += torch.stack([losses.sum(), hit[:, 0].sum(), hit.any(-1).sum(), valid.sum()]).double()
    _all_reduce_sum(sums, ctx)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": sums[1].item() / n, "top5": sums[2].item() / n}


def train(
    cfg: TrainConfig,
    *,
    on_step: Optional[Callable[[int], None]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> TrainResult:
    """Runs ``cfg`` to its last step (or until interrupted); see the module docstring.

    Args:
        cfg: the run.
        on_step: called with the step number after every optimizer step (before saving / evaluating).
        log: where messages go on rank 0 (default: stderr).

    Returns:
        A :class:`TrainResult`: the final step, whether the run was interrupted, the last eval metrics.

    Raises:
        ValueError: a bad option (the message names it and what is accepted).
        DatasetNotFoundError: the dataset is not on disk.
        ResumeError: ``--resume`` from a run of another model, world size or batch.
    """
    ctx, created_group = _init_distributed(cfg.device)
    try:
        return _train(cfg, ctx, on_step, log)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    ctx: DistContext,
    on_step: Optional[Callable[[int], None]],
    log_fn: Optional[Callable[[str], None]],
) -> TrainResult:
    def log(msg: str) -> None:
        if ctx.is_main:
            (log_fn or _write_above_bar)(msg)

    _check_config(cfg, ctx)
    recipe = cfg.recipe.for_device(ctx.device)
    recipe.validate()
    resume_file = _resume_path(cfg.resume) if cfg.resume else None
    resume: Optional[dict[str, Any]] = None
    if resume_file is not None:
        resume = torch.load(resume_file, map_location="cpu", weights_only=False)
        _check_resume(resume, cfg, ctx, resume_file)

    num_classes = _num_classes(cfg, Path(cfg.data_dir).expanduser())
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them without a broadcast)
    with torch.device(ctx.device):
        model = build_model(cfg, num_classes, log)
    model.to(ctx.device)
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout / drop-path draws differ per rank, as in one big batch
    np.random.seed(cfg.seed + ctx.rank)
    random.seed(cfg.seed + ctx.rank)
    mean, std, interp = _preprocessing(model)
    train_ds, eval_ds = build_datasets(cfg, _input_size(model), mean, std, interp)
    train_ds = train_ds if isinstance(train_ds, SyntheticTask) else EpochSeeded(train_ds, cfg.seed)
    micro = cfg.batch_size // (ctx.world_size * recipe.accum_steps)
    sampler = ResumableSampler(train_ds, ctx.world_size, ctx.rank, cfg.seed)
    if len(sampler) < micro * recipe.accum_steps:
        raise ValueError(
            f"fastvit.train: the training set has {len(train_ds)} samples, fewer than one global batch "
            f"of {cfg.batch_size}; lower --batch-size"
        )
    loader_kw: dict[str, Any] = {"num_workers": cfg.workers, "pin_memory": ctx.device.type == "cuda"}
    eval_shard = EvalShard(eval_ds, ctx.world_size, ctx.rank)
    eval_loader = DataLoader(eval_shard, batch_size=cfg.eval_batch_size or micro, **loader_kw)

    raw = model
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5: FSDP2 is still under _composable (public from 2.6)
            from torch.distributed._composable.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ema = ModelEma(raw, recipe.ema_decay) if recipe.ema_decay else None
    forward = torch.compile(model) if cfg.compile else model
    step_fn = TrainStep(model, recipe, ctx.device, forward=forward, ema=ema, ema_source=raw)

    step, epoch, batches_in_epoch = 0, 0, 0
    records: list[dict[str, Any]] = []
    if resume is not None:
        _load_state_dicts(raw, step_fn.optimizer, resume["model"], resume["optimizer"], cfg.fsdp)
        step_fn.scheduler.load_state_dict(resume["scheduler"])
        step_fn.scaler.load_state_dict(resume["scaler"])
        if ema is not None and resume.get("ema") is not None:
            ema.module.load_state_dict(resume["ema"])
        step, epoch, batches_in_epoch = resume["step"], resume["epoch"], resume["batches_in_epoch"]
        records = resume["records"]
        _set_rng_state(resume["rng"][ctx.rank], ctx.device)
        log(f"resumed from {resume_file} at step {step} (epoch {epoch}, batch {batches_in_epoch})")

    out_dir = Path(cfg.output or f"runs/{(cfg.timm or cfg.model or 'model').replace('/', '_')}-{cfg.dataset}")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out_dir if ctx.is_main else None, records)
    save_every = cfg.save_every or cfg.eval_every
    n_params = sum(p.numel() for p in raw.parameters())
    log(
        f"fastvit.train: {cfg.timm or cfg.model} ({n_params / 1e6:.2f} M params, {num_classes} classes, "
        f"{_input_size(raw)} px) on {cfg.dataset} ({len(train_ds)} train / {len(eval_ds)} eval); "
        f"{ctx.world_size} x {ctx.device.type}, global batch {cfg.batch_size} = {ctx.world_size} ranks x "
        f"{recipe.accum_steps} accum x {micro}; {recipe.optimizer} lr {recipe.lr} {recipe.schedule} "
        f"warmup {recipe.warmup_steps}/{recipe.total_steps}, clip {recipe.clip_grad}, amp {recipe.amp}; "
        f"output {out_dir}"
    )

    def save() -> None:
        sd, osd = _full_state_dicts(raw, step_fn.optimizer, cfg.fsdp)
        rngs: list[Any] = [None] * ctx.world_size
        if ctx.distributed:
            dist.all_gather_object(rngs, _rng_state(ctx.device))
        else:
            rngs = [_rng_state(ctx.device)]
        if ctx.is_main:
            write_checkpoint(sd, osd, rngs)
        if ctx.distributed:
            dist.barrier()  # no rank goes on (or reads the files) before rank 0 has written them

    def write_checkpoint(sd: dict[str, Any], osd: dict[str, Any], rngs: list[Any]) -> None:
        cpu_sd = {k: v.detach().cpu() for k, v in sd.items()}
        state = {
            "format": RESUME_FORMAT, "step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
            "world_size": ctx.world_size, "model_id": cfg.model_id(), "config": dataclasses.asdict(cfg),
            "model": cpu_sd, "optimizer": osd, "scheduler": step_fn.scheduler.state_dict(),
            "scaler": step_fn.scaler.state_dict(), "ema": ema.module.state_dict() if ema else None,
            "rng": rngs, "records": metrics.records,
        }  # fmt: skip
        atomic_save(state, out_dir / "resume.pth")
        atomic_save(cpu_sd, out_dir / "last.pth")
        if ema is not None:
            atomic_save({k: v.cpu() for k, v in ema.module.state_dict().items()}, out_dir / "last_ema.pth")
        metrics.flush()

    def run_eval() -> dict[str, float]:
        # the unwrapped model: DDP's forward may broadcast buffers, which ranks with uneven shards would not match
        res = evaluate(forward if cfg.compile else raw, eval_loader, ctx, recipe.amp_dtype)
        rec: dict[str, Any] = {"step": step, "epoch": epoch, "split": "eval", **res}
        if ema is not None:
            e = evaluate(ema.module, eval_loader, ctx, recipe.amp_dtype)
            rec.update({f"ema_{k}": v for k, v in e.items()})
        metrics.add(rec)
        log(f"step {step}: eval loss {res['loss']:.4f} top-1 {res['top1']:.4f} top-5 {res['top5']:.4f}"
            + (f" (EMA top-1 {rec['ema_top1']:.4f})" if ema is not None else ""))  # fmt: skip
        return rec

    from tqdm.auto import tqdm

    bar = tqdm(total=recipe.total_steps, initial=step, disable=not (ctx.is_main and cfg.progress), unit="step")
    last_eval: dict[str, Any] = {}
    interrupted = False
    window_loss = torch.zeros((), device=ctx.device)
    window_steps, window_t0 = 0, time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    with _StopFlag() as stop:
        while step < recipe.total_steps:
            sampler.set_epoch(epoch)
            if isinstance(train_ds, EpochSeeded):
                train_ds.set_epoch(epoch)
            sampler.skip = batches_in_epoch * micro
            loader = DataLoader(train_ds, batch_size=micro, sampler=sampler, drop_last=True,
                                generator=generator, **loader_kw)  # fmt: skip
            it = iter(loader)
            while step < recipe.total_steps:
                try:
                    group = [next(it) for _ in range(recipe.accum_steps)]
                except StopIteration:
                    break
                group = [(x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)) for x, y in group]
                stats = step_fn(group)
                step += 1
                batches_in_epoch += recipe.accum_steps
                window_loss += stats.loss
                window_steps += 1
                bar.update(1)
                if on_step is not None:
                    on_step(step)
                if step % cfg.log_every == 0 or step == recipe.total_steps:
                    mean_loss = _all_reduce_sum(window_loss.clone(), ctx).item() / (window_steps * ctx.world_size)
                    elapsed = time.perf_counter() - window_t0
                    img_s = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                    lr = step_fn.optimizer.param_groups[0]["lr"]
                    rec = {"step": step, "epoch": epoch, "split": "train", "loss": mean_loss, "lr": lr, "img_s": img_s}
                    if stats.grad_norm is not None:
                        rec["grad_norm"] = float(stats.grad_norm)
                    metrics.add(rec)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
                    window_loss.zero_()
                    window_steps, window_t0 = 0, time.perf_counter()
                if step % cfg.eval_every == 0 or step == recipe.total_steps:
                    last_eval = run_eval()
                stopping = _agree(stop.stop, ctx)
                if stopping or step % save_every == 0 or step == recipe.total_steps:
                    save()
                if stopping:
                    interrupted = True
                    break
            if interrupted:
                break
            if step < recipe.total_steps:
                epoch += 1
                batches_in_epoch = 0
    bar.close()
    if interrupted:
        log(f"interrupted at step {step}: resume with --resume {out_dir}")
    if ctx.is_main:
        metrics.flush()
        png = metrics.plot()
        log(
            f"wrote {out_dir / 'last.pth'}, {out_dir / 'resume.pth'}, metrics.jsonl / .csv"
            + (f", {png}" if png else "")
        )
    final = {k: v for k, v in last_eval.items() if isinstance(v, float)}
    return TrainResult(step, interrupted, final, out_dir if ctx.is_main else None, metrics.records)


def _write_above_bar(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _agree(flag: bool, ctx: DistContext) -> bool:
    """Every rank stops at the same step when any of them was told to."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    r = d.recipe
    p = argparse.ArgumentParser(
        prog="python -m fastvit.train",
        description="Fine-tune a ViT on fastvit's kernels (ViT-pytorch's CIFAR recipe by default); "
        "runs under torchrun for many GPUs and nodes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="a fastvit.create_model name (fastvit.list_models())")
    g.add_argument("--timm", help="a timm model name, run through fastvit.patch_model")
    g.add_argument("--model-args", type=_parse_model_args, default={}, help="extra constructor args: k=v,k=v")
    g.add_argument("--pretrained", help="weights in any format fastvit.load_checkpoint reads (.npz, .pth, ...)")
    g.add_argument(
        "--head-init",
        choices=("zero", "random"),
        default=d.head_init,
        help="a classifier --pretrained cannot fill (another class count): zeros as ViT-pytorch, or timm's random init",
    )
    g.add_argument("--img-size", type=int, help="training resolution (default: the model's)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    g.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="CIFAR root (holding cifar-10-batches-py/) or ImageFolder root (train/, val/)",
    )
    g.add_argument("--num-classes", type=int, help="default: the dataset's")
    g.add_argument("--synthetic-samples", type=int, default=d.synthetic_samples)
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per process")
    g = p.add_argument_group("recipe")
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch over all processes and accumulation"
    )
    g.add_argument("--eval-batch-size", type=int, help="per process (default: the training micro-batch)")
    g.add_argument("--accum-steps", type=int, default=r.accum_steps, help="micro-batches per optimizer step")
    g.add_argument(
        "--steps", dest="total_steps", metavar="STEPS", type=int, default=r.total_steps, help="optimizer steps"
    )
    g.add_argument("--warmup-steps", type=int, default=r.warmup_steps)
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=r.optimizer)
    g.add_argument("--lr", type=float, default=r.lr)
    g.add_argument("--momentum", type=float, default=r.momentum)
    g.add_argument("--weight-decay", type=float, default=r.weight_decay)
    g.add_argument("--schedule", choices=("cosine", "linear"), default=r.schedule)
    g.add_argument("--clip-grad", type=float, default=r.clip_grad, help="max gradient norm; 0 disables")
    g.add_argument(
        "--amp",
        choices=("auto", "none", "bf16", "fp16"),
        default=r.amp,
        help="auto: bf16 on GPUs that have it, else none",
    )
    g.add_argument("--label-smoothing", type=float, default=r.label_smoothing)
    g.add_argument("--ema-decay", type=float, default=r.ema_decay, help="EMA of the weights; 0 disables")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("run")
    g.add_argument("--fsdp", action="store_true", help="shard parameters with fully_shard instead of DDP replicas")
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--save-every", type=int, help="default: --eval-every")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--output", help="run folder (default runs/<model>-<dataset>)")
    g.add_argument("--resume", help="a run folder or its resume.pth: continue exactly where it stopped")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = vars(build_parser().parse_args(argv))
    recipe = Recipe(**{f.name: args.pop(f.name) for f in dataclasses.fields(Recipe)})
    cfg = TrainConfig(recipe=recipe, **args)
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError, ResumeError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if result.metrics and result.output is not None:  # rank 0
        print(json.dumps({"step": result.step, **result.metrics}))
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

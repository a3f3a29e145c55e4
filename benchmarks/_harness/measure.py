"""The measurements of one table cell (a model row run by one provider).

Metrics, in the order a cell runs them (training first, while the weights are fp32):

* ``train``: the training step ``python -m fastvit.train`` runs (``fastvit.train.TrainStep`` with its
  default recipe: forward under autocast to the run's dtype over fp32 weights, fp32 cross-entropy,
  backward through a GradScaler for fp16, gradient clipping at 1.0, SGD momentum 0.9, warmup-cosine
  scheduler step) at the row's training batch: img/s and peak allocated memory.
* ``paper_mem`` (segmentation): mmseg's "Mem": peak allocated memory in a training step on 2 images
  of 512x512, fp32, AdamW as the mmseg ViT configs, after 2 warm-up steps (optimizer state exists).
* ``paper_fps`` (segmentation): mmseg's "Inf time (fps)": batch-1 ``predict`` in fp32, 5 warm-up
  and 200 timed calls, fps = 1 / mean time (on a fixed 512x512 input, not ADE20K's variable sizes).
* ``infer``: forward under no_grad with weights and input in the run's dtype at the row's inference
  batch: img/s and peak allocated memory.
* ``latency``: the same at batch 1, in ms.

Each returns a result dict; ``run_cell`` turns an out-of-memory error into an "oom" result for that
metric (the next metric still runs), an unsupported forced backend into "not available", anything
else into "error" with the message: never a number that was not measured.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from _harness.providers import Provider, backend_env, build_model, unavailable_reason
from _harness.rows import ModelRow
from fastvit._timing import peak_memory_gib, random_inputs, time_calls

__all__ = ["GPU_PLAN", "CPU_PLAN", "MEASURE", "METRICS", "Settings", "plan_for", "run_cell", "status_result"]

METRICS = ("train", "paper_mem", "paper_fps", "infer", "latency")
GPU_PLAN = {
    "classification": ("train", "infer", "latency"),
    "segmentation": ("train", "paper_mem", "paper_fps", "infer", "latency"),
}
CPU_PLAN = ("infer", "latency")
PAPER_BATCH = 2
PAPER_WARMUP = 5
PAPER_ITERS = 200
SEG_IGNORE_INDEX = 255
STATUSES = ("ok", "n/a", "not available", "oom", "error", "interrupted")


@dataclass
class Settings:
    """How the cells of one run are measured.

    Args:
        device: where to run.
        dtype: inference dtype and training autocast dtype.
        iters: timed calls per measurement (>= 20).
        infer_batch: overrides every row's inference batch when set.
        train_batch: overrides every row's training batch when set.
        max_warmup_s: cap on the automatic warm-up (compile and autotuning must finish inside it).
        buffers: input buffers rotated through.
        warmup: "auto" (until stable) or a fixed number of warm-up calls (the CPU run: eager CPU code
            has nothing to compile or autotune).
    """

    device: torch.device
    dtype: torch.dtype
    iters: int = 30
    infer_batch: Optional[int] = None
    train_batch: Optional[int] = None
    max_warmup_s: float = 120.0
    buffers: int = 3
    warmup: Union[str, int] = "auto"

    def batch(self, row: ModelRow, metric: str) -> int:
        if metric == "latency" or metric == "paper_fps":
            return 1
        if metric == "paper_mem":
            return PAPER_BATCH
        if metric == "train":
            return self.train_batch or row.train_batch
        return self.infer_batch or row.infer_batch

    def dtype_of(self, metric: str) -> torch.dtype:
        return torch.float32 if metric.startswith("paper_") else self.dtype


def plan_for(row: ModelRow, device: torch.device, metrics: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """The metrics measured for ``row``: the given ones that apply to its suite, in run order."""
    default = GPU_PLAN[row.suite] if device.type == "cuda" else CPU_PLAN
    wanted = default if metrics is None else metrics
    return tuple(m for m in METRICS if m in wanted and m in GPU_PLAN[row.suite])


def status_result(text: str, **extra: Any) -> dict[str, Any]:
    """A result without numbers from a reason such as "n/a: timm has no T2T-ViT"."""
    status, _, reason = text.partition(": ")
    if status not in STATUSES:
        status, reason = "error", text
    return {"status": status, "reason": reason, **extra}


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _compiled(model: torch.nn.Module, provider: Provider) -> Callable[..., Any]:
    if provider.compile_mode is None:
        return model
    mode = None if provider.compile_mode == "default" else provider.compile_mode
    compiled = torch.compile(model, mode=mode, dynamic=False)
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if provider.compile_mode != "max-autotune" or mark_step is None:
        return compiled

    def call(*args: Any) -> Any:
        # max-autotune replays CUDA graphs: say where an iteration starts, so a training step's
        # backward and the next forward do not overwrite each other's graph memory.
        mark_step()
        return compiled(*args)

    return call


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _loss_fn(model: torch.nn.Module, run: Callable[..., Any], row: ModelRow) -> tuple[LossFn, str]:
    """The training loss for ``row`` and a note saying which loss it is."""
    if row.suite == "classification":
        return (lambda x, y: F.cross_entropy(_first(run(x)).float(), y)), "cross-entropy on the logits"
    if _takes_labels(model):

        def seg_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            losses = run(x, y)
            if isinstance(losses, dict):
                if "loss" in losses:
                    return losses["loss"]
                return sum(v for k, v in losses.items() if k.endswith("loss_ce"))
            return losses

        return seg_loss, "the segmentor's own training loss (forward(x, seg_label): decode + auxiliary heads)"

    def logits_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = _first(run(x)).float()
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y, ignore_index=SEG_IGNORE_INDEX)

    return logits_loss, "cross-entropy on the forward logits resized to the label (no auxiliary head)"


def _takes_labels(model: torch.nn.Module) -> bool:
    """True for a segmentor whose forward(x, seg_label) returns its training losses (fastvit's do)."""
    try:
        return "seg_label" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _targets(row: ModelRow, batch: int, device: torch.device, num_outputs: int) -> torch.Tensor:
    if row.suite == "classification":
        return torch.randint(0, num_outputs, (batch,), device=device)
    return torch.randint(0, num_outputs, (batch, row.img_size, row.img_size), device=device)


def _num_outputs(model: torch.nn.Module, row: ModelRow) -> int:
    n = getattr(model, "num_classes", None) or row.num_classes
    return int(n) if n else 150


def _train_step(
    model: torch.nn.Module,
    provider: Provider,
    row: ModelRow,
    recipe: Any,
    device: torch.device,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> tuple[Callable[[Any], None], str]:
    """The optimizer step ``python -m fastvit.train`` runs (``fastvit.train.TrainStep``: autocast, GradScaler
    for fp16, clipping, optimizer and scheduler step) with this provider's forward and the row's loss."""
    from fastvit.train import TrainStep

    run = _compiled(model, provider)
    loss_fn, note = _loss_fn(model, run, row)
    train_step = TrainStep(model, recipe, device, optimizer=optimizer, forward=run, loss_fn=loss_fn)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        train_step([batch])

    return step, note


def _train_recipe(dtype: torch.dtype) -> Any:
    """fastvit.train's default recipe (ViT-pytorch's: SGD momentum 0.9, clip 1.0, warmup-cosine) in ``dtype``."""
    from fastvit.train import Recipe

    amp = {torch.float32: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return Recipe(amp=amp, total_steps=10**9)


def _train_batches(
    row: ModelRow, model: torch.nn.Module, batch: int, s: Settings
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs = random_inputs((batch, 3, row.img_size, row.img_size), count=s.buffers, device=s.device, dtype=torch.float32)
    n = _num_outputs(model, row)
    return [(x, _targets(row, batch, s.device, n)) for x in xs]


def measure_train(model: torch.nn.Module, provider: Provider, row: ModelRow, s: Settings) -> dict[str, Any]:
    batch = s.batch(row, "train")
    model.train()
    recipe = _train_recipe(s.dtype)
    step, note = _train_step(model, provider, row, recipe, s.device)
    batches = _train_batches(row, model, batch, s)
    try:
        t = time_calls(step, batches, iters=s.iters, warmup=s.warmup, max_warmup_s=s.max_warmup_s, device=s.device)
        peak = peak_memory_gib(step, batches[0], s.device)
    finally:
        model.zero_grad(set_to_none=True)
        del step, batches
    values = {"img_s": batch / (t.median_ms / 1e3), "ms": t.median_ms}
    if peak is not None:
        values["peak_mem_gib"] = peak
    return {
        "status": "ok",
        "batch": batch,
        "values": values,
        "timing": t.as_dict(),
        "notes": [
            f"fastvit.train's step: SGD momentum 0.9, clip 1.0, warmup-cosine, amp {recipe.amp}"
            f"{' + GradScaler' if recipe.amp == 'fp16' else ''}; {note}"
        ],
    }


def measure_paper_mem(model: torch.nn.Module, provider: Provider, row: ModelRow, s: Settings) -> dict[str, Any]:
    if s.device.type != "cuda":
        return status_result("n/a: peak allocated memory needs the CUDA allocator (a GPU)")
    model.train().float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    recipe = dataclasses.replace(_train_recipe(torch.float32), optimizer="adamw", lr=6e-5, clip_grad=0.0)
    step, note = _train_step(model, provider, row, recipe, s.device, optimizer=optimizer)
    batches = _train_batches(row, model, PAPER_BATCH, s)
    try:
        for b in batches[:2]:  # the first steps allocate AdamW's state; mmseg's peak is over a whole run
            step(b)
        peak = peak_memory_gib(step, batches[2 % len(batches)], s.device)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer, batches
    return {
        "status": "ok",
        "batch": PAPER_BATCH,
        "values": {"mem_gib": peak},
        "notes": [f"fp32, AdamW, 512x512, peak over one step after 2 warm-up steps; {note}"],
    }


def _predict_fn(model: torch.nn.Module, row: ModelRow) -> tuple[Callable[[torch.Tensor], Any], str]:
    predict = getattr(model, "predict", None)
    if callable(predict):
        return predict, "model.predict (logits resized to the input, as mmseg's predict mode)"

    def fallback(x: torch.Tensor) -> torch.Tensor:
        logits = _first(model(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).argmax(1)

    return fallback, "forward + bilinear resize to the input + argmax (the model has no predict)"


def measure_paper_fps(model: torch.nn.Module, provider: Provider, row: ModelRow, s: Settings) -> dict[str, Any]:
    model.eval().float()
    predict, note = _predict_fn(model, row)
    xs = random_inputs((1, 3, row.img_size, row.img_size), count=s.buffers, device=s.device, dtype=torch.float32)

    def call(x: torch.Tensor) -> None:
        with torch.no_grad():
            predict(x)

    t = time_calls(call, xs, iters=PAPER_ITERS, warmup=PAPER_WARMUP, device=s.device)
    return {
        "status": "ok",
        "batch": 1,
        "values": {"fps": 1e3 / t.mean_ms, "ms": t.mean_ms},
        "timing": t.as_dict(),
        "notes": [
            f"fp32, batch 1, {PAPER_WARMUP} warm-up + {PAPER_ITERS} timed, fps = 1/mean; fixed "
            f"{row.img_size}x{row.img_size} input; {note}"
        ],
    }


def _eval_forward(model: torch.nn.Module, provider: Provider, dtype: torch.dtype) -> Callable[[torch.Tensor], None]:
    model.eval().to(dtype)
    run = _compiled(model, provider)

    def forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            run(x)

    return forward


def measure_infer(model: torch.nn.Module, provider: Provider, row: ModelRow, s: Settings) -> dict[str, Any]:
    batch = s.batch(row, "infer")
    forward = _eval_forward(model, provider, s.dtype)
    xs = random_inputs((batch, 3, row.img_size, row.img_size), count=s.buffers, device=s.device, dtype=s.dtype)
    t = time_calls(forward, xs, iters=s.iters, warmup=s.warmup, max_warmup_s=s.max_warmup_s, device=s.device)
    peak = peak_memory_gib(forward, xs[0], s.device)
    values = {"img_s": batch / (t.median_ms / 1e3), "ms": t.median_ms}
    if peak is not None:
        values["peak_mem_gib"] = peak
    return {"status": "ok", "batch": batch, "values": values, "timing": t.as_dict()}


def _graph_replay(
    model: torch.nn.Module, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device
) -> tuple[Callable[[torch.Tensor], Any], float]:
    """fastvit.graphs.graph_replay of a no-grad forward at ``shape``: (copy-in + replay, capture seconds).
    Outputs stay in the graph's static buffers (no clone), so the timing is the replay alone."""
    from fastvit.graphs import graph_replay

    model.eval().to(dtype)
    t0 = time.perf_counter()
    replay = graph_replay(model, torch.randn(*shape, device=device, dtype=dtype), clone_outputs=False)
    torch.cuda.synchronize(device)
    return replay, time.perf_counter() - t0


def measure_latency(model: torch.nn.Module, provider: Provider, row: ModelRow, s: Settings) -> dict[str, Any]:
    shape = (1, 3, row.img_size, row.img_size)
    xs = random_inputs(shape, count=s.buffers, device=s.device, dtype=s.dtype)
    notes = []
    if provider.graph:
        fn, capture_s = _graph_replay(model, s.dtype, shape, s.device)
        notes.append(
            f"fastvit.graphs.graph_replay (warm-up + capture {capture_s:.2f} s); each call copies "
            "the input into the static buffer, then replays"
        )
    else:
        fn = _eval_forward(model, provider, s.dtype)
    t = time_calls(fn, xs, iters=s.iters, warmup=s.warmup, max_warmup_s=s.max_warmup_s, device=s.device)
    return {
        "status": "ok",
        "batch": 1,
        "values": {"ms": t.median_ms, "p90_ms": t.p90_ms},
        "timing": t.as_dict(),
        "notes": notes,
    }


MEASURE: dict[str, Callable[[torch.nn.Module, Provider, ModelRow, Settings], dict[str, Any]]] = {
    "train": measure_train,
    "paper_mem": measure_paper_mem,
    "paper_fps": measure_paper_fps,
    "infer": measure_infer,
    "latency": measure_latency,
}


def _oom_text(row: ModelRow, metric: str, s: Settings) -> str:
    return f"oom: out of memory at batch {s.batch(row, metric)}; cell skipped (pass a smaller --batch / --train-batch)"


def _reset_compiler() -> None:
    """Fresh dynamo caches per compiled cell: every ViT shares one forward code object, and the
    per-code recompile limit would otherwise send later models back to eager without a word."""
    torch._dynamo.reset()


def run_cell(
    row: ModelRow,
    provider: Provider,
    metrics: Sequence[str],
    s: Settings,
    on_result: Optional[Callable[[str, dict[str, Any]], None]] = None,
) -> dict[str, dict[str, Any]]:
    """Measure ``metrics`` of ``row`` with ``provider``; one result per metric, reported as it lands."""
    results: dict[str, dict[str, Any]] = {}

    def done(metric: str, result: dict[str, Any]) -> None:
        result.setdefault("dtype", _dtype_name(s.dtype_of(metric)))
        result.setdefault("batch", s.batch(row, metric))
        results[metric] = result
        if on_result is not None:
            on_result(metric, result)

    reason = unavailable_reason(provider, row, s.device)
    if reason is not None:
        for metric in metrics:
            done(metric, status_result(provider.serves(metric) or reason))
        return results
    from fastvit.ops.dispatch import BackendNotSupported

    oom = torch.cuda.OutOfMemoryError
    with backend_env(provider):
        if provider.compile_mode is not None:
            _reset_compiler()
        model: Optional[torch.nn.Module] = None
        try:
            model = build_model(provider, row, s.device)
        except oom:
            reason = f"oom: out of memory building the model on {s.device}"
        except Exception as exc:
            reason = f"error: building the model failed: {type(exc).__name__}: {exc}"
        try:
            for metric in metrics:
                skip = provider.serves(metric) or reason
                if skip is not None or model is None:
                    done(metric, status_result(skip or "error: no model"))
                    continue
                try:
                    done(metric, MEASURE[metric](model, provider, row, s))
                except oom:
                    _cleanup(s.device)
                    done(metric, status_result(_oom_text(row, metric, s)))
                except BackendNotSupported as exc:
                    done(metric, status_result(f"not available: {str(exc).splitlines()[0]}", detail=str(exc)))
                except Exception as exc:  # recorded in the results, never turned into a number
                    if "out of memory" in str(exc).lower():  # an OOM wrapped by the compiler or a kernel launcher
                        _cleanup(s.device)
                        done(metric, status_result(_oom_text(row, metric, s), detail=str(exc)[:2000]))
                        continue
                    done(
                        metric,
                        status_result(
                            f"error: {type(exc).__name__}: {exc}".splitlines()[0],
                            traceback=traceback.format_exc(limit=8),
                        ),
                    )
        finally:
            del model
            _cleanup(s.device)
    return results

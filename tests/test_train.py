"""fastvit.train on the CPU: it learns, DDP / accumulation / resume give the same numbers, saves survive a
kill, bad inputs are named. Models are tiny ViTs (2 blocks, width 32, 16x16 images, patch 4)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import fastvit
from fastvit.kernels import release_tuple
from fastvit.train import (
    DatasetNotFoundError,
    Recipe,
    ResumeError,
    TrainConfig,
    TrainStep,
    WarmupSchedule,
    main,
    train,
)

TINY_ARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # 2 shared cores: one intra-op thread is faster and makes summation order fixed.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}


def tiny(out: Path, **kw: Any) -> TrainConfig:
    """A run of the tiny ViT; ``kw`` are TrainConfig or Recipe fields (``steps`` is the recipe's total_steps)."""
    base = dict(
        model="vit_tiny_patch16_224", model_args=dict(TINY_ARGS), img_size=16, dataset="synthetic", num_classes=4,
        synthetic_samples=256, batch_size=16, eval_every=100, log_every=1, workers=0, output=str(out),
        progress=False, device="cpu",
    )  # fmt: skip
    recipe = {"total_steps": kw.pop("steps", 6), "warmup_steps": 2}
    recipe.update({k: kw.pop(k) for k in list(kw) if k in RECIPE_FIELDS})
    base.update(kw)
    return TrainConfig(recipe=Recipe(**recipe), **base)


def quiet(msg: str) -> None:
    pass


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tiny_vit_learns_a_task_that_needs_attention(tmp_path: Path) -> None:
    # The label is the pattern of one marker square at a random cell; a class-token ViT reads it only
    # through attention. Chance is 0.25.
    cfg = tiny(tmp_path, synthetic_samples=2048, batch_size=32, steps=80, warmup_steps=10, optimizer="adamw",
               lr=3e-3, eval_every=40, log_every=10)  # fmt: skip
    result = train(cfg, log=quiet)
    assert result.step == 80 and not result.interrupted
    assert result.metrics["top1"] >= 0.9, result.metrics
    assert result.metrics["top5"] == 1.0  # 4 classes: top-5 is top-4
    train_losses = [r["loss"] for r in result.records if r["split"] == "train"]
    assert train_losses[-1] < 0.5 * train_losses[0]
    lrs = {r["step"]: r["lr"] for r in result.records if r["split"] == "train"}
    assert lrs[10] == pytest.approx(3e-3)  # end of warmup: the peak; cosine then decays
    assert lrs[80] == pytest.approx(0.0, abs=1e-12)
    assert [r["step"] for r in result.records if r["split"] == "eval"] == [40, 80]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(result.records) == 8 + 2
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].startswith("step,epoch,split,loss,lr,img_s")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # last.pth is a timm state dict: timm loads it strictly, and so does fastvit.load_checkpoint.
    import timm

    sd = weights(tmp_path / "last.pth")
    tm = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, **TINY_ARGS).eval()
    tm.load_state_dict(sd, strict=True)
    fm = fastvit.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, **TINY_ARGS).eval()
    assert fastvit.load_checkpoint(fm, tmp_path / "last.pth").format == "timm"
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fm(x), tm(x), atol=1e-5, rtol=1e-5)


def test_pretrained_timm_model_resamples_pos_embed_and_resets_head(tmp_path: Path) -> None:
    src = tmp_path / "src"
    train(tiny(src, steps=1, warmup_steps=0), log=quiet)
    messages: list[str] = []
    cfg = tiny(tmp_path / "ft", model=None, timm="vit_tiny_patch16_224", img_size=32, num_classes=3, steps=2,
               warmup_steps=0, pretrained=str(src / "last.pth"))  # fmt: skip
    result = train(cfg, log=messages.append)
    assert result.step == 2
    text = "\n".join(messages)
    assert "patched" in text and "position embedding resampled to 32" in text
    assert "classifier reset to 3 classes (zero-initialised as ViT-pytorch's zero_head): head.bias, head.weight" in text
    sd = weights(tmp_path / "ft" / "last.pth")
    assert sd["head.weight"].shape == (3, 32) and sd["pos_embed"].shape == (1, 1 + 8 * 8, 32)
    assert sd["head.weight"].abs().max() > 0  # trained away from zero in 2 steps
    src_sd = weights(src / "last.pth")
    assert (
        sd["blocks.0.attn.qkv.weight"] - src_sd["blocks.0.attn.qkv.weight"]
    ).abs().max() < 0.05  # loaded, not re-initialised


def test_warmup_schedules() -> None:
    cos, lin = WarmupSchedule("cosine", 10, 110), WarmupSchedule("linear", 10, 110)
    assert [cos(s) for s in (0, 5, 10, 60, 110)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert [lin(s) for s in (0, 5, 10, 60, 110)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert cos(35) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.25)))
    assert lin(35) == pytest.approx(0.75)


def test_grad_accumulation_4x8_equals_batch_32(tmp_path: Path) -> None:
    train(tiny(tmp_path / "a", batch_size=32, accum_steps=1, steps=3), log=quiet)
    train(tiny(tmp_path / "b", batch_size=32, accum_steps=4, steps=3), log=quiet)
    train(tiny(tmp_path / "c", batch_size=32, accum_steps=4, steps=3, grad_checkpointing=True), log=quiet)
    a = weights(tmp_path / "a" / "last.pth")
    for other in ("b", "c"):  # c: the same with activations recomputed in the backward
        b = weights(tmp_path / other / "last.pth")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5, msg=f"{other}: {k}")
    torch.manual_seed(42)  # the run's seed: the same initial weights
    start = fastvit.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, **TINY_ARGS).state_dict()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the comparison is of trained weights, not of two copies of the init


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, runs: list[tuple[TrainConfig, Optional[int]]]) -> None:
    # What torchrun sets up for each process: the env:// rendezvous, then the standard init.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        for cfg, stop_at in runs:  # train() uses the existing group (as under a caller that set it up)
            train(cfg, on_step=_interrupt_at(stop_at) if stop_at else None, log=quiet)
    finally:
        torch.distributed.destroy_process_group()


_KW_2PROC = dict(batch_size=16, steps=4, eval_every=4, log_every=2, synthetic_samples=260)
CPU_FSDP = release_tuple(torch.__version__) >= (2, 6)


@pytest.mark.slow  # > 4 s on 2 cores: out of the quick loop (pytest -m 'not slow'), CI runs it
def test_two_process_gloo_ddp_equals_one_process_on_the_global_batch(tmp_path: Path) -> None:
    # 65 eval samples: shards of 33 and 32 (+1 padding item), all-reduced to the one-process numbers.
    single = train(tiny(tmp_path / "one", **_KW_2PROC), log=quiet)
    mp.spawn(_ddp_worker, args=(2, _free_port(), [(tiny(tmp_path / "two", **_KW_2PROC), None)]), nprocs=2, join=True)
    one, two = weights(tmp_path / "one" / "last.pth"), weights(tmp_path / "two" / "last.pth")
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-5, msg=f"ddp: {k}")
    # Metrics are all-reduced: the 2-process eval covers every eval sample once, like one process.
    import json

    rec2 = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    e1 = [r for r in single.records if r["split"] == "eval"][-1]
    e2 = [r for r in rec2 if r["split"] == "eval"][-1]
    assert e2["top1"] == pytest.approx(e1["top1"]) and e2["loss"] == pytest.approx(e1["loss"], rel=1e-5)
    t1 = [r["loss"] for r in single.records if r["split"] == "train"]
    t2 = [r["loss"] for r in rec2 if r["split"] == "train"]
    assert t2 == pytest.approx(t1, rel=1e-5)


@pytest.mark.slow  # > 4 s on 2 cores: out of the quick loop (pytest -m 'not slow'), CI runs it
@pytest.mark.skipif(not CPU_FSDP, reason=f"fully_shard on CPU (gloo) needs torch >= 2.6; this is {torch.__version__}")
def test_two_process_gloo_fsdp_equals_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    train(tiny(tmp_path / "one", **_KW_2PROC), log=quiet)
    part = tmp_path / "fsdp_part"
    runs = [
        (tiny(tmp_path / "fsdp", fsdp=True, **_KW_2PROC), None),
        (tiny(part, fsdp=True, **_KW_2PROC), 2),  # Ctrl-C on every rank at step 2, then --resume
        (tiny(part, fsdp=True, resume=str(part), **_KW_2PROC), None),
    ]
    mp.spawn(_ddp_worker, args=(2, _free_port(), runs), nprocs=2, join=True)
    one, fsdp = weights(tmp_path / "one" / "last.pth"), weights(tmp_path / "fsdp" / "last.pth")
    assert fsdp.keys() == one.keys()
    for k in one:  # fully_shard'ed blocks gathered into a full state dict
        torch.testing.assert_close(fsdp[k], one[k], atol=2e-6, rtol=1e-5, msg=f"fsdp: {k}")
    resumed = weights(part / "last.pth")
    assert all(torch.equal(fsdp[k], resumed[k]) for k in fsdp)


@pytest.mark.skipif(CPU_FSDP, reason="this torch runs fully_shard on CPU; the refusal is for torch < 2.6")
def test_fsdp_on_cpu_with_old_torch_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--fsdp on CPU needs torch >= 2.6"):
        train(tiny(tmp_path / "x", fsdp=True, **_KW_2PROC), log=quiet)


def write_fake_cifar10(root: Path, n_train: int = 64, n_test: int = 16) -> Path:
    """A small CIFAR-10 in torchvision's on-disk format (python pickles of uint8 rows)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict[str, Any]:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train // 5 + 1)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import torchvision.datasets.cifar

    # torchvision checks the real archive's md5 sums; these files are our own.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    return write_fake_cifar10(tmp_path / "data")


def _interrupt_at(stop_step: int) -> Any:
    def on_step(step: int) -> None:
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled at the step boundary

    return on_step


def test_interrupted_then_resumed_equals_uninterrupted_bit_for_bit(tmp_path: Path, fake_cifar: Path) -> None:
    # CIFAR-10 from disk with ViT-pytorch's random crops, drop-path, label smoothing, EMA, AdamW, a
    # linear schedule and two epochs (the interruption falls inside the first).
    kw = dict(dataset="cifar10", data_dir=str(fake_cifar), num_classes=None, batch_size=8, steps=10, eval_every=4,
              drop_path=0.2, label_smoothing=0.1, ema_decay=0.9, optimizer="adamw", lr=1e-3,
              schedule="linear")  # fmt: skip
    full = train(tiny(tmp_path / "full", **kw), log=quiet)
    part = train(tiny(tmp_path / "part", **kw), on_step=_interrupt_at(3), log=quiet)
    assert part.interrupted and part.step == 3
    assert (tmp_path / "part" / "curves.png").is_file()  # curves are written on interrupt too
    assert main([*_cli(tiny(tmp_path / "part", **kw)), "--resume", str(tmp_path / "part")]) == 0
    for name in ("last.pth", "last_ema.pth"):
        a, b = weights(tmp_path / "full" / name), weights(tmp_path / "part" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    import json

    resumed = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "img_s"} for r in resumed]
    assert strip == [{k: v for k, v in r.items() if k != "img_s"} for r in full.records]


def _cli(cfg: TrainConfig) -> list[str]:
    """The command line of a tiny() config (the fields the tests change)."""
    args = ["--model", cfg.model or "", "--model-args", ",".join(f"{k}={v}" for k, v in cfg.model_args.items())]
    options = {name: getattr(cfg, name) for name in ("img_size", "dataset", "data_dir", "num_classes",
               "synthetic_samples", "batch_size", "eval_every", "log_every", "workers", "output", "device",
               "drop_path", "save_every")}  # fmt: skip
    options.update(dataclasses.asdict(cfg.recipe), steps=cfg.recipe.total_steps)
    del options["total_steps"]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return [*args, "--no-progress"]


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, steps=6), on_step=_interrupt_at(2), log=quiet)
    before = weights(run / "last.pth")
    # A child resumes and is SIGKILLed half-way through writing its step-3 checkpoint.
    child = textwrap.dedent(f"""
        import os, signal, sys, torch
        def dying_save(obj, f):
            f.write(b"\\x50\\x4b" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        from fastvit.train import main
        sys.exit(main({[*_cli(tiny(run, steps=6, save_every=1)), "--resume", str(run)]!r}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list(run.glob(".resume.pth.*.tmp")), "the kill did not land inside the save"
    state = torch.load(run / "resume.pth", map_location="cpu", weights_only=False)
    assert state["step"] == 2
    after = weights(run / "last.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert main([*_cli(tiny(run, steps=6)), "--resume", str(run)]) == 0  # and the run still resumes
    assert torch.load(run / "resume.pth", map_location="cpu", weights_only=False)["step"] == 6


def test_train_step_amp_bf16_and_fp16_with_grad_scaler() -> None:
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,))
    for amp in ("bf16", "fp16"):
        torch.manual_seed(0)
        model = fastvit.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, **TINY_ARGS)
        before = [p.detach().clone() for p in model.parameters()]
        step = TrainStep(model, Recipe(amp=amp, warmup_steps=0, total_steps=40), torch.device("cpu"))
        assert step.scaler.is_enabled() == (amp == "fp16")
        stats = [step([(x, y)])]
        if amp == "fp16":
            # GradScaler starts at 2**16: fp16 gradients overflow, the update is skipped and the scale halved
            # until they fit, as torch.amp documents.
            assert stats[0].skipped and not torch.isfinite(stats[0].grad_norm)
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            assert step.scaler.get_scale() == 2.0**15
            while stats[-1].skipped and len(stats) < 30:
                stats.append(step([(x, y)]))
        last = stats[-1]
        assert not last.skipped and torch.isfinite(last.loss) and 0 < float(last.grad_norm) < 1e3
        assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) == len(before)
        lr = 3e-2 * WarmupSchedule("cosine", 0, 40)(len(stats))
        assert step.optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_missing_datasets_name_the_files_and_the_place(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        train(tiny(tmp_path / "o", dataset="cifar10", data_dir=str(tmp_path / "nowhere"), num_classes=None), log=quiet)
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg and "never downloads" in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.*train, test, meta"):
        train(tiny(tmp_path / "o", dataset="cifar100", data_dir=str(tmp_path), num_classes=None), log=quiet)
    with pytest.raises(DatasetNotFoundError, match=r"ImageFolder tree not found: expected .*/train/<class>/<image>"):
        train(tiny(tmp_path / "o", dataset="imagefolder", data_dir=str(tmp_path)), log=quiet)


def test_bad_options_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"multiple of world size x accum steps = 1 x 4 = 4"):
        train(tiny(tmp_path, batch_size=10, accum_steps=4), log=quiet)
    with pytest.raises(ValueError, match="exactly one of --model NAME"):
        train(tiny(tmp_path, timm="vit_tiny_patch16_224"), log=quiet)
    with pytest.raises(ValueError, match="--fsdp shards over several processes"):
        train(tiny(tmp_path, fsdp=True), log=quiet)
    with pytest.raises(ValueError, match="warmup steps must be in"):
        train(tiny(tmp_path, warmup_steps=6), log=quiet)
    with pytest.raises(ValueError, match="fewer than one global batch of 512"):
        train(tiny(tmp_path, batch_size=512), log=quiet)
    assert main(["--model", "vit_tiny_patch16_224", "--dataset", "synthetic", "--pretrained", "/no/such.npz"]) == 2
    assert "--pretrained /no/such.npz: no such file" in capsys.readouterr().err


def test_resume_refuses_another_model_or_world_size(tmp_path: Path) -> None:
    train(tiny(tmp_path, steps=2, warmup_steps=0), log=quiet)
    other = dict(TINY_ARGS, depth=3)
    with pytest.raises(ResumeError, match="it trains another model") as err:
        train(tiny(tmp_path / "x", steps=4, model_args=other, resume=str(tmp_path)), log=quiet)
    assert f"--pretrained {tmp_path / 'last.pth'}" in str(err.value)
    state = torch.load(tmp_path / "resume.pth", map_location="cpu", weights_only=False)
    state["world_size"] = 8
    torch.save(state, tmp_path / "w8.pth")
    with pytest.raises(ResumeError, match="written by 8 processes and this run has 1.*resume with 8 processes"):
        train(tiny(tmp_path / "x", steps=4, resume=str(tmp_path / "w8.pth")), log=quiet)
    with pytest.raises(ResumeError, match="no resume file at"):
        train(tiny(tmp_path / "x", resume=str(tmp_path / "x" / "nothing")), log=quiet)


def test_benchmark_training_column_times_the_fastvit_train_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from _harness import rows
    from _harness.measure import Settings, run_cell
    from _harness.providers import provider_by_key

    seen: list[tuple[Any, ...]] = []
    step_call = TrainStep.__call__

    def spy(self: TrainStep, micro_batches: Any) -> Any:
        r = self.recipe
        seen.append((r.amp, r.clip_grad, r.accum_steps, type(self.optimizer).__name__, self.scaler.is_enabled()))
        return step_call(self, micro_batches)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    kwargs = {"img_size": 16, **TINY_ARGS}
    row = rows.ModelRow("vit_tiny_patch16_224", "tiny", "classification", 16, 4, 2, num_classes=4, model_kwargs=kwargs)
    s = Settings(device=torch.device("cpu"), dtype=torch.bfloat16, iters=20, warmup=1, train_batch=2)
    result = run_cell(row, provider_by_key("fastvit_torch"), ("train",), s)["train"]
    assert result["status"] == "ok" and result["values"]["img_s"] > 0
    assert "fastvit.train's step" in result["notes"][0] and "amp bf16" in result["notes"][0]
    assert len(seen) >= 21 and set(seen) == {("bf16", 1.0, 1, "SGD", False)}


def test_imagefolder_tree_trains_with_the_weights_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in ("cat", "dog", "eel"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "data" / split / c / f"{i}.png")
    cfg = tiny(tmp_path / "run", dataset="imagefolder", data_dir=str(tmp_path / "data"), num_classes=None,
               batch_size=8, steps=3, warmup_steps=0, eval_every=3)  # fmt: skip
    result = train(cfg, log=quiet)
    assert result.step == 3 and set(result.metrics) == {"loss", "top1", "top5"}
    assert weights(tmp_path / "run" / "last.pth")["head.weight"].shape == (3, 32)  # 3 class folders
    # 9 eval images in 3 classes: top-1 is a multiple of 1/9, top-3 (= top-5 capped at 3 classes) is 1.
    assert (
        round(result.metrics["top1"] * 9, 6) == int(round(result.metrics["top1"] * 9)) and result.metrics["top5"] == 1
    )

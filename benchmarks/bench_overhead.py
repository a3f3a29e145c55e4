"""Host overhead: the time fastvit spends on the CPU per call, where the kernels are not the bottleneck.

Two tables, both medians of interleaved rounds (every candidate runs once per round, in turn, so drift
in the machine's speed hits them all alike), on one thread:

* **model**: a host-bound proxy ViT (12 blocks, width 16, 1 head, 5 tokens, batch 1: a forward is
  almost all Python and dispatcher time) as timm eager, as the fastvit model and as timm +
  ``fastvit.patch_model``; per inference forward (``torch.inference_mode``) and per forward + backward;
  ratios against timm eager (goal: <= 0.9x).
* **op**: host time per forward call of every fastvit op against the torch op(s) it replaces, on tiny
  inputs, without grad and with inputs requiring grad (the graph is recorded) (goal: <= 1.2x).

Runs on a CPU (torch backend, what auto picks there) and on a GPU (``--device cuda``: auto, i.e. the
measured choice; the GPU is synchronised once per timed batch of calls, so host time dominates). On a CPU
the clock is this process's CPU time (``--clock process``): on one thread that is the host time, and other
load on a shared machine does not inflate it.

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--rounds 15] [--calls 100] [--json PATH]
"""

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import fastvit
from fastvit import ops
from fastvit.fileio import atomic_write_text

PROXY = {"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 12, "num_heads": 1, "num_classes": 10}


CLOCK: List[Callable[[], float]] = [time.perf_counter]


def interleaved_us(candidates: Dict[str, Callable[[], Any]], *, rounds: int, calls: int, sync: Callable[[], None]):
    """Median over ``rounds`` of the mean µs per call of ``calls`` back-to-back calls, candidates interleaved."""
    clock = CLOCK[0]
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up: caches, lazy inits, the measured dispatch's first timing
        for _ in range(3):
            fn()
    sync()
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = clock()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((clock() - t0) / calls * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def proxy_models(device: torch.device) -> Dict[str, torch.nn.Module]:
    import timm

    torch.manual_seed(0)
    timm_model = timm.models.vision_transformer.VisionTransformer(**PROXY).to(device)
    fv = fastvit.models.vit.VisionTransformer(**PROXY).to(device)
    fv.load_state_dict(timm_model.state_dict())
    patched = timm.models.vision_transformer.VisionTransformer(**PROXY).to(device)
    patched.load_state_dict(timm_model.state_dict())
    fastvit.patch_model(patched)
    return {"timm eager": timm_model, "fastvit model": fv, "timm + patch_model": patched}


def model_rows(device: torch.device, rounds: int, calls: int, sync: Callable[[], None]) -> List[Dict[str, Any]]:
    models = proxy_models(device)
    x = torch.randn(1, 3, PROXY["img_size"], PROXY["img_size"], device=device)
    with torch.no_grad():
        ref = models["timm eager"](x)
        for name, m in models.items():
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4, msg=lambda s, n=name: f"{n}: {s}")

    def infer(m: torch.nn.Module) -> Callable[[], Any]:
        m.eval()

        def run() -> Any:
            with torch.inference_mode():
                return m(x)

        return run

    def train(m: torch.nn.Module) -> Callable[[], Any]:
        def run() -> None:
            m(x).sum().backward()

        return run

    rows = []
    for mode, make in (("inference forward", infer), ("forward + backward", train)):
        if mode == "forward + backward":
            for m in models.values():
                m.train()
        times = interleaved_us({n: make(m) for n, m in models.items()}, rounds=rounds, calls=calls, sync=sync)
        base = times["timm eager"]
        for name, us in times.items():
            rows.append({"table": "model", "mode": mode, "what": name, "us": us, "vs_timm": us / base})
    return rows


def op_cases(device: torch.device, grad: bool) -> List[Tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """(name, fastvit call, the torch call(s) it replaces) on tiny inputs (requiring grad when ``grad``:
    the forward then records the autograd graph, as in training)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    x, res, w, b = t(1, 5, 16), t(1, 5, 16), t(16), t(16)
    w1, b1, w2, b2 = t(64, 16), t(64), t(16, 64), t(16)
    wq, bq = t(48, 16), t(48)
    qkv = t(1, 5, 48)
    q, k, v = t(1, 1, 5, 16), t(1, 1, 5, 16), t(1, 1, 5, 16)
    img, wp, bp = t(1, 3, 32, 32), t(16, 3, 16, 16), t(16)
    cls, pos = t(1, 1, 16), t(1, 5, 16)
    tok = t(1, 64, 8)
    h = t(1, 5, 64)

    def ln_residual_torch() -> Tuple[torch.Tensor, torch.Tensor]:
        z = x + res
        return F.layer_norm(z, (16,), w, b, 1e-6), z

    def packed_torch() -> torch.Tensor:
        qq, kk, vv = qkv.view(1, 5, 3, 1, 16).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(qq, kk, vv).transpose(1, 2).reshape(1, 5, 16)

    def patch_torch() -> torch.Tensor:
        y = F.conv2d(img, wp, bp, stride=16).flatten(2).transpose(1, 2)
        return torch.cat([cls, y], dim=1) + pos

    def unfold_torch() -> torch.Tensor:
        return F.unfold(tok.transpose(1, 2).reshape(1, 8, 8, 8), 3, stride=2, padding=1).transpose(1, 2)

    return [
        ("layer_norm", lambda: ops.layer_norm(x, w, b, 1e-6), lambda: F.layer_norm(x, (16,), w, b, 1e-6)),
        (
            "layer_norm + residual",
            lambda: ops.layer_norm(x, w, b, 1e-6, residual=res),
            lambda: ln_residual_torch(),
        ),
        ("linear", lambda: ops.linear(x, wq, bq), lambda: F.linear(x, wq, bq)),
        ("linear + gelu", lambda: ops.linear(x, w1, b1, activation="gelu"), lambda: F.gelu(F.linear(x, w1, b1))),
        ("linear + residual", lambda: ops.linear(h, w2, b2, residual=res), lambda: F.linear(h, w2, b2) + res),
        ("attention", lambda: ops.attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v)),
        ("attention_qkvpacked", lambda: ops.attention_qkvpacked(qkv, 1), packed_torch),
        (
            "patch_embed",
            lambda: ops.patch_embed(img, wp, bp, patch_size=16, pos_embed=pos, prefix_tokens=cls),
            patch_torch,
        ),
        ("soft_split", lambda: ops.soft_split(tok, kernel_size=3, stride=2, padding=1, hw=(8, 8)), unfold_torch),
    ]


def op_rows(device: torch.device, rounds: int, calls: int, sync: Callable[[], None]) -> List[Dict[str, Any]]:
    rows = []
    for mode in ("no grad", "grad"):
        for name, fv, ref in op_cases(device, grad=mode == "grad"):
            torch.testing.assert_close(fv(), ref(), rtol=1e-4, atol=1e-4, msg=lambda s, n=name: f"{n}: {s}")
            times = interleaved_us({"fastvit": fv, "torch": ref}, rounds=rounds, calls=calls, sync=sync)
            rows.append(
                {
                    "table": "op",
                    "mode": mode,
                    "what": name,
                    "us": times["fastvit"],
                    "torch_us": times["torch"],
                    "vs_torch": times["fastvit"] / times["torch"],
                }
            )
    return rows


def main(argv: Sequence[str] = ()) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: host time only)")
    p.add_argument("--only", choices=("model", "op"), default=None)
    p.add_argument(
        "--clock",
        choices=("auto", "process", "wall"),
        default="auto",
        help="process: this process's CPU time (host time on one thread, robust to other load on the machine); "
        "wall: perf_counter; auto: process on the CPU, wall on a GPU (host time there includes the waits)",
    )
    p.add_argument("--json", default=None, help="write the rows (and the environment) to this JSON file")
    args = p.parse_args(list(argv) or None)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_overhead.py: --device cuda but torch sees no GPU; run with --device cpu")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    process = args.clock == "process" or (args.clock == "auto" and device.type == "cpu")
    CLOCK[0] = time.process_time if process else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows: List[Dict[str, Any]] = []
    if args.only in (None, "model"):
        rows += model_rows(device, args.rounds, args.calls, sync)
    if args.only in (None, "op"):
        rows += op_rows(device, args.rounds, args.calls, sync)
    print(
        f"host time per call, device {device}, {args.threads} thread(s), {'process CPU' if process else 'wall'} "
        f"clock, median of {args.rounds} interleaved rounds of {args.calls} calls"
    )
    for r in rows:
        if r["table"] == "model":
            print(f"model  {r['mode']:<18} {r['what']:<20} {r['us']:9.1f} us  {r['vs_timm']:.2f}x timm eager")
        else:
            print(
                f"op     {r['mode']:<18} {r['what']:<22} {r['us']:7.1f} us  torch {r['torch_us']:7.1f} us  "
                f"{r['vs_torch']:.2f}x"
            )
    if args.json:
        from _harness.report import environment

        payload = {
            "benchmark": "bench_overhead",
            "args": vars(args),
            "environment": environment(
                device, "python benchmarks/bench_overhead.py " + " ".join(list(argv) or sys.argv[1:])
            ),
            "rows": rows,
        }
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()

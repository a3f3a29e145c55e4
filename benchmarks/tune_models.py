"""Measured-dispatch tables of whole models: ``fastvit.tune`` on each model, batch and mode (issue #14 item 5).

For every (model, batch, mode) it builds the fastvit model in the dtype on the device, runs
:func:`fastvit.tune` on one forward (inference: ``torch.inference_mode``-free eval forward without grad;
training: forward + backward in train mode), and records the table it returns: per op signature the
backend chosen, the median time of every backend timed (torch's own composition included) and the
refusals with their reasons. The choices also land in the dispatch cache (``FASTVIT_DISPATCH_CACHE``), so
the same machine starts from them later.

    python benchmarks/tune_models.py                      # ViT-B/16, DeiT-S, T2T-ViT-t-14; bs 256 and 1; bf16
    python benchmarks/tune_models.py --models vit_base_patch16_224 --batches 1 --modes inference --json t.json

On a CPU the table says, per op, that nothing is measured there (auto always runs torch on CPU tensors);
that is what the test of this script checks. The output is JSON (written atomically) with the
environment record of every benchmark, plus a markdown summary on stdout: per op, how often each backend
won, and the time of the winner against torch's composition.
"""

import argparse
import collections
import json
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

DEFAULT_MODELS = ("vit_base_patch16_224", "deit_small_patch16_224", "t2t_vit_t_14")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="fastvit model names")
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1])
    p.add_argument("--modes", nargs="+", choices=("inference", "training"), default=["inference", "training"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda", help="cuda (default; exits 0 with a message without a GPU) or cpu")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own)")
    p.add_argument("--json", default=None, help="output file (default: benchmarks/results/tune_<gpu>_<date>.json)")
    args = p.parse_args(argv)
    bad = [b for b in args.batches if b < 1]
    if bad:
        p.error(f"--batches must be positive integers, got {bad}")
    return args


def tune_one(name: str, batch: int, mode: str, dtype: torch.dtype, device: torch.device, img_size=None) -> dict:
    """One row: the table ``fastvit.tune`` returns for ``name`` at ``batch`` in ``mode``, with its wall time."""
    import fastvit

    kwargs = {} if img_size is None else {"img_size": img_size}
    model = fastvit.create_model(name, **kwargs).to(device=device, dtype=dtype)
    model.train(mode == "training")
    side = img_size or model.default_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    start = time.perf_counter()
    table = fastvit.tune(model, x, backward=mode == "training")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "model": name, "batch": batch, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
        "img_size": side, "tune_s": round(time.perf_counter() - start, 3), "table": table,
    }  # fmt: skip


def summary(rows: List[Dict[str, Any]]) -> str:
    """Markdown: per (op, mode), how often each backend won, and the winner's median time over torch's."""
    wins: Dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    speedups: Dict[tuple, List[float]] = collections.defaultdict(list)
    unmeasured: Dict[tuple, set] = collections.defaultdict(set)
    for row in rows:
        for key, entry in row["table"].items():
            op = str(key).split("|")[0]
            at = (op, row["mode"])
            if not entry.get("measured", True):
                unmeasured[at].add(str(entry.get("why", "not measured")))
                continue
            wins[at][entry.get("backend")] += 1
            times = entry.get("times_ms") or {}
            if "torch" in times and entry.get("backend") in times and times[entry["backend"]]:
                speedups[at].append(times["torch"] / times[entry["backend"]])
    lines = ["| op | mode | wins | median torch / winner | not measured |", "|---|---|---|---|---|"]
    for at in sorted(set(wins) | set(unmeasured)):
        won = ", ".join(f"{b}: {n}" for b, n in wins[at].most_common()) or "-"
        sp = f"{statistics.median(speedups[at]):.2f}x" if speedups[at] else "-"
        lines.append(f"| {at[0]} | {at[1]} | {won} | {sp} | {'; '.join(sorted(unmeasured[at])) or '-'} |")
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tune_models: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure. "
              "Run with --device cpu to check the script.", file=sys.stderr)  # fmt: skip
        return 0
    from _harness.report import environment

    from fastvit.fileio import atomic_write_text

    rows = []
    for name in args.models:
        for batch in args.batches:
            for mode in args.modes:
                try:
                    rows.append(tune_one(name, batch, mode, DTYPES[args.dtype], device, args.img_size))
                except torch.cuda.OutOfMemoryError as e:  # a row of its own: the others still run
                    torch.cuda.empty_cache()
                    rows.append({"model": name, "batch": batch, "mode": mode, "error": f"out of memory: {e}"[:300]})
                print(f"tune_models: {name} bs{batch} {mode}: "
                      f"{rows[-1].get('error') or str(len(rows[-1]['table'])) + ' keys'}", file=sys.stderr)  # fmt: skip
    ok = [r for r in rows if "table" in r]
    print(summary(ok))
    env = environment(device)
    path = args.json
    if path is None:
        import os

        gpu = (env.get("gpu") or device.type).replace(" ", "_").replace("/", "_")
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            f"tune_{gpu}_{time.strftime('%Y%m%d_%H%M%S')}.json")  # fmt: skip
    atomic_write_text(path, json.dumps({"environment": env, "rows": rows}, indent=1, default=str) + "\n")
    print(f"tune_models: wrote {path}", file=sys.stderr)
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())

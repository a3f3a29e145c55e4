"""Compiles recorded Triton launches for real GPU targets, without a GPU (run by tests/test_gpu_compile.py).

Reads JSON records on stdin: one per distinct launch seen under the interpreter, with the kernel's
module and name and each argument described by kind (tensor dtype, int, float, bool, None). Imports
the kernel modules *without* TRITON_INTERPRET, so autotuned kernels carry their GPU configuration
lists, and compiles every (launch, GPU config, target) through ptxas. Prints one JSON result per
compile on stdout, and every module-level kernel that no record reached.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# benchmarks/ itself, not the package: tests/benchmarks (this script's folder is first on sys.path) shadows it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from kernel_report import compile_all, launch_spec, launched, pruned, unwrap  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastvit.kernels._common import is_autotuner, is_heuristics, kernel_function  # noqa: E402


def _autotuners(record: dict) -> list[str]:
    """Module attributes that autotune the recorded kernel. Their GPU configuration lists are what a GPU
    launch compiles, so they replace the interpreter's launch constexprs."""
    module = importlib.import_module(record["module"])
    names = []
    for attr, obj in vars(module).items():
        if is_autotuner(obj) and kernel_function(obj).__name__ == record["name"]:
            names.append(attr)
    return names


def main() -> None:
    records = json.load(sys.stdin)
    specs = {}
    expanded = []
    for record in records:
        tuners = _autotuners(record)
        expanded += [dict(record, wrapper=t) for t in tuners] if tuners else [dict(record, wrapper=None)]
    # One representative launch per (wrapper, kernel) sweeps every GPU config on both targets; the other
    # launches (dtypes, constexpr variants) compile with the first surviving config on sm_90 only. That
    # catches config-specific failures (tile shapes, shared memory) and variant-specific ones (dtypes,
    # branches) at a fraction of the full cross product.
    groups: dict[tuple, list] = {}
    for record in expanded:
        groups.setdefault((record["module"], record["wrapper"], record["name"]), []).append(record)
    for group in groups.values():
        group.sort(
            key=lambda r: (not any(a.get("dtype") == "float16" for a in r["args"].values()), bool(r.get("dtype_swap")))
        )
        for index, record in enumerate(group):
            obj = launched(record)
            _, configs, _ = unwrap(obj)
            plan = []
            for cc in (80, 90) if index == 0 else (90,):
                try:  # the prune answers for the target: its shared memory per block
                    kept = pruned(obj, record, configs, cc) if configs else [None]
                except Exception as exc:  # a prune that raises breaks every GPU launch of this kernel
                    failure = {"kernel": f"{record['module']}.{record.get('wrapper') or record['name']}", "sm": cc,
                               "config": "early_config_prune", "bf16": bool(record.get("dtype_swap")), "ok": False,
                               "error": f"the autotuner's prune raised {type(exc).__name__}: {exc}"}  # fmt: skip
                    print(json.dumps(failure), flush=True)
                    continue
                plan += [(cc, c) for c in kept] if index == 0 else [(cc, kept[0])]
            for cc, config in plan:
                try:
                    spec = launch_spec(record, cc, config)
                except Exception as exc:
                    print(
                        json.dumps(
                            {
                                "kernel": f"{record['module']}.{record['name']}",
                                "sm": cc,
                                "config": str(config),
                                "bf16": bool(record.get("dtype_swap")),
                                "ok": False,
                                "error": f"{type(exc).__name__}: {exc}",
                            }
                        ),
                        flush=True,
                    )
                    continue
                specs[spec] = None
    compiled = set()
    for result in compile_all(list(specs), log=sys.stderr):
        compiled.add(result.get("fn", result["kernel"]))
        print(json.dumps(result), flush=True)
    # Every launchable kernel (named *_kernel, or wrapped by autotune / heuristics) in an exercised module
    # must have been compiled at least once; plain @triton.jit device helpers are compiled inside them.
    for mod_name in sorted({r["module"] for r in records}):
        module = importlib.import_module(mod_name)
        for attr, obj in vars(module).items():
            if not (isinstance(obj, JITFunction) or is_autotuner(obj) or is_heuristics(obj)):
                continue
            py_fn = kernel_function(obj)
            launchable = attr.endswith("_kernel") or not isinstance(obj, JITFunction)
            if launchable and py_fn.__module__ == mod_name and f"{mod_name}.{py_fn.__name__}" not in compiled:
                print(json.dumps({"kernel": f"{mod_name}.{attr}", "unexercised": True}), flush=True)


if __name__ == "__main__":
    main()

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
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Largest dynamic shared memory one block may use (bytes): A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64",
           "int8": "i8", "uint8": "u8", "bool": "i1"}  # fmt: skip
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _unwrap(obj):
    """(JITFunction, autotune configs or None, heuristics dicts outermost first) behind the wrappers."""
    configs, heuristics = None, []
    while not isinstance(obj, JITFunction):
        if hasattr(obj, "configs") and configs is None:
            configs = list(obj.configs)
        if hasattr(obj, "values") and isinstance(obj.values, dict):
            heuristics.append(obj.values)
        obj = obj.fn
    return obj, configs, heuristics


def _launched(record: dict):
    """The module attribute the launch went through (the autotune / heuristics wrapper, if any)."""
    module = importlib.import_module(record["module"])
    return getattr(module, record.get("wrapper") or record["name"])


def _autotuners(record: dict) -> list[str]:
    """Module attributes that autotune the recorded kernel. Their GPU configuration lists are what a GPU
    launch compiles, so they replace the interpreter's launch constexprs."""
    module = importlib.import_module(record["module"])
    names = []
    for attr, obj in vars(module).items():
        if hasattr(obj, "configs") and hasattr(obj, "fn"):
            fn, _, _ = _unwrap(obj)
            if fn.fn.__name__ == record["name"]:
                names.append(attr)
    return names


def _pruned(obj, record: dict, configs: list) -> list:
    """The configs the autotuner's own early prune keeps for this launch, called the way Triton's
    Autotuner calls it: positional arguments by name, then the launcher's keyword arguments (not the
    config's own) as keywords."""
    import torch

    prune = getattr(obj, "early_config_prune", None)
    if prune is None:
        return configs
    config_keys = {k for c in configs for k in c.kwargs}
    named, keywords = {}, {}
    for name, desc in record["args"].items():
        if desc["kind"] == "tensor":
            dtype = "bfloat16" if record.get("dtype_swap") and desc["dtype"] == "float16" else desc["dtype"]
            value = torch.empty(0, dtype=getattr(torch, dtype), device="meta")
        else:
            value = desc.get("value")
        if not desc.get("keyword"):
            named[name] = value
        elif name not in config_keys and name not in _LAUNCH_OPTIONS:
            keywords[name] = value
    kept = list(prune(configs, named, **keywords))
    if not kept:
        raise RuntimeError(f"{record['name']}: the autotuner's prune keeps no configuration for this launch")
    return kept


def _type(desc: dict) -> str:
    kind = desc["kind"]
    if kind == "tensor":
        return "*" + _DTYPES[desc["dtype"]]
    if kind == "int":
        return "i32" if -(2**31) <= desc["value"] < 2**31 else "i64"
    if kind == "float":
        return "fp32"
    if kind == "bool":
        return "i1"
    raise ValueError(f"cannot type {desc}")


def _spec(record: dict, target_cc: int, config) -> tuple:
    """(kernel key, signature, constexprs, options): everything the compiled binary depends on."""
    fn, _, heuristics = _unwrap(_launched(record))
    args = dict(record["args"])
    options = {k: v["value"] for k, v in args.items() if k in _LAUNCH_OPTIONS}
    if config is not None:
        for key, value in config.kwargs.items():
            args[key] = {"kind": "constexpr", "value": value}
        options.update({k: getattr(config, k) for k in ("num_warps", "num_stages") if getattr(config, k, None)})
        # Heuristics depend on the config (e.g. EVEN_K on BLOCK_K): evaluate them again, as a launch would.
        values = {k: v.get("value") for k, v in args.items()}
        for layer in heuristics:
            for key, rule in layer.items():
                args[key] = {"kind": "constexpr", "value": rule(values)}
                values[key] = args[key]["value"]
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        desc = args.get(param.name)
        if desc is None:
            if not (param.is_constexpr and param.has_default):
                raise KeyError(f"{record['name']}: no recorded value for parameter {param.name}")
            desc = {"kind": "constexpr", "value": param.default}
        if param.is_constexpr or desc["kind"] in ("none", "constexpr"):
            signature[param.name] = "constexpr"
            constexprs[param.name] = desc.get("value")
        else:
            signature[param.name] = _type(desc)
            if record.get("dtype_swap") and signature[param.name] == "*fp16":
                signature[param.name] = "*bf16"
            # Specialise as a GPU launch does: 16-byte aligned allocations, sizes / strides divisible by 16.
            aligned = desc["kind"] == "tensor" or (desc["kind"] == "int" and desc["value"] and desc["value"] % 16 == 0)
            if aligned and not param.do_not_specialize:
                attrs[str(index)] = True
    key = f"{record['module']}.{record.get('wrapper') or record['name']}|{record['name']}"
    return (
        key, target_cc, json.dumps(signature, sort_keys=True), json.dumps(constexprs, sort_keys=True, default=str),
        json.dumps(options, sort_keys=True), str(config) if config else None, json.dumps(sorted(attrs)),
    )  # fmt: skip


def _compile(spec: tuple) -> dict:
    key, target_cc, signature, constexprs, options, config, aligned = spec
    launched, fn_name = key.split("|")
    mod_name, attr = launched.rsplit(".", 1)
    fn, _, _ = _unwrap(getattr(importlib.import_module(mod_name), attr))
    signature, constexprs = json.loads(signature), json.loads(constexprs)
    bf16 = "*bf16" in signature.values()
    result = {"kernel": launched, "fn": f"{mod_name}.{fn_name}", "sm": target_cc, "config": config, "bf16": bf16}
    try:
        kernel = triton.compile(
            ASTSource(
                fn=fn,
                signature=signature,
                constexprs=constexprs,
                attrs={(int(i),): [["tt.divisibility", 16]] for i in json.loads(aligned)},
            ),
            target=GPUTarget("cuda", target_cc, 32),
            options=json.loads(options),
        )
    except Exception as exc:  # reported to the test, which fails with the message
        return dict(result, ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    ttgir = kernel.asm.get("ttgir", "")
    half = any(t in ("*fp16", "*bf16") for t in signature.values())
    return dict(
        result,
        ok=True,
        shared=kernel.metadata.shared,
        shared_ok=kernel.metadata.shared <= SHARED_LIMIT[target_cc],
        has_dot="tt.dot" in kernel.asm.get("ttir", "") or "warp_group_dot" in ttgir,
        half=half,
        wgmma="warp_group_dot" in ttgir,
    )


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
            obj = _launched(record)
            _, configs, _ = _unwrap(obj)
            try:
                configs = _pruned(obj, record, configs) if configs else [None]
            except Exception as exc:  # a prune that raises breaks every GPU launch of this kernel
                failure = {"kernel": f"{record['module']}.{record.get('wrapper') or record['name']}", "sm": 90,
                           "config": "early_config_prune", "bf16": bool(record.get("dtype_swap")), "ok": False,
                           "error": f"the autotuner's prune raised {type(exc).__name__}: {exc}"}  # fmt: skip
                print(json.dumps(failure), flush=True)
                continue
            plan = [(cc, c) for cc in (80, 90) for c in configs] if index == 0 else [(90, configs[0])]
            for cc, config in plan:
                try:
                    spec = _spec(record, cc, config)
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
    workers = max(1, min(len(specs), os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(_compile, list(specs)):
            compiled.add(result.get("fn", result["kernel"]))
            print(json.dumps(result), flush=True)
    # Every launchable kernel (named *_kernel, or wrapped by autotune / heuristics) in an exercised module
    # must have been compiled at least once; plain @triton.jit device helpers are compiled inside them.
    for mod_name in sorted({r["module"] for r in records}):
        module = importlib.import_module(mod_name)
        for attr, obj in vars(module).items():
            if not (isinstance(obj, JITFunction) or hasattr(obj, "configs") or type(obj).__name__ == "Heuristics"):
                continue
            try:
                fn, _, _ = _unwrap(obj)
            except AttributeError:
                continue
            launchable = attr.endswith("_kernel") or not isinstance(obj, JITFunction)
            if launchable and fn.fn.__module__ == mod_name and f"{mod_name}.{fn.fn.__name__}" not in compiled:
                print(json.dumps({"kernel": f"{mod_name}.{attr}", "unexercised": True}), flush=True)


if __name__ == "__main__":
    main()

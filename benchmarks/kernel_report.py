"""``python benchmarks/kernel_report.py --out DIR``: what the compiler makes of every Triton kernel, no GPU needed.

Every Triton kernel of fastvit, in every autotune configuration its prune keeps, is compiled for sm_90a
(H100/H200) and sm_80 (A100) at the shapes the models run (bf16):

* GEMMs (qkv, proj, fc1 + GELU, fc2 + residual, and fc1's GELU backward with dbias) of ViT-B/16 and
  ViT-L/16@384 at batch 256, DeiT-S at batch 256;
* attention forward and backward at ViT-B/16 (N=197, D=64), ViT-L/16@384 (N=577, D=64), ViT-H/14 (N=257,
  D=80), DeiT-S (N=197, D=64), T2T-ViT-t-14's soft-split token attention (N=3137, D=64);
* LayerNorm (+ residual) forward and backward at C = 768, 1024, 1280;
* patch embedding (fwd with bias + class token + position embedding, dx, dweight) of ViT-B/16 and
  ViT-L/16@384 (3 x 224 x 224 / 3 x 384 x 384, p = 16, D = 768 / 1024) and DeiT-S (D = 384) at batch 256;
* T2T-ViT-t-14's three soft splits at batch 256 (fwd with the fused LayerNorm, LayerNorm backward
  statistics, fold): k7 s4 p2 on the image, k3 s2 p1 on the 56 x 56 and 28 x 28 token grids.

The launches are recorded by calling the kernel modules' own launchers on ``meta`` tensors with Triton's
launch entry points replaced by a recorder, so the report sees exactly the arguments, constexprs and
prunes a GPU launch would; each launch is then compiled with ``triton.compile`` for the target (ptxas
``-v`` log captured) and its cubin disassembled with ``nvdisasm``.

Per (kernel, shape, target, config) it reports registers, spill bytes (stores + loads), shared memory,
CTAs per SM from registers and from shared memory, whether wgmma and TMA are used, the SASS instruction
count (static, and of the main loop and the code after it), and derived figures: for attention, SASS
instructions per score in the key loop (per thread: loop instructions / (BLOCK_M*BLOCK_N / threads));
for GEMMs, epilogue instructions per output element (instructions after the K loop / output elements per
thread). Results are cached by compile spec (``--cache``), compiles run in parallel subprocesses.

Writes ``kernel_report.json`` and ``kernel_report.md`` under ``--out`` (through fastvit.fileio).

The compile engine here (``launch_spec``, ``compile_spec``) is also what tests/gpu_compile_child.py
uses, so the CPU tests and this report read the same numbers.
"""

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Optional

# Largest dynamic shared memory one block may use (bytes), and the SM's register file and thread limits.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {80: 2048, 90: 2048}
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64",
           "int8": "i8", "uint8": "u8", "bool": "i1"}  # fmt: skip
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning


# ------------------------------------------------------------------------------ autotuner plumbing
# Private Triton fields are read only through the adapter in fastvit.kernels._common.


def unwrap(obj: Any) -> tuple:
    """(JITFunction, autotune configs or None, heuristics dicts outermost first) behind the wrappers."""
    from fastvit.kernels._common import unwrap_kernel

    return unwrap_kernel(obj)


def launched(record: dict) -> Any:
    """The module attribute the launch went through (the autotune / heuristics wrapper, if any)."""
    module = importlib.import_module(record["module"])
    return getattr(module, record.get("wrapper") or record["name"])


def pruned(obj: Any, record: dict, configs: list, target_cc: int) -> list:
    """The configs the autotuner's own early prune keeps for this launch on ``target_cc``, called the way
    Triton's Autotuner calls it: positional arguments by name, then the launcher's keyword arguments (not
    the config's own) as keywords. Tensors are meta tensors; the prune reads the target from
    :func:`fastvit.kernels._common.compile_target`."""
    import torch

    from fastvit.kernels._common import autotuner_prune, compile_target, is_autotuner

    prune = autotuner_prune(obj) if is_autotuner(obj) else None
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
        elif name not in config_keys and name not in LAUNCH_OPTIONS:
            keywords[name] = value
    with compile_target(target_cc):
        kept = list(prune(configs, named, **keywords))
    if not kept:
        raise RuntimeError(f"{record['name']}: the autotuner's prune keeps no configuration for this launch")
    return kept


def describe(value: Any) -> dict:
    """A launch argument as JSON: tensors by dtype, scalars by value."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    if value is None:
        return {"kind": "none", "value": None}
    return {"kind": "constexpr", "value": value if isinstance(value, (str, int, float)) else str(value)}


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


def launch_spec(record: dict, target_cc: int, config: Any) -> tuple:
    """(kernel key, target, signature, constexprs, options, config, aligned args): everything the compiled
    binary depends on, as a hashable tuple of strings."""
    fn, _, heuristics = unwrap(launched(record))
    args = dict(record["args"])
    options = {k: v["value"] for k, v in args.items() if k in LAUNCH_OPTIONS}
    if config is not None:
        for key, value in config.kwargs.items():
            args[key] = {"kind": "constexpr", "value": value}
        options.update({k: getattr(config, k) for k in ("num_warps", "num_stages") if getattr(config, k, None)})
        # Heuristics depend on the config (e.g. EVEN_K on BLOCK_K): evaluate them again, as a launch would.
        values = {**{k: v.get("value") for k, v in args.items()}, **options}  # heuristics see num_warps too
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
        # A launch turns an int argument equal to 1 (e.g. a unit stride) into a constexpr, as Triton's
        # specialize_impl does; without it the compiler cannot know the contiguous dimension.
        is_one = desc["kind"] == "int" and desc["value"] == 1 and not param.do_not_specialize
        if param.is_constexpr or is_one or desc["kind"] in ("none", "constexpr"):
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


# ---------------------------------------------------------------------------------- what ptxas made

_PTXAS_LINE = re.compile(
    r"(?P<spill_stores>\d+) bytes spill stores, (?P<spill_loads>\d+) bytes spill loads", re.MULTILINE
)
_REGS = re.compile(r"Used (\d+) registers")
_SASS = re.compile(r"^\s*/\*[0-9a-f]+\*/\s*(?:@!?\w+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_\w+)\)")


def ptxas_usage(log: str) -> dict:
    """Registers and spill bytes from a ``ptxas -v`` log (the kernel's entry, the last one reported)."""
    regs = [int(r) for r in _REGS.findall(log)]
    spills = list(_PTXAS_LINE.finditer(log))
    if not regs or not spills:
        raise RuntimeError(f"no resource report in the ptxas log:\n{log[-2000:]}")
    last = spills[-1]
    return {"registers": regs[-1], "spill_stores": int(last["spill_stores"]), "spill_loads": int(last["spill_loads"])}


def sass_profile(cubin: bytes) -> dict:
    """Instruction counts of the kernel's SASS: total, per opcode family, and the main loop (the backward
    branch whose body holds the most instructions) with the code before and after it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        from triton import knobs

        nvdisasm = knobs.nvidia.nvdisasm.path  # Triton's bundled copy
        text = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    ops, labels, branches = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        m = _SASS.match(line)
        if not m:
            continue
        op = m["op"]
        if op == "NOP":
            continue
        target = _BRANCH_TARGET.search(line)
        if op.startswith("BRA") and target:
            branches.append((len(ops), target.group(1)))
        ops.append(op)
    # The trailing "BRA to itself" after EXIT is padding, not a loop.
    loops = [(labels[t], i) for i, t in branches if t in labels and labels[t] < i]
    main = max(loops, key=lambda span: span[1] - span[0], default=None)
    families: dict[str, int] = {}
    for op in ops:
        family = op.split(".")[0]
        families[family] = families.get(family, 0) + 1
    profile = {
        "instructions": len(ops),
        "opcodes": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "loops": len(loops),
    }
    if main is not None:
        begin, end = main
        body = ops[begin : end + 1]
        profile.update(
            loop_instructions=len(body),
            before_loop=begin,
            after_loop=len(ops) - end - 1,
            loop_opcodes={k: body.count(k) for k in sorted(set(body), key=lambda k: -body.count(k))[:12]},
        )
    return profile


def compile_spec(spec: tuple) -> dict:
    """Compiles one launch spec; returns shared memory, wgmma / TMA use, registers, spills and the SASS
    profile (or ``ok: False`` with the compiler's error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key, target_cc, signature, constexprs, options, config, aligned = spec
    kernel_attr, fn_name = key.split("|")
    mod_name, attr = kernel_attr.rsplit(".", 1)
    fn, _, _ = unwrap(getattr(importlib.import_module(mod_name), attr))
    signature, constexprs = json.loads(signature), json.loads(constexprs)
    bf16 = "*bf16" in signature.values()
    result = {"kernel": kernel_attr, "fn": f"{mod_name}.{fn_name}", "sm": target_cc, "config": config, "bf16": bf16}
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's log to stdout; captured here
        knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
        with contextlib.redirect_stdout(log):
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
    except Exception as exc:  # reported to the caller, which fails with the message
        return dict(result, ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    ttgir = kernel.asm.get("ttgir", "")
    half = any(t in ("*fp16", "*bf16") for t in signature.values())
    try:
        usage = ptxas_usage(log.getvalue())
        profile = sass_profile(kernel.asm["cubin"])
    except Exception as exc:
        return dict(result, ok=False, error=f"resource report: {type(exc).__name__}: {exc}")
    warps = kernel.metadata.num_warps
    threads = 32 * warps
    shared = kernel.metadata.shared
    # Registers are allocated per warp in units of 256 (8 per thread); each CTA also reserves 1 KB of smem.
    regs_per_warp = -(-usage["registers"] * 32 // 256) * 256
    ctas_regs = REGISTERS_PER_SM // (regs_per_warp * warps) if usage["registers"] else 32
    ctas_smem = SHARED_PER_SM[target_cc] // (shared + 1024)
    return dict(
        result,
        ok=True,
        shared=shared,
        shared_ok=shared <= SHARED_LIMIT[target_cc],
        has_dot="tt.dot" in kernel.asm.get("ttir", "") or "warp_group_dot" in ttgir,
        half=half,
        wgmma="warp_group_dot" in ttgir,
        tma="async_tma" in ttgir or "tma_load" in ttgir or "descriptor_load" in kernel.asm.get("ttir", ""),
        num_warps=warps,
        threads=threads,
        **usage,
        spills=usage["spill_stores"] + usage["spill_loads"],
        ctas_per_sm_regs=ctas_regs,
        ctas_per_sm_smem=ctas_smem,
        ctas_per_sm=min(ctas_regs, ctas_smem, MAX_THREADS_PER_SM[target_cc] // threads),
        sass=profile,
    )


def compile_all(specs: list, workers: Optional[int] = None, cache: Optional[str] = None, log: Any = None) -> list:
    """compile_spec over ``specs`` in spawned worker processes, reusing results cached in ``cache`` (a JSON
    file keyed by the spec's hash and the Triton version); progress lines go to ``log`` (default stdout)."""
    import triton

    from fastvit.fileio import atomic_write_text

    def source_key(kernel_attr: str) -> str:  # the kernel's source and its helpers' (Triton's own cache key)
        mod_name, attr = kernel_attr.split("|")[0].rsplit(".", 1)
        return unwrap(getattr(importlib.import_module(mod_name), attr))[0].cache_key

    sources = {spec[0]: source_key(spec[0]) for spec in specs}

    def digest(spec: tuple) -> str:
        text = json.dumps([triton.__version__, sources[spec[0]], *spec], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    known: dict = {}
    if cache and os.path.exists(cache):
        with open(cache) as f:
            known = json.load(f)
    todo = list({digest(s): s for s in specs if digest(s) not in known}.values())
    if todo:
        workers = max(1, min(len(todo), workers or os.cpu_count() or 1))
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done, (spec, result) in enumerate(zip(todo, pool.map(compile_spec, todo)), 1):
                if result.get("ok"):
                    known[digest(spec)] = result
                else:
                    known.setdefault("_failed", {})[digest(spec)] = result
                if cache and (done % 8 == 0 or done == len(todo)):  # an interrupted run keeps what it compiled
                    atomic_write_text(cache, json.dumps(known))
                name = result.get("fn", result["kernel"]).rsplit(".", 1)[1]
                print(f"  compiled {done}/{len(todo)}: {name} sm_{result['sm']}", file=log or sys.stdout, flush=True)
    failed = known.get("_failed", {})
    return [known.get(digest(s)) or failed[digest(s)] for s in specs]


# ------------------------------------------------------------------------ launches at the goal shapes


def _is_launch_point(module_attr: Any, wrapper: Any) -> bool:
    """Whether a kernel module's attribute is ``wrapper``: the object itself, or a
    ``fastvit.kernels._common.LazyAutotune`` whose built Autotuner it is."""
    from fastvit.kernels._common import launch_wrapper

    return module_attr is wrapper or launch_wrapper(module_attr) is wrapper


def record_launches(exercise: Callable[[], None]) -> list:
    """Runs ``exercise`` (kernel-module launchers on meta tensors) with Triton's launch entry points
    replaced: every autotuned or plain launch is recorded as the JSON record compile_spec's callers take,
    and nothing runs."""
    import inspect

    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    from fastvit.kernels._common import autotuner_set_best_config, is_autotuner, kernel_function

    records = {}
    originals = {cls: cls.run for cls in (JITFunction, Autotuner, Heuristics)}

    def record(self, args, kwargs):
        fn, configs, _ = unwrap(self)
        py_fn = kernel_function(fn)
        names = list(inspect.signature(py_fn).parameters)
        described = {name: describe(v) for name, v in zip(names, args)}
        described.update({k: dict(describe(v), keyword=True) for k, v in kwargs.items() if k not in ("grid", "warmup")})
        module = sys.modules[py_fn.__module__]
        wrapper = next((a for a, o in vars(module).items() if _is_launch_point(o, self)), None)
        entry = {"module": py_fn.__module__, "name": py_fn.__name__, "wrapper": wrapper, "args": described}
        records[json.dumps(entry, sort_keys=True)] = entry
        if configs and is_autotuner(self):
            autotuner_set_best_config(self, configs[0])  # the launchers read it after a tuned launch

    def fake_run(self, *args, **kwargs):
        record(self, args, kwargs)

    def heuristics_run(self, *args, **kwargs):  # a heuristics wrapper named in the module is the launch point
        module = sys.modules[kernel_function(self).__module__]
        if any(_is_launch_point(o, self) for o in vars(module).values()):
            return fake_run(self, *args, **kwargs)
        return originals[Heuristics](self, *args, **kwargs)

    JITFunction.run, Autotuner.run, Heuristics.run = fake_run, fake_run, heuristics_run
    try:
        exercise()
    finally:
        for cls, run in originals.items():
            cls.run = run
    return list(records.values())


# (label, rows M, in K, out N, activation, residual?) per model at batch 256 (197 tokens; 577 at 384).
GEMMS = {
    "ViT-B/16 bs256": (256 * 197, 768),
    "ViT-L/16@384 bs256": (256 * 577, 1024),
    "DeiT-S bs256": (256 * 197, 384),
}
# (label, batch, heads, tokens, head dim)
ATTENTION = {
    "ViT-B/16 bs256": (256, 12, 197, 64),
    "ViT-L/16@384 bs256": (256, 16, 577, 64),
    "ViT-H/14 bs256": (256, 16, 257, 80),
    "DeiT-S bs256": (256, 6, 197, 64),
    "T2T-ViT-t-14 N=3137 bs64": (64, 1, 3137, 64),
}
LAYER_NORM = {"C=768": (256 * 197, 768), "C=1024": (256 * 577, 1024), "C=1280": (256 * 257, 1280)}


# (label, batch, image side, patch, embedding width D, prefix tokens): the patch embeddings (conv as GEMMs).
PATCH_EMBED = {
    "ViT-B/16 bs256": (256, 224, 16, 768, 1),
    "ViT-L/16@384 bs256": (256, 384, 16, 1024, 1),
    "DeiT-S bs256": (256, 224, 16, 384, 1),
}
# T2T-ViT-t-14's three soft splits at batch 256 (fastvit/models/t2t.py, mission.md section 3): (label, batch,
# channels, grid side, kernel, stride, padding, token input?, fused LayerNorm?). Stage 0 unfolds the 3 x 224 x 224
# image (k7 s4 p2 -> 56 x 56 x 147) with attention1.norm1 fused; stage 1 the 56 x 56 x 64 tokens (k3 s2 p1 ->
# 28 x 28 x 576) with attention2.norm1 fused; stage 2 the 28 x 28 x 64 tokens (k3 s2 p1 -> 14 x 14 x 576), no norm.
SOFT_SPLIT = {
    "T2T-ViT-t-14 split0 bs256": (256, 3, 224, 7, 4, 2, False, True),
    "T2T-ViT-t-14 split1 bs256": (256, 64, 56, 3, 2, 1, True, True),
    "T2T-ViT-t-14 split2 bs256": (256, 64, 28, 3, 2, 1, True, False),
}


# Kernels that only some targets run (the launcher's reasons send the others elsewhere): compiled for those.
# The persistent TMA GEMM needs sm_90+ (linear_tma.reasons); sm_80 runs the pointer GEMM.
KERNEL_TARGETS = {"_linear_tma_kernel": (90,)}


def _gemm_launches(rows: int, width: int, dtype: Any) -> list:
    """(label, kind, thunk) for the GEMMs of one transformer block: qkv, proj (+ residual), fc1 + GELU,
    fc2 + residual, and fc1's GELU backward with dbias. Each forward records the pointer kernel (what
    ``linear_fwd`` launches on a meta tensor) and the persistent TMA kernel (``linear_tma_fwd``, which the
    measured dispatch picks on sm_90 where it is faster), both at the same shape."""
    import torch

    from fastvit.kernels import linear, linear_tma
    from fastvit.kernels._common import compile_target

    meta = {"device": "meta", "dtype": dtype}

    def fwd(k: int, n: int, activation: Optional[str], residual: bool) -> Callable[[], None]:
        def run() -> None:
            x, w, b = torch.empty(rows, k, **meta), torch.empty(n, k, **meta), torch.empty(n, **meta)
            r = torch.empty(rows, n, **meta) if residual else None
            linear.linear_fwd(x, w, b, r, activation, torch.empty(rows, n, **meta))
            with compile_target(90):  # its reasons() read the target of a meta tensor
                linear_tma.linear_tma_fwd(x, w, b, r, activation, torch.empty(rows, n, **meta))

        return run

    def act_grad() -> None:
        h = 4 * width
        x, w, b = torch.empty(rows, width, **meta), torch.empty(h, width, **meta), torch.empty(h, **meta)
        dy = torch.empty(rows, h, **meta)
        linear.linear_act_grad(dy, x, w, b, "gelu", torch.empty(rows, h, **meta), need_dbias=True)

    def wgrad(n: int, k: int) -> Callable[[], None]:
        def run() -> None:  # dW = dy^T x with dbias fused (the non-activated linears' backward, when measured faster)
            linear.linear_wgrad(torch.empty(rows, n, **meta), torch.empty(rows, k, **meta), need_dbias=True)

        return run

    return [
        ("qkv", "gemm", fwd(width, 3 * width, None, False)),
        ("proj+res", "gemm", fwd(width, width, None, True)),
        ("fc1+gelu", "gemm", fwd(width, 4 * width, "gelu", False)),
        ("fc2+res", "gemm", fwd(4 * width, width, None, True)),
        ("fc1 gelu bwd", "gemm", act_grad),
        ("qkv wgrad+dbias", "gemm", wgrad(3 * width, width)),
        ("proj wgrad+dbias", "gemm", wgrad(width, width)),
        ("fc2 wgrad+dbias", "gemm", wgrad(width, 4 * width)),
    ]


def _attention_launches(batch: int, heads: int, tokens: int, dim: int, dtype: Any) -> list:
    import torch

    from fastvit.kernels import attention

    meta = {"device": "meta", "dtype": dtype}

    def tensors() -> list:
        # Views of one packed (B, N, 3, H, D) qkv, as ops.attention_qkvpacked launches them.
        qkv = torch.empty(batch, tokens, 3, heads, dim, **meta).permute(2, 0, 3, 1, 4)
        return [qkv[0], qkv[1], qkv[2]]

    def fwd() -> None:
        q, k, v = tensors()
        out = torch.empty(batch, tokens, heads, dim, **meta).transpose(1, 2)
        lse = torch.empty(batch, heads, tokens, device="meta", dtype=torch.float32)
        attention.attention_fwd(q, k, v, out, lse, dim**-0.5, 0.0, None)

    def bwd() -> None:
        q, k, v = tensors()
        out = torch.empty(batch, tokens, heads, dim, **meta).transpose(1, 2)
        lse = torch.empty(batch, heads, tokens, device="meta", dtype=torch.float32)
        dq, dk, dv = tensors()
        attention.attention_bwd(out, q, k, v, out, lse, dq, dk, dv, dim**-0.5, 0.0, None)

    return [("fwd", "attention", fwd), ("bwd", "attention", bwd)]


def _layer_norm_launches(rows: int, width: int, dtype: Any) -> list:
    import torch

    from fastvit.kernels import layer_norm

    meta = {"device": "meta", "dtype": dtype}

    def fwd() -> None:
        x, r = torch.empty(rows, width, **meta), torch.empty(rows, width, **meta)
        w, b = torch.empty(width, **meta), torch.empty(width, **meta)
        stats = [torch.empty(rows, device="meta", dtype=torch.float32) for _ in range(2)]
        layer_norm.layer_norm_fwd(x, w, b, r, 1e-6, torch.empty_like(x), torch.empty_like(x), *stats)

    def bwd() -> None:
        dy, z = torch.empty(rows, width, **meta), torch.empty(rows, width, **meta)
        w = torch.empty(width, **meta)
        stats = [torch.empty(rows, device="meta", dtype=torch.float32) for _ in range(2)]
        layer_norm.layer_norm_bwd(dy, dy, z, w, *stats, torch.empty_like(z), True)

    return [("fwd+res", "layer_norm", fwd), ("bwd+res", "layer_norm", bwd)]


# SMs of the targets' reference GPUs (H100 SXM, A100): launchers that size grids and row chunks by the SM count
# (patch_embed's dweight splits, soft_split's persistent LayerNorm statistics) record what those GPUs launch; a
# meta tensor would count 1 SM, and the chunk length (an int argument, specialised on divisibility by 16) with it.
TARGET_SMS = {90: 132, 80: 108}


@contextlib.contextmanager
def _target_sm_count() -> Any:
    """Within the block, sm_count() of a non-GPU tensor answers the compile target's reference SM count."""
    from unittest import mock

    from fastvit import _geometry
    from fastvit.kernels import patch_embed
    from fastvit.kernels._common import target_capability

    real = _geometry.sm_count

    def sm_count(t: Any) -> int:
        return real(t) if t.is_cuda else TARGET_SMS[target_capability(t)]

    with mock.patch.object(_geometry, "sm_count", sm_count), mock.patch.object(patch_embed, "sm_count", sm_count):
        yield


def _patch_embed_launches(batch: int, side: int, patch: int, width: int, prefix: int, dtype: Any) -> list:
    """(label, kind, thunk): the patch embedding forward (bias, class token, position embedding covering it, as
    timm's ViT / DeiT run it fused) and its backward's two kernels, dx (image gradient) and dweight."""
    import torch

    from fastvit.kernels import patch_embed

    meta = {"device": "meta", "dtype": dtype}
    tokens = (side // patch) ** 2

    def image() -> Any:
        return torch.empty(batch, 3, side, side, **meta)

    def weight() -> Any:
        return torch.empty(width, 3, patch, patch, **meta)

    def fwd() -> None:
        out = torch.empty(batch, prefix + tokens, width, **meta)
        pos, cls = torch.empty(prefix + tokens, width, **meta), torch.empty(prefix, width, **meta)
        patch_embed.patch_embed_fwd(image(), weight(), torch.empty(width, **meta), pos, cls, out)

    def dx() -> None:
        patch_embed.patch_embed_dx(torch.empty(batch, prefix + tokens, width, **meta), weight(), prefix, image())

    def dweight() -> None:
        dout = torch.empty(batch, prefix + tokens, width, **meta)
        with _target_sm_count():  # the row chunks a GPU of the target splits into
            patch_embed.patch_embed_dweight(dout, image(), weight(), prefix)

    return [("fwd", "patch_embed", fwd), ("bwd dx", "patch_embed", dx), ("bwd dweight", "patch_embed", dweight)]


def _soft_split_launches(batch: int, channels: int, side: int, k: int, s: int, p: int, tokens: bool, norm: bool,
                         dtype: Any) -> list:  # fmt: skip
    """(label, kind, thunk): a soft split's forward (gather, with the fused LayerNorm where T2T fuses it) and its
    backward: the LayerNorm statistics kernel (with LayerNorm) and the fold. Token input is read as T2T lays it
    out, (B, H * W, C) viewed as an image through strides, as ops.soft_split does."""
    import torch

    from fastvit._geometry import unfold_grid
    from fastvit.kernels import soft_split

    meta = {"device": "meta", "dtype": dtype}
    kernel = (k, k, s, s, p, p)
    geometry = (batch, channels, side, side)
    ho, wo = unfold_grid(side, side, kernel)
    rows, features = batch * ho * wo, channels * k * k

    def source() -> tuple:
        if tokens:
            x = torch.empty(batch, side * side, channels, **meta)
            s_b, s_l, s_c = x.stride()
            return x, (s_b, s_c, side * s_l, s_l)
        x = torch.empty(*geometry, **meta)
        return x, tuple(x.stride())

    def stats() -> list:
        return [torch.empty(rows, device="meta", dtype=torch.float32) for _ in range(2)]

    def fwd() -> None:
        x, strides = source()
        w = torch.empty(features, **meta) if norm else None
        b = torch.empty(features, **meta) if norm else None
        mean, rstd = stats() if norm else (None, None)
        y = torch.empty(rows, features, **meta)
        soft_split.soft_split_fwd(x, strides, geometry, kernel, w, b, 1e-5, y, mean, rstd)

    def ln_stats() -> None:
        x, strides = source()
        dy = torch.empty(rows, features, **meta)
        with _target_sm_count():  # its persistent grid and rows per program on a GPU of the target
            soft_split.soft_split_ln_bwd_stats(dy, x, strides, geometry, kernel, torch.empty(features, **meta),
                                               *stats(), True)  # fmt: skip

    def fold() -> None:
        x, strides = source()
        dy = torch.empty(rows, features, **meta)
        dx, dx_strides = source()
        if norm:
            w, row_stats = torch.empty(features, **meta), (*stats(), *stats())
            soft_split.soft_split_bwd(dy, x, strides, geometry, kernel, dx, dx_strides, w, row_stats)
        else:
            soft_split.soft_split_bwd(dy, x, strides, geometry, kernel, dx, dx_strides)

    launches = [("fwd+ln" if norm else "fwd", "soft_split", fwd)]
    if norm:
        launches.append(("bwd ln stats", "soft_split", ln_stats))
    return launches + [("bwd fold+ln" if norm else "bwd fold", "soft_split", fold)]


def goal_launches(dtype_name: str = "bfloat16", only: Optional[set] = None, kernels: Optional[set] = None,
                  shapes: Optional[set] = None) -> list:  # fmt: skip
    """Every (shape label, launch label, kind, record) at the goal shapes; ``only`` limits the kinds,
    ``kernels`` the kernel (function) names, ``shapes`` the shape labels."""
    import torch

    dtype = getattr(torch, dtype_name)
    groups = []
    for label, (rows, width) in GEMMS.items():
        groups += [(label, *item) for item in _gemm_launches(rows, width, dtype)]
    for label, shape in ATTENTION.items():
        groups += [(label, *item) for item in _attention_launches(*shape, dtype)]
    for label, (rows, width) in LAYER_NORM.items():
        groups += [(label, *item) for item in _layer_norm_launches(rows, width, dtype)]
    for label, shape in PATCH_EMBED.items():
        groups += [(label, *item) for item in _patch_embed_launches(*shape, dtype)]
    for label, shape in SOFT_SPLIT.items():
        groups += [(label, *item) for item in _soft_split_launches(*shape, dtype)]
    out = []
    for shape_label, launch_label, kind, thunk in groups:
        if (only and kind not in only) or (shapes and shape_label not in shapes):
            continue
        for record in record_launches(thunk):
            if not kernels or record["name"] in kernels:
                out.append((shape_label, launch_label, kind, record))
    return out


def _derived(result: dict, record: dict) -> dict:
    """Figures per unit of work from the SASS profile and the config's tile."""
    cfg = {k: v.get("value") for k, v in record["args"].items()}
    config = result.get("config") or ""
    for key, value in re.findall(r"(BLOCK_\w+|GROUP_M): (\d+)", config):
        cfg[key] = int(value)
    sass, threads = result["sass"], result["threads"]
    out = {}
    name = result["fn"].rsplit(".", 1)[1]
    if name in ("_attn_fwd_kernel", "_attn_bwd_kernel", "_attn_bwd_short_kernel") and "loop_instructions" in sass:
        scores = cfg.get("BLOCK_Q", cfg.get("BLOCK_M")) * cfg["BLOCK_N"] / threads
        out["instructions_per_score"] = round(sass["loop_instructions"] / scores, 2)
    # Not for the persistent TMA GEMM: its one (flattened) loop holds the epilogue, so nothing follows it.
    if name.startswith("_linear") and name != "_linear_tma_kernel" and "after_loop" in sass:
        elements = cfg["BLOCK_M"] * cfg["BLOCK_N"] / threads
        out["epilogue_instructions_per_element"] = round(sass["after_loop"] / elements, 2)
        steps = -(-cfg["K"] // cfg["BLOCK_K"])
        out["instructions_per_tile"] = sass["before_loop"] + sass["loop_instructions"] * steps + sass["after_loop"]
    return out


def build_report(dtype_name: str = "bfloat16", only: Optional[set] = None, workers: Optional[int] = None,
                 cache: Optional[str] = None, targets: tuple = (90, 80), kernels: Optional[set] = None,
                 shapes: Optional[set] = None) -> list:  # fmt: skip
    """Rows of the report: one per (shape, launch, kernel, target, kept config)."""
    from fastvit.kernels import linear as linear_kernels
    from fastvit.kernels._common import compile_target

    plan = []
    for cc in targets:
        # the GEMM launcher remembers each shape's tuned config and launches it untuned afterwards: forget it, so
        # every target records the autotuned launch (all its configs), not the first target's winner
        linear_kernels._BEST.clear()
        linear_kernels._WGRAD_BEST.clear()
        with compile_target(cc):  # launchers that pick a kernel by target (attention's backward) see it
            launches = goal_launches(dtype_name, only, kernels, shapes)
        for shape_label, launch_label, kind, record in launches:
            if cc not in KERNEL_TARGETS.get(record["name"], (cc,)):
                continue
            obj = launched(record)
            _, configs, _ = unwrap(obj)
            kept = pruned(obj, record, configs, cc) if configs else [None]
            plan += [(shape_label, launch_label, kind, record, launch_spec(record, cc, c)) for c in kept]
    results = compile_all([p[-1] for p in plan], workers=workers, cache=cache)
    rows = []
    for (shape_label, launch_label, kind, record, _), result in zip(plan, results):
        row = {"shape": shape_label, "launch": launch_label, "kind": kind, **result}
        if result.get("ok"):
            row.update(_derived(result, record))
        rows.append(row)
    return rows


_COLUMNS = ["shape", "launch", "kernel", "sm", "config", "registers", "spills", "shared", "ctas_per_sm_regs",
            "ctas_per_sm_smem", "wgmma", "tma", "instructions", "loop", "after_loop",
            "instructions_per_score", "epilogue_instructions_per_element"]  # fmt: skip


def summary(rows: list) -> list:
    """One line per (launch, kernel, target) over shapes and kept configs: configs, how many spill, the
    worst spill bytes, register range, and the best derived figures."""
    groups: dict = {}
    for r in rows:
        if r.get("ok"):
            groups.setdefault((r["kind"], r["launch"], r["fn"].rsplit(".", 1)[1], r["sm"]), []).append(r)
    out = []
    for (kind, launch, kernel, sm), rs in sorted(groups.items()):
        line = {"kind": kind, "launch": launch, "kernel": kernel, "sm": sm, "compiles": len(rs),
                "spilling": sum(1 for r in rs if r["spills"]), "max_spills": max(r["spills"] for r in rs),
                "registers": f"{min(r['registers'] for r in rs)}-{max(r['registers'] for r in rs)}",
                "max_shared_kb": round(max(r["shared"] for r in rs) / 1024),
                "max_ctas_per_sm": max(r["ctas_per_sm"] for r in rs)}  # fmt: skip
        for key in ("instructions_per_score", "epilogue_instructions_per_element"):
            values = [r[key] for r in rs if key in r]
            if values:
                line[key] = f"{min(values)}-{max(values)}"
        out.append(line)
    return out


_SUMMARY_COLUMNS = ["kind", "launch", "kernel", "sm", "compiles", "spilling", "max_spills", "registers",
                    "max_shared_kb", "max_ctas_per_sm", "instructions_per_score",
                    "epilogue_instructions_per_element"]  # fmt: skip


def _table(rows: list, columns: list, cell: Callable[[dict, str], str]) -> list:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]


def markdown(rows: list) -> str:
    def cell(row: dict, column: str) -> str:
        if column == "kernel":
            return row["fn"].rsplit(".", 1)[1]
        if column == "config":
            config = row.get("config") or "-"
            return re.sub(r"\s+", " ", config.replace("num_ctas: 1, ", "").replace("maxnreg: None, ", ""))
        if column in ("instructions", "loop", "after_loop"):
            key = {"loop": "loop_instructions"}.get(column, column)
            return str(row.get("sass", {}).get(key, ""))
        if column == "shared":
            return f"{row['shared'] / 1024:.0f} KB"
        return str(row.get(column, ""))

    ok = [r for r in rows if r.get("ok")]
    failed = [r for r in rows if not r.get("ok")]
    spilling = [r for r in ok if r["spills"]]
    lines = [
        "# fastvit kernel compile report",
        "",
        f"{len(ok)} compiles ({len({r['fn'] for r in ok})} kernels), {len(spilling)} with spills, "
        f"{len(failed)} failed. Registers per thread, spills = spill store + load bytes per thread, shared per "
        "block; loop / after_loop = SASS instructions in the main loop and after it.",
        "",
        "## Summary per launch, kernel and target (over shapes and kept configs)",
        "",
        *_table(summary(rows), _SUMMARY_COLUMNS, lambda r, c: str(r.get(c, ""))),
        "",
        "## Every compile",
        "",
        *_table(ok, _COLUMNS, cell),
    ]
    if failed:
        lines += ["", "## Failed compiles", ""]
        lines += [f"- {r['kernel']} sm_{r['sm']} {r.get('config')}: {r.get('error', '')[:300]}" for r in failed]
    return "\n".join(lines) + "\n"


def _config_key(config: Optional[str]) -> str:
    """A config's tile, warps and stages (not the kernel-specific extras such as BLOCK_TAIL)."""
    keep = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return ", ".join(f"{k}={v}" for k, v in re.findall(r"(\w+): (\w+)", config or "") if k in keep)


def compare(before: list, after: list) -> str:
    """Markdown: per (launch, kernel, target), the summary figures before and after, then every config
    present in both reports with its registers, spills and derived figures side by side."""
    lines = ["# Compile report: before -> after", "", "## Per launch, kernel and target", ""]
    old = {(r["kind"], r["launch"], r["kernel"], r["sm"]): r for r in summary(before)}
    columns = ["compiles", "spilling", "max_spills", "registers", "instructions_per_score",
               "epilogue_instructions_per_element"]  # fmt: skip
    rows = []
    for r in summary(after):
        o = old.get((r["kind"], r["launch"], r["kernel"], r["sm"]), {})
        rows.append({**{k: r[k] for k in ("launch", "kernel", "sm")},
                     **{c: f"{o.get(c, '-')} -> {r.get(c, '-')}" for c in columns}})  # fmt: skip
    lines += _table(rows, ["launch", "kernel", "sm", *columns], lambda r, c: str(r.get(c, "")))
    lines += ["", "## Configs in both", ""]

    def match(r: dict) -> tuple:
        return r["shape"], r["launch"], r["fn"], r["sm"], _config_key(r.get("config"))

    index = {match(r): r for r in before if r.get("ok")}
    detail = []
    for r in after:
        o = index.get(match(r))
        if not (r.get("ok") and o):
            continue
        line = {"shape": r["shape"], "launch": r["launch"], "kernel": r["fn"].rsplit(".", 1)[1], "sm": r["sm"],
                "config": _config_key(r.get("config"))}  # fmt: skip
        for key in ("registers", "spills", "instructions_per_score", "epilogue_instructions_per_element"):
            if key in r or key in o:
                line[key] = f"{o.get(key, '-')} -> {r.get(key, '-')}"
        line["loop"] = f"{o['sass'].get('loop_instructions', '-')} -> {r['sass'].get('loop_instructions', '-')}"
        detail.append(line)
    cols = ["shape", "launch", "kernel", "sm", "config", "registers", "spills", "loop", "instructions_per_score",
            "epilogue_instructions_per_element"]  # fmt: skip
    lines += _table(detail, cols, lambda r, c: str(r.get(c, "")))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for kernel_report.json and kernel_report.md (required to compile)")
    parser.add_argument("--kinds", nargs="+", choices=["gemm", "attention", "layer_norm", "patch_embed", "soft_split"],
                        help="default: all")  # fmt: skip
    parser.add_argument("--targets", nargs="+", type=int, default=[90, 80], choices=[80, 90])
    parser.add_argument("--kernels", nargs="+", help="only these kernel functions (e.g. _linear_tma_kernel)")
    shape_labels = sorted({*GEMMS, *ATTENTION, *LAYER_NORM, *PATCH_EMBED, *SOFT_SPLIT})
    parser.add_argument("--shapes", nargs="+", choices=shape_labels,
                        help="only these shape labels (default: all)")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPUs)")
    parser.add_argument("--cache", default=None, help="JSON cache of compile results (default: <out>/cache.json)")
    parser.add_argument("--compare", metavar="BEFORE_JSON", help="also write kernel_report_compare.md against it")
    parser.add_argument("--training-flops", action="store_true",
                        help="print the per-block training GEMM FLOPs table (ViT-B/16, batch 256); no compile "
                        "unless --out is given too")  # fmt: skip
    args = parser.parse_args(argv)
    if args.training_flops:
        print(training_flops_markdown())
        if args.out is None:
            return 0
    if args.out is None:
        parser.error("--out is required (or --training-flops alone)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it, the report compiles kernels for GPU targets")
    os.makedirs(args.out, exist_ok=True)
    from fastvit.fileio import atomic_write_text

    kernels, shapes = (set(args.kernels) if args.kernels else None), (set(args.shapes) if args.shapes else None)
    cache = args.cache or os.path.join(args.out, "cache.json")
    rows = build_report(args.dtype, set(args.kinds) if args.kinds else None, args.workers, cache,
                        tuple(args.targets), kernels, shapes)  # fmt: skip
    import triton

    payload = {"triton": triton.__version__, "dtype": args.dtype, "rows": rows}
    atomic_write_text(os.path.join(args.out, "kernel_report.json"), json.dumps(payload, indent=1))
    atomic_write_text(os.path.join(args.out, "kernel_report.md"), markdown(rows))
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)["rows"]
        atomic_write_text(os.path.join(args.out, "kernel_report_compare.md"), compare(before, rows))
    ok = [r for r in rows if r.get("ok")]
    print(f"{len(ok)} compiles, {sum(1 for r in ok if r['spills'])} with spills, {len(rows) - len(ok)} failed; "
          f"wrote {args.out}/kernel_report.md")  # fmt: skip
    return 0 if len(ok) == len(rows) else 1


# ------------------------------------------------------------------------- training GEMM FLOPs
# Arithmetic, no compile: the linear GEMMs one transformer block runs per training step, and what
# ops.linear's save_preact (fastvit/ops/linear.py) takes away from them. Attention's own QK^T / PV
# products are not linears and are left out.


def training_gemm_flops(
    batch: int = 256, tokens: int = 197, width: int = 768, mlp_ratio: int = 4, save_preact: bool = False
) -> list:
    """One row per linear of a pre-norm ViT block (qkv, proj, fc1 + GELU, fc2): M (rows = batch * tokens),
    N, K and the FLOPs (2 M N K per GEMM) of its forward, dgrad (dx = g @ W), wgrad (dW = g.T @ x) and, for
    fc1 when the pre-activation is recomputed (``save_preact=False``, the default), the recompute GEMM."""
    rows, hidden = batch * tokens, mlp_ratio * width
    layers = [("qkv", 3 * width, width, False), ("proj", width, width, False),
              ("fc1", hidden, width, True), ("fc2", width, hidden, False)]  # fmt: skip
    out = []
    for name, n, k, activated in layers:
        gemm = 2 * rows * n * k
        recompute = gemm if activated and not save_preact else 0
        out.append({"layer": name, "M": rows, "N": n, "K": k, "fwd": gemm, "dgrad": gemm, "wgrad": gemm,
                    "recompute": recompute, "total": 3 * gemm + recompute})  # fmt: skip
    return out


def training_flops_summary(batch: int = 256, tokens: int = 197, width: int = 768, mlp_ratio: int = 4) -> dict:
    """Per-block training GEMM FLOPs before (recompute fc1's pre-activation) and after (save it), the
    saving as a share of before and of after, and the memory the save keeps (bytes at 2-byte bf16)."""
    before = sum(r["total"] for r in training_gemm_flops(batch, tokens, width, mlp_ratio, save_preact=False))
    after = sum(r["total"] for r in training_gemm_flops(batch, tokens, width, mlp_ratio, save_preact=True))
    return {
        "batch": batch, "tokens": tokens, "width": width, "mlp_ratio": mlp_ratio,
        "before": before, "after": after, "saved": before - after,
        "saved_pct_of_before": 100.0 * (before - after) / before,
        "extra_pct_over_after": 100.0 * (before - after) / after,
        "saved_preact_bytes_bf16": batch * tokens * mlp_ratio * width * 2,
        # dbias fused into the dW GEMM of each linear without activation (qkv, proj, fc2): the separate
        # dy.sum(0) read M * N bf16 elements of dy; FLOPs unchanged (a sum is memory traffic)
        "dbias_dy_bytes_bf16": {name: batch * tokens * n * 2 for name, n in
                                (("qkv", 3 * width), ("proj", width), ("fc2", width))},
    }  # fmt: skip


def training_flops_markdown(batch: int = 256, tokens: int = 197, width: int = 768, mlp_ratio: int = 4) -> str:
    """The per-block table (GFLOP) and the before / after line, ViT-B/16 at batch 256 by default."""
    lines = [f"## Training GEMM FLOPs per block (batch {batch}, {tokens} tokens, width {width}, "
             f"MLP ratio {mlp_ratio})", ""]  # fmt: skip
    for save in (False, True):
        rows = training_gemm_flops(batch, tokens, width, mlp_ratio, save_preact=save)
        lines += [f"save_preact={save}:", ""]
        cols = ["layer", "M", "N", "K", "fwd", "dgrad", "wgrad", "recompute", "total"]
        lines += _table(rows, cols, lambda r, c: f"{r[c] / 1e9:.1f}" if c in cols[4:] else str(r[c]))
        lines.append(f"| block | | | | | | | | {sum(r['total'] for r in rows) / 1e9:.1f} |")
        lines.append("")
    s = training_flops_summary(batch, tokens, width, mlp_ratio)
    lines.append(
        f"before (recompute) {s['before'] / 1e12:.3f} TFLOP, after (save) {s['after'] / 1e12:.3f} TFLOP: "
        f"{s['saved_pct_of_before']:.1f}% of before saved (recompute adds {s['extra_pct_over_after']:.1f}% over "
        f"after), for {s['saved_preact_bytes_bf16'] / 1e6:.0f} MB of saved bf16 pre-activation per block"
    )
    dy_bytes = s["dbias_dy_bytes_bf16"]
    lines.append("")
    lines.append(
        "dbias fused into the dW GEMM (linears without activation; FLOPs unchanged): bf16 dy bytes no longer "
        "read by a separate column sum (M * N * 2) per block: "
        + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in dy_bytes.items())
        + f", total {sum(dy_bytes.values()) / 1e6:.0f} MB"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

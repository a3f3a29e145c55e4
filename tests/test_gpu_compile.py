"""Every Triton kernel compiles for sm_80 and sm_90, with its GPU autotune configurations, on a machine
without a GPU.

The interpreter runs kernels but never compiles them, so a kernel can pass every interpreter test and
still fail to build for a GPU (a ``tl.dot`` on a block under 16, a dtype the hardware path rejects,
shared memory over the SM's limit). This test runs each op family's Triton backend forward and
backward under the interpreter while recording every launch (kernel, argument dtypes, constexprs),
then compiles each recorded launch in a subprocess without ``TRITON_INTERPRET`` (so autotuned kernels
carry their GPU configuration lists) for sm_80 and sm_90 through ptxas, fp16 launches also as bf16,
and checks shared memory against each target's per-block limit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fastvit import kernels, ops
from fastvit.ops.attention import attention_dropout_mask

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/kernel_report.py by path: the name "benchmarks" is also the tests/benchmarks package.
_spec = importlib.util.spec_from_file_location(
    "fastvit_kernel_report", os.path.join(_ROOT, "benchmarks", "kernel_report.py")
)
kernel_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_report)
describe = kernel_report.describe

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.slow,
    pytest.mark.skipif(not kernels.INTERPRET, reason="records launches through the Triton interpreter (no-GPU runs)"),
]


def _astsource_takes_constexprs() -> bool:
    """Whether this Triton's ``ASTSource`` has the keyword API tests/gpu_compile_child.py compiles through
    (``constexprs=`` and per-argument-path ``attrs``; Triton 3.1 and 3.2 take ``constants=``, keyed
    differently)."""
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


def _record_launches(exercise) -> list[dict]:
    import sys as _sys

    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.interpreter import GridExecutor

    from fastvit.kernels._common import autotuner_arg_names, kernel_function, launch_wrapper

    records: dict[str, dict] = {}
    wrappers: list = []  # the autotune / heuristics objects a launch is passing through, outermost first
    # Every interpreted launch ends in GridExecutor.__call__ (InterpretedFunction.run is an instance attribute
    # before Triton 3.2 and ``kernel[grid]`` bypasses it there, so the executor is the one place to hook).
    originals = {cls: cls.run for cls in (Autotuner, Heuristics)}
    execute = GridExecutor.__call__

    def wrapper_run(cls):
        def run(self, *args, **kwargs):
            wrappers.append(self)
            try:
                return originals[cls](self, *args, **kwargs)
            finally:
                wrappers.pop()

        return run

    def recording_call(self, *args, **kwargs):
        described = {name: describe(v) for name, v in zip(autotuner_arg_names(self), args)}
        # Keyword arguments are kept apart: Triton hands them to prune functions separately. Triton < 3.2
        # passes the launch's grid and warmup flag down to here too; they are not kernel arguments.
        described.update({k: dict(describe(v), keyword=True) for k, v in kwargs.items() if k not in ("grid", "warmup")})
        fn = kernel_function(self)
        module = _sys.modules[fn.__module__]
        # A module's autotuned kernel is a LazyAutotune; the Autotuner the launch passed through is its .built.
        outer = wrappers[0] if wrappers else None
        wrapper = next((a for a, o in vars(module).items() if outer is not None and outer is launch_wrapper(o)), None)
        record = {"module": fn.__module__, "name": fn.__name__, "wrapper": wrapper, "args": described}
        records[json.dumps(record, sort_keys=True)] = record
        return execute(self, *args, **kwargs)

    GridExecutor.__call__ = recording_call
    Autotuner.run = wrapper_run(Autotuner)
    Heuristics.run = wrapper_run(Heuristics)
    try:
        exercise()
    finally:
        GridExecutor.__call__ = execute
        for cls, run in originals.items():
            cls.run = run
    out = list(records.values())
    # fp16 launches are compiled a second time as bf16 (the interpreter cannot run bf16 arithmetic).
    out += [
        dict(r, dtype_swap=True)
        for r in records.values()
        if any(a.get("dtype") == "float16" for a in r["args"].values())
    ]
    return out


def _backward(out, *inputs):
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(
        outs, [t for t in inputs if t is not None and t.requires_grad], [torch.ones_like(o) for o in outs]
    )


def _exercise_layer_norm():
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, 768, dtype=dtype, requires_grad=True)
        r = torch.randn_like(x, requires_grad=True)
        w = torch.randn(768, requires_grad=True)
        b = torch.randn(768, requires_grad=True)
        _backward(ops.layer_norm(x, w, b, residual=r, backend="triton"), x, r, w, b)
        _backward(ops.layer_norm(x, w.to(dtype), None, backend="triton"), x)


def _exercise_linear():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # fp32 through TF32, as F.linear would
    try:
        x, w = torch.randn(3, 32, requires_grad=True), torch.randn(48, 32, requires_grad=True)
        _backward(ops.linear(x, w, None, activation="gelu", backend="triton"), x, w)
    finally:
        torch.set_float32_matmul_precision(previous)
    for dtype in (torch.float32, torch.float16):
        for activation in (None, "gelu", "gelu_tanh", "quick_gelu"):
            x = torch.randn(2, 5, 32, dtype=dtype, requires_grad=True)
            w = torch.randn(48, 32, dtype=dtype, requires_grad=True)
            b = torch.randn(48, dtype=dtype, requires_grad=True)
            res = torch.randn(2, 5, 48, dtype=dtype, requires_grad=True)
            _backward(ops.linear(x, w, b, activation=activation, residual=res, backend="triton"), x, w, b, res)
            if activation is not None:  # the save_preact path: the forward's STORE_H epilogue, the saved-h kernel
                out = ops.linear(x, w, b, activation=activation, residual=res, backend="triton", save_preact=True)
                _backward(out, x, w, b, res)
    # The persistent TMA GEMM beside it (the measured dispatch picks it on sm_90 GPUs only, so it is launched
    # directly): fp16 (bf16 by the child's dtype swap), every epilogue constexpr.
    from fastvit.kernels import linear_tma

    for activation, bias, residual in [(None, False, False), (None, True, True), ("gelu", True, False),
                                       ("gelu_tanh", True, True), ("quick_gelu", False, True)]:  # fmt: skip
        x, w = torch.randn(10, 32, dtype=torch.float16), torch.randn(48, 32, dtype=torch.float16)
        b = torch.randn(48, dtype=torch.float16) if bias else None
        res = torch.randn(10, 48, dtype=torch.float16) if residual else None
        linear_tma.linear_tma_fwd(x, w, b, res, activation, torch.empty(10, 48, dtype=torch.float16))
    # The fused wgrad + dbias kernel (the measured dispatch runs it on GPUs only, so it is launched directly):
    # fp32 and fp16 (bf16 by the child's dtype swap), with and without the column sums, one and two splits.
    from fastvit.kernels import linear as kernels_linear

    for dtype in (torch.float32, torch.float16):
        dy, x = torch.randn(300, 48, dtype=dtype), torch.randn(300, 32, dtype=dtype)
        kernels_linear.linear_wgrad(dy, x, True, splits=2)
        kernels_linear.linear_wgrad(dy, x, False, splits=1)


def _exercise_attention():
    for dtype in (torch.float32, torch.float16):
        for head_dim in (32, 64, 80):
            qkv = torch.randn(1, 9, 3 * 2 * head_dim, dtype=dtype, requires_grad=True)
            _backward(ops.attention_qkvpacked(qkv, 2, backend="triton"), qkv)
        q, k, v = (torch.randn(1, 1, 5, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        _backward(ops.attention(q, k, v, dropout_p=0.1, backend="triton"), q, k, v)
    # 128 tokens: the short backward with a 128-row query tile (wgmma needs >= 64 rows); 257 tokens: past its
    # 256, so the blocked backward is launched (and compiled) too.
    for tokens, head_dim in ((128, 64), (257, 16)):
        qkv = torch.randn(1, tokens, 3 * head_dim, dtype=torch.float16, requires_grad=True)
        _backward(ops.attention_qkvpacked(qkv, 1, backend="triton"), qkv)
    attention_dropout_mask(torch.tensor([7], dtype=torch.int64), 1, 2, 5, 5, 0.1)  # the debugging helper


def _exercise_patch_embed():
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(1, 3, 32, 32, dtype=dtype, requires_grad=True)
        w = torch.randn(16, 3, 16, 16, dtype=dtype, requires_grad=True)
        b = torch.randn(16, dtype=dtype, requires_grad=True)
        cls = torch.randn(1, 1, 16, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, 5, 16, dtype=dtype, requires_grad=True)
        out = ops.patch_embed(x, w, b, patch_size=16, pos_embed=pos, prefix_tokens=cls, backend="triton")
        _backward(out, x, w, b, cls, pos)


def _exercise_soft_split():
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(1, 3, 12, 12, dtype=dtype, requires_grad=True)
        _backward(ops.soft_split(x, kernel_size=7, stride=4, padding=2, backend="triton"), x)
        t = torch.randn(1, 36, 4, dtype=dtype, requires_grad=True)
        nw, nb = torch.randn(36, dtype=dtype, requires_grad=True), torch.randn(36, dtype=dtype, requires_grad=True)
        out = ops.soft_split(
            t, kernel_size=3, stride=2, padding=1, hw=(6, 6), norm_weight=nw, norm_bias=nb, backend="triton"
        )
        _backward(out, t, nw, nb)


EXERCISES = {
    "layer_norm": _exercise_layer_norm,
    "linear": _exercise_linear,
    "attention": _exercise_attention,
    "patch_embed": _exercise_patch_embed,
    "soft_split": _exercise_soft_split,
}


# families whose recorded launches must not spill
SPILL_FREE = {"linear", "attention", "layer_norm", "patch_embed", "soft_split"}


def test_every_op_family_is_exercised():
    """A new op family with Triton kernels must be added to EXERCISES, or its kernels go unchecked."""
    with_triton = {op.kernel_family for op in ops.dispatch.registered_ops().values() if "triton" in op.reasons}
    missing = with_triton - set(EXERCISES)
    assert not missing, f"add an exercise for {sorted(missing)} to tests/test_gpu_compile.py"


@pytest.mark.skipif(
    not _astsource_takes_constexprs(),
    reason="the compile child uses triton.compiler.ASTSource(constexprs=...); this older Triton's ASTSource takes "
    "constants=, so the GPU-compile matrix runs on the newest pinned stack (.ci/run)",
)
@pytest.mark.parametrize("family", sorted(EXERCISES))
def test_triton_kernels_compile_for_sm80_and_sm90(family, tmp_path):
    records = _record_launches(EXERCISES[family])
    assert records, f"{family}: the exercise launched no Triton kernel"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_compile_child.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # private: no races with other Triton processes
    proc = subprocess.run([sys.executable, child], input=json.dumps(records), capture_output=True, text=True,
                          env=env, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failures = [r for r in results if r.get("ok") is False]
    unexercised = [r["kernel"] for r in results if r.get("unexercised")]
    over_shared = [r for r in results if r.get("ok") and not r["shared_ok"]]
    compiled = [r for r in results if r.get("ok")]
    assert not failures, "kernels that do not compile for a GPU target:\n" + "\n".join(
        f"  {r['kernel']} sm_{r['sm']} bf16={r['bf16']} config={r['config']}: {r['error'][:600]}" for r in failures
    )
    assert not unexercised, f"kernels never launched by the {family} exercise (extend it): {unexercised}"
    assert not over_shared, "configs over the shared-memory limit (prune them):\n" + "\n".join(
        f"  {r['kernel']} sm_{r['sm']} {r['config']}: {r['shared']} bytes" for r in over_shared
    )
    # 16-bit launches (the fast path, and the goal shapes' dtype) must not spill. Known gap, not hidden: fp32
    # attention with exact fp32 products (FMA dots, no tensor cores) spills in every kept tile on sm_90
    # (up to ~136 KB per thread at 64 x 64); the fp32 GEMM prune already keeps only spill-free tiles.
    # Checked for every family issue 15 made spill-free (all of them: soft_split's launchers record the GPU's
    # warps under the interpreter too, patch_embed's prune drops the dweight config that spills on sm_80).
    spilling = [
        r for r in compiled
        if family in SPILL_FREE and r["spills"] and (r["half"] or "attention" not in r["kernel"])
    ]  # fmt: skip
    assert not spilling, "configs that spill registers (ptxas -v; split the epilogue or prune them):\n" + "\n".join(
        f"  {r['kernel']} sm_{r['sm']} {r['config']}: {r['registers']} registers, {r['spills']} spill bytes"
        for r in spilling
    )
    assert {r["sm"] for r in compiled} == {80, 90}
    # Hopper: every kernel with a 16-bit matmul must reach wgmma in at least one of its configurations.
    no_wgmma = sorted(
        {r["fn"] for r in compiled if r["sm"] == 90 and r["has_dot"] and r["half"]}
        - {r["fn"] for r in compiled if r["sm"] == 90 and r["wgmma"]}
    )
    assert not no_wgmma, f"16-bit matmul kernels that never use wgmma on sm_90: {no_wgmma}"


@pytest.mark.skipif(
    not _astsource_takes_constexprs(),
    reason="benchmarks/kernel_report.py compiles through triton.compiler.ASTSource(constexprs=...), which this older "
    "Triton lacks; the spill check runs on the newest pinned stack (.ci/run)",
)
def test_no_spills_at_the_goal_shapes(tmp_path):
    """benchmarks/kernel_report.py at the models' shapes (ViT-B/16, ViT-L/16@384, DeiT-S at batch 256, ViT-H/14
    attention at D = 80, T2T-ViT's N = 3137 attention, LayerNorm at C = 768 / 1024 / 1280, the three models'
    patch embeddings, T2T-ViT-t-14's three soft splits at batch 256; bf16, forward and backward): every config
    the prunes keep for sm_90a and sm_80 compiles, fits the target's shared memory and spills no register."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = os.path.join(root, "benchmarks", "kernel_report.py")
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=3000)  # fmt: skip
    rows = json.loads((tmp_path / "kernel_report.json").read_text())["rows"] if proc.returncode in (0, 1) else []
    assert rows, proc.stderr[-4000:]
    failed = [r for r in rows if not r.get("ok")]
    assert not failed, "compiles that failed:\n" + "\n".join(
        f"  {r['kernel']} sm_{r['sm']}: {r['error'][:400]}" for r in failed
    )
    spilling = [r for r in rows if r["spills"] or not r["shared_ok"]]
    assert not spilling, "configs that spill or exceed shared memory at the goal shapes:\n" + "\n".join(
        f"  {r['shape']} {r['launch']} {r['fn']} sm_{r['sm']} {r['config']}: {r['registers']} registers, "
        f"{r['spills']} spill bytes, {r['shared']} B shared"
        for r in spilling
    )
    kinds = {r["kind"] for r in rows}
    assert kinds == {"gemm", "attention", "layer_norm", "patch_embed", "soft_split"}
    assert {r["sm"] for r in rows} == {80, 90}
    # every kernel of the two families the report added, on both targets
    families = {(r["fn"].rsplit(".", 1)[1], r["sm"]) for r in rows if r["kind"] in ("patch_embed", "soft_split")}
    kernels_ = {"_patch_embed_fwd_kernel", "_patch_embed_dx_kernel", "_patch_embed_dweight_kernel",
                "_soft_split_fwd_kernel", "_soft_split_ln_bwd_stats_kernel", "_soft_split_fold_kernel"}  # fmt: skip
    assert families == {(k, sm) for k in kernels_ for sm in (80, 90)}

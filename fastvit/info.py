"""``python -m fastvit.info``: what this machine can run.

Prints the versions fastvit depends on, the GPUs and their compute capability, whether the CUDA
extension fastvit._C is built and loadable (and if not, why), its build metadata, whether the cuBLASLt
it loads at run time is usable (and from where), and for every op which backends are available here,
the auto order, and any fallbacks recorded in this process; then measured dispatch: its mode, cache file
and every measured choice (the ops' backends and the Triton linear's TMA-vs-pointer GEMM, keys
``linear_tma|...``), with a summary of the TMA choices.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from typing import Any

import torch

import fastvit
from fastvit import _ext, kernels
from fastvit.ops import dispatch

__all__ = ["SUPPORTED", "collect", "driver_version", "git_sha", "main", "version_warnings"]

# The tested range, one (oldest, newest) pair of release numbers per dependency: CI runs the whole suite on
# both ends (.ci/requirements-oldest.txt and .ci/requirements-dev.txt); pyproject.toml states the same bounds.
SUPPORTED = {
    "torch": ((2, 5, 1), (2, 15, 0)),
    "triton": ((3, 1, 0), (3, 9, 0)),
    "numpy": ((1, 26, 4), (2, 4, 6)),
}


def _dotted(release: tuple) -> str:
    return ".".join(map(str, release))


def version_warnings(versions: dict[str, str]) -> list[str]:
    """One line per installed dependency outside the tested range, or in a known-bad pairing; [] when all is
    tested. ``versions`` maps package name to its version string (a missing or unparsable one is skipped)."""
    out = []
    for name, (low, high) in SUPPORTED.items():
        got = kernels.release_tuple(versions.get(name) or "")
        if not got:
            continue
        if got < low or got[: len(high) - 1] > high[:-1]:
            out.append(
                f"{name} {versions[name]} is outside the tested range {_dotted(low)} to {_dotted(high[:-1])}.x: "
                f"install one inside it (pip install '{name}>={_dotted(low)},<{_dotted((high[0], high[1] + 1))}')"
            )
    triton, numpy, torch_v = (kernels.release_tuple(versions.get(k) or "") for k in ("triton", "numpy", "torch"))
    if triton and numpy and triton < (3, 2) and numpy >= (2,):
        out.append(
            f"numpy {versions['numpy']} with triton {versions['triton']}: Triton's interpreter before 3.2 is "
            "tested with numpy 1.26 only (triton 3.0 with numpy 2 silently returns zeros): pip install 'numpy<2'"
        )
    if torch_v and numpy and (2, 5) <= torch_v < (2, 11) and numpy >= (2, 4):
        out.append(
            f"numpy {versions['numpy']} with torch {versions['torch']}: numpy 2.4 does not match the numpy ABI of "
            "torch 2.10 and older (measured on torch 2.10: 130 test failures, none with numpy 2.3); "
            "pip install 'numpy<2.4'"
        )
    return out


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"


def _command_output(argv: list[str], cwd: str | None = None) -> str | None:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports for GPU 0; None without nvidia-smi or a GPU."""
    out = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def git_sha() -> str | None:
    """The git commit of the fastvit source tree in use (``-dirty`` when tracked files changed); None when
    fastvit is not run from a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastvit.__file__)))
    sha = _command_output(["git", "rev-parse", "HEAD"], cwd=root)
    if not sha:
        return None
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return sha + ("-dirty" if dirty else "")


def _cublaslt_status() -> str:
    """fastvit._C's cuBLASLt run-time status, loading the library once the way the ops do; never raises."""
    if not _ext.available():
        return "not checked (fastvit._C is not loaded)"
    try:
        from fastvit.ops import _cuda_backends

        reasons = _cuda_backends.cublaslt_reasons()  # loads it with fastvit's search directories
        return "; ".join(reasons) if reasons else _ext.module().cublaslt_status()
    except Exception as exc:  # a failing status call: report it, keep printing
        return f"unknown ({type(exc).__name__}: {exc})"


def collect() -> dict[str, Any]:
    """Everything ``main`` prints, as a dict (benchmarks store it beside their results)."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "sms": p.multi_processor_count,
                }
            )
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    ops = {}
    for name, op in dispatch.registered_ops().items():
        ops[name] = {
            "backends": op.availability(device),
            "auto_order": list(op.preference) if device.type == "cuda" else ["torch"],
        }
    return {
        "fastvit": fastvit.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": kernels.TRITON_VERSION or f"not importable ({kernels.TRITON_IMPORT_ERROR})",
        "triton_interpreter": kernels.INTERPRET,
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        "supported": {name: f"{_dotted(low)} to {_dotted(high[:-1])}.x" for name, (low, high) in SUPPORTED.items()},
        "version_warnings": version_warnings(
            {"torch": torch.__version__, "triton": kernels.TRITON_VERSION or "", "numpy": _version("numpy")}
        ),
        "gpus": gpus,
        "driver": driver_version() if gpus else None,
        "git_sha": git_sha(),
        "device_for_ops": str(device),
        "extension": {
            "loaded": _ext.available(),
            "load_error": _ext.load_error(),
            "cudart": _ext.module().CUDART_VERSION if _ext.available() else None,
            "device_status": _ext.module().device_status() if _ext.available() else None,
            "build": _ext.build_info(),
            "cublaslt": _cublaslt_status(),
        },
        "env": {k: v for k, v in os.environ.items() if k.startswith("FASTVIT_") or k == "TRITON_INTERPRET"},
        "env_problems": env_problems(),
        "ops": ops,
        "fallbacks": {f"{op}/{backend}": reasons for (op, backend), reasons in dispatch.fallback_log().items()},
        "dispatch": dispatch.describe_cache(),
        "linear_tma": linear_tma_status(),
        "linear_wgrad": linear_wgrad_status(),
    }


def linear_tma_status() -> dict[str, Any]:
    """The persistent TMA GEMM's switch and its measured choices (the ``linear_tma|...`` entries of the
    dispatch cache and of this process): key -> "tma" or "pointer"."""
    try:
        from fastvit.kernels import linear_tma
    except Exception as exc:  # noqa: BLE001 - no Triton: nothing to choose between
        return {"available": f"not importable ({type(exc).__name__}: {exc})", "enabled": False, "choices": {}}
    return {
        "available": "yes" if linear_tma.HAS_API else f"no (triton {kernels.TRITON_VERSION} has no tensor descriptors)",
        "enabled": linear_tma.enabled(),
        "choices": _measured_choices(linear_tma.FAMILY),
    }


def _measured_choices(family: str) -> dict[str, Any]:
    """The ``<family>|...`` entries of the dispatch cache and of this process: key -> the backend chosen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bad cache is reported by describe_cache already
        table = dispatch.measured_table()
    return {k: e.get("backend") for k, e in sorted(table.items()) if k.startswith(f"{family}|")}


def linear_wgrad_status() -> dict[str, Any]:
    """The fused weight-gradient GEMM (dW with dbias from the same pass over dy, linears without activation):
    its switch, its measured choices (``linear_wgrad|...`` entries: "fused" or "torch") and the shapes for
    which cuBLASLt refused its BGRADB epilogue in this process (the cuda backend then ran the torch pair)."""
    try:
        from fastvit.kernels import linear as triton_linear
    except Exception as exc:  # noqa: BLE001 - no Triton: the torch pair (and cuBLASLt on cuda) only
        return {"available": f"not importable ({type(exc).__name__}: {exc})", "enabled": False, "choices": {}}
    from fastvit.ops import _cuda_backends

    return {
        "available": "yes",
        "enabled": triton_linear.wgrad_enabled(),
        "choices": _measured_choices(triton_linear.WGRAD_FAMILY),
        "bgradb_refused": {str(k): why for k, why in _cuda_backends.BGRADB_REFUSED.items()},
    }


def env_problems() -> list[str]:
    """Environment settings every op call would refuse (today: an unknown ``FASTVIT_BACKEND``)."""
    from fastvit.ops import dispatch

    value = os.environ.get(dispatch.ENV_VAR, "").strip().lower()
    if value and value != "auto" and value not in dispatch.BACKENDS:
        return [
            f"{dispatch.ENV_VAR}={os.environ[dispatch.ENV_VAR]!r} is not a backend: every op call will raise. "
            f"Set it to one of {', '.join(dispatch.BACKENDS)} or auto, or unset it"
        ]
    return []


def main() -> None:
    info = collect()
    print(f"fastvit {info['fastvit']}  (python {info['python']}, {info['platform']})")
    print(f"torch   {info['torch']}  (CUDA {info['torch_cuda']})")
    print(
        f"triton  {info['triton']}"
        + ("  [TRITON_INTERPRET=1: kernels run on the CPU]" if info["triton_interpreter"] else "")
    )
    print(f"timm    {info['timm']}")
    print(f"source  {info['git_sha'] or 'not a git checkout'}")
    print(f"numpy   {info['numpy']}")
    print("tested  " + ", ".join(f"{name} {rng}" for name, rng in info["supported"].items()))
    for line in info["version_warnings"]:
        print(f"WARNING {line}")
    if info["gpus"]:
        for g in info["gpus"]:
            print(
                f"GPU {g['index']}   {g['name']}, compute capability {g['capability']}, "
                f"{g['memory_gib']} GiB, {g['sms']} SMs"
            )
        print(f"driver  {info['driver'] or 'unknown (nvidia-smi not found)'}")
    else:
        print("GPU     none visible to torch (ops run on the torch backend; Triton only under TRITON_INTERPRET=1)")
    ext = info["extension"]
    print()
    if ext["loaded"]:
        print(f"fastvit._C  loaded (CUDA runtime {ext['cudart']}; {ext['device_status']})")
    else:
        print(f"fastvit._C  NOT loaded: {ext['load_error']}")
    for key, value in ext["build"].items():
        print(f"    {key:>13}: {value}")
    print(f"cuBLASLt    {ext['cublaslt']}")
    if info["env"]:
        print()
        for key, value in info["env"].items():
            print(f"{key}={value}")
        for problem in info["env_problems"]:
            print(f"WARNING: {problem}")
    print()
    print(f"ops (on {info['device_for_ops']}):")
    for name, op in info["ops"].items():
        print(f"  {name}   auto order: {' > '.join(op['auto_order'])}")
        for backend, reasons in op["backends"].items():
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"    {backend:<7} {status}")
    if info["fallbacks"]:
        print()
        print("auto-dispatch fallbacks in this process:")
        for key, reasons in info["fallbacks"].items():
            print(f"  {key}: {'; '.join(reasons)}")
    print()
    print("\n".join(dispatch.format_cache(info["dispatch"])))
    tma = info["linear_tma"]
    won = sum(1 for b in tma["choices"].values() if b == "tma")
    switch = "on" if tma["enabled"] else "off (FASTVIT_LINEAR_TMA=0)"
    print(
        f"linear TMA GEMM: API {tma['available']}, {switch}; measured choices {len(tma['choices'])} "
        f"(tma {won}, pointer {len(tma['choices']) - won}; listed above as linear_tma|...)"
    )
    wgrad = info["linear_wgrad"]
    fused = sum(1 for b in wgrad["choices"].values() if b == "fused")
    switch = "on" if wgrad["enabled"] else "off (FASTVIT_WGRAD_FUSED=0)"
    print(
        f"linear fused wgrad (dW + dbias): {switch}; measured choices {len(wgrad['choices'])} (fused {fused}, "
        f"torch {len(wgrad['choices']) - fused}; listed above as linear_wgrad|...); cuBLASLt BGRADB refused "
        f"for {len(wgrad.get('bgradb_refused', {}))} shapes"
    )


if __name__ == "__main__":
    main()

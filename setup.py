"""Build script: drives CMakeLists.txt to build the optional CUDA extension ``fastvit._C``.

The extension is optional. Without nvcc, or with ``FASTVIT_SKIP_CUDA_BUILD=1``, the install still
succeeds, says why the CUDA build was skipped, and records that reason in ``_C_build_info.json`` so
``python -m fastvit.info`` can repeat it later.

Environment:
    FASTVIT_SKIP_CUDA_BUILD=1   do not build fastvit._C
    FASTVIT_CUDA_ARCHS="80;90"  CUDA architectures (CMake syntax; e.g. "80;90a")
    FASTVIT_BUILD_JOBS=N        parallel compile jobs (default: number of CPUs)
    CUDACXX / CUDA_HOME         where to find nvcc if it is not on PATH
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BUILD_INFO_NAME = "_C_build_info.json"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc() -> str | None:
    for candidate in (
        os.environ.get("CUDACXX"),
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _skip_reason() -> tuple[str | None, str | None]:
    """Returns (reason to skip or None, nvcc path or None)."""
    if os.environ.get("FASTVIT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "FASTVIT_SKIP_CUDA_BUILD is set", None
    nvcc = _find_nvcc()
    if nvcc is None:
        return "nvcc was not found (looked at CUDACXX, CUDA_HOME/bin, PATH and /usr/local/cuda/bin)", None
    return None, nvcc


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja; the module lands where setuptools expects it."""

    def run(self) -> None:
        reason, self._nvcc = _skip_reason()
        if reason is not None:
            msg = (
                f"fastvit: skipping the CUDA extension build: {reason}. "
                "fastvit will run on its Triton and torch backends."
            )
            print(msg, file=sys.stderr)
            info = {"built": False, "skip_reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            for ext in self.extensions:
                self._write_info(os.path.dirname(self.get_ext_fullpath(ext.name)), info)
            if self.inplace or getattr(self, "editable_mode", False):
                # A module left by an earlier build would load and contradict the record just written.
                for stale in glob.glob(os.path.join(ROOT, "fastvit", "_C.*")):
                    if stale.endswith((".so", ".pyd")):
                        print(f"fastvit: removing the stale extension {stale}", file=sys.stderr)
                        os.remove(stale)
            self.extensions = []
            return
        super().run()

    def _write_info(self, ext_dir: str, info: dict) -> None:
        targets = {ext_dir}
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(os.path.join(ROOT, "fastvit"))
        for d in targets:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, BUILD_INFO_NAME), "w") as f:
                json.dump(info, f, indent=2)

    def build_extension(self, ext: Extension) -> None:
        ext_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_temp = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_temp, exist_ok=True)
        import pybind11

        cfg = "Debug" if self.debug else "Release"
        archs = os.environ.get("FASTVIT_CUDA_ARCHS", "80;90")
        cmake_args = [
            f"-DFASTVIT_OUTPUT_DIR={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_CUDA_COMPILER={self._nvcc}",
            f"-DFASTVIT_CUDA_ARCHS={archs}",
            "-G",
            "Ninja",
        ]
        jobs = os.environ.get("FASTVIT_BUILD_JOBS", str(os.cpu_count() or 2))
        cmake = shutil.which("cmake") or "cmake"
        t0 = time.time()
        subprocess.run([cmake, "-S", ROOT, "-B", build_temp, *cmake_args], check=True)
        subprocess.run([cmake, "--build", build_temp, "--config", cfg, "-j", jobs], check=True)
        print(f"fastvit: built fastvit._C for CUDA archs {archs} in {time.time() - t0:.0f} s", file=sys.stderr)
        info_path = os.path.join(ext_dir, BUILD_INFO_NAME)
        with open(info_path) as f:
            info = json.load(f)
        info["build_seconds"] = round(time.time() - t0, 1)
        self._write_info(ext_dir, info)


setup(ext_modules=[CMakeExtension("fastvit._C")], cmdclass={"build_ext": CMakeBuild})

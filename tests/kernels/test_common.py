"""fastvit.kernels._common: lazily built autotuners and the fields launchers read from them."""

import subprocess
import sys

import pytest
import triton
import triton.language as tl

from fastvit.kernels import release_tuple
from fastvit.kernels._common import LazyAutotune, lazy_autotune
from tests.ops.triton_stubs import run_stubbed


@triton.jit
def _scale_kernel(X, Y, n, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)


def _prune(configs, named_args, **kwargs):
    return configs


_CONFIGS = [triton.Config({"BLOCK_N": 16}), triton.Config({"BLOCK_N": 32}, num_warps=2)]


def test_fields_come_from_fastvit_arguments_without_building_the_autotuner():
    tuned = lazy_autotune(configs=_CONFIGS, key=["n"], prune_configs_by={"early_config_prune": _prune})(_scale_kernel)
    assert isinstance(tuned, LazyAutotune) and tuned.built is None
    assert tuned.keys == ["n"] and tuned.configs == _CONFIGS and tuned.early_config_prune is _prune
    assert tuned.arg_names == ["X", "Y", "n", "BLOCK_N"] and tuned.base_fn.__name__ == "_scale_kernel"
    assert tuned.fn is _scale_kernel
    with pytest.raises(RuntimeError, match="best_config read before the autotuner's first launch"):
        tuned.best_config
    assert tuned.built is None


def test_a_key_that_names_no_argument_is_refused():
    with pytest.raises(ValueError, match=r"key \['m'\] names no argument of the kernel"):
        lazy_autotune(configs=_CONFIGS, key=["m"])(_scale_kernel)


def test_importing_fastvit_and_the_kernel_modules_builds_no_autotuner():
    """No Autotuner (Triton 3.2 and 3.3 ask for a driver in its constructor) exists until a launch."""
    code = (
        "import fastvit, fastvit.ops\n"
        "import fastvit.kernels.attention as a, fastvit.kernels.linear as l, fastvit.kernels.patch_embed as p\n"
        "from fastvit.kernels._common import LazyAutotune\n"
        "lazy = [o for m in (a, l, p) for o in vars(m).values() if isinstance(o, LazyAutotune)]\n"
        "assert len(lazy) >= 6, lazy\n"
        "assert all(o.built is None for o in lazy), [o for o in lazy if o.built is not None]\n"
        "print(len(lazy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_gpu_launch_path_builds_once_and_reads_best_config():
    """Without the interpreter (GPU configs, Triton's real Autotuner.run with stubbed timing): the first
    launch builds the autotuner, benchmarks both configs and best_config is the one it picked."""
    out = run_stubbed(
        """
        import triton, triton.language as tl
        from tests.kernels.test_common import _scale_kernel, _CONFIGS
        from fastvit.kernels._common import lazy_autotune
        tuned = lazy_autotune(configs=_CONFIGS, key=["n"])(_scale_kernel)
        x = torch.randn(40)
        y = torch.empty_like(x)
        tuned[lambda meta: (triton.cdiv(40, meta["BLOCK_N"]),)](x, y, 40)
        built = tuned.built
        tuned[lambda meta: (triton.cdiv(40, meta["BLOCK_N"]),)](x, y, 40)
        assert tuned.built is built
        print(len(BENCHED), tuned.best_config.kwargs["BLOCK_N"], LAUNCHED[-1][1]["BLOCK_N"])
        """
    )
    assert out.split() == ["2", "32", "32"]


def test_release_tuple():
    assert release_tuple("3.1.0") == (3, 1, 0)
    assert release_tuple("2.5.1+cu124") == (2, 5, 1)
    assert release_tuple("3.2.0rc1") == (3, 2)
    assert release_tuple("") == ()


# ------------------------------------------------------------------- the adapter to Triton's private fields


_heuristic_kernel = triton.heuristics({"BLOCK_N": lambda args: 16})(_scale_kernel)


def test_adapter_reads_the_lazy_wrapper_and_tritons_wrappers():
    from fastvit.kernels import _common as c

    tuned = lazy_autotune(configs=_CONFIGS, key=["n"], prune_configs_by={"early_config_prune": _prune})(
        _heuristic_kernel
    )
    assert c.is_autotuner(tuned) and not c.is_heuristics(tuned) and c.is_heuristics(_heuristic_kernel)
    assert c.autotuner_configs(tuned) == _CONFIGS and c.autotuner_prune(tuned) is _prune
    assert c.autotuner_fn(tuned) is _heuristic_kernel and c.autotuner_arg_names(tuned) == ["X", "Y", "n", "BLOCK_N"]
    assert c.kernel_function(tuned).__name__ == "_scale_kernel" and c.launch_wrapper(tuned) is None
    assert list(c.heuristics_values(_heuristic_kernel)) == ["BLOCK_N"]
    jit, configs, heuristics = c.unwrap_kernel(tuned)
    assert jit is _scale_kernel and configs == _CONFIGS and [list(h) for h in heuristics] == [["BLOCK_N"]]
    assert c.unwrap_kernel(_scale_kernel) == (_scale_kernel, None, [])
    assert c.launch_wrapper(_scale_kernel) is _scale_kernel


def test_adapter_reads_a_built_autotuner_on_this_triton():
    """The real Autotuner of the installed Triton (built without a GPU: a single config benchmarks nothing)."""
    from fastvit.kernels import _common as c

    tuned = lazy_autotune(configs=_CONFIGS[:1], key=["n"], prune_configs_by={"early_config_prune": _prune})(
        _scale_kernel
    )
    built = tuned.tuner
    assert c.is_autotuner(built) and c.launch_wrapper(tuned) is built
    assert [cfg.kwargs for cfg in c.autotuner_configs(built)] == [{"BLOCK_N": 16}]
    assert c.autotuner_prune(built) is _prune and c.autotuner_fn(built) is _scale_kernel
    assert c.autotuner_arg_names(built) == ["X", "Y", "n", "BLOCK_N"]
    c.autotuner_set_best_config(built, _CONFIGS[0])
    assert c.autotuner_best_config(built) is _CONFIGS[0] and tuned.best_config is _CONFIGS[0]


def test_adapter_names_the_triton_version_when_a_field_is_missing():
    from fastvit.kernels import _common as c

    class Autotuner:  # a Triton whose Autotuner renamed its fields
        pass

    for read in (c.autotuner_best_config, c.autotuner_fn, c.autotuner_arg_names, c.heuristics_values):
        with pytest.raises(RuntimeError, match=rf"Autotuner of triton {triton.__version__} \(inside the range"):
            read(Autotuner())
    with pytest.raises(RuntimeError, match="has no field 'best_config'; install a triton in the range"):
        c.autotuner_best_config(Autotuner())
    with pytest.raises(RuntimeError, match="has no field 'configs'"):
        c.autotuner_set_best_config(Autotuner(), _CONFIGS[0])

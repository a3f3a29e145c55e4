"""timm's own ``tests/test_models.py`` against patched timm models and against fastvit's models.

The file comes from timm's source distribution for the installed timm (``.ci/fetch_timm_tests.sh`` caches it
under ~/.cache/fastvit/timm-tests/<version>/). It runs three times in a child pytest with
``tests/timm_suite/fastvit_timm_plugin.py``: stock timm, every ``timm.create_model`` result passed through
``fastvit.patch_model``, and fastvit's models built by ``fastvit.create_model`` under the same names. The
selection covers every class of timm-ecosystem behaviour the suite checks (forward, backward, timm's
pretrained-cfg fields and head API, TorchScript in scriptable mode, ``features_only`` / ``feature_info`` /
``forward_intermediates``, FX forward and backward) over a model list with every layout the patch meets:
plain (``vit_tiny_patch16_224``, ``test_vit`` with dynamic image size), distilled DeiT, registers + GAP +
LayerScale (``test_vit2``), attention-pool head (``test_vit3``), the ResNet hybrid (``vit_tiny_r_s16_p8_224``)
and a layout the patch leaves alone (``eva02_tiny_patch14_224``: rotary attention, SwiGLU).

Without the cached file the tests fail when ``CI=true`` (the fetch is part of ``.ci/run``) and skip with the
reason elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import fastvit

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = Path(__file__).resolve().parent / "timm_suite"
TIMM_TESTS = Path(
    os.environ.get("FASTVIT_TIMM_TESTS", Path.home() / ".cache" / "fastvit" / "timm-tests" / timm.__version__)
)
TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs_non_std",
    "test_model_forward_torchscript",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_model_forward_fx",
    "test_model_backward_fx",
)
TIMM_MODELS = (
    "test_vit",
    "test_vit2",
    "test_vit3",
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "vit_tiny_r_s16_p8_224",
    "eva02_tiny_patch14_224",
)
FASTVIT_MODELS = tuple(m for m in TIMM_MODELS if fastvit.models.is_model(m))  # the plain ViT and distilled DeiT


def _suite_file() -> Path:
    path = TIMM_TESTS / "test_models.py"
    if not path.is_file():
        reason = (
            f"timm {timm.__version__}'s tests/test_models.py is not cached at {path}; run .ci/fetch_timm_tests.sh "
            "(it downloads timm's source distribution once) or set FASTVIT_TIMM_TESTS to a folder holding it"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def _run_suite(mode: str, models: tuple[str, ...], tmp: Path) -> dict[str, str]:
    suite = _suite_file()
    report = tmp / f"{mode}.json"
    env = dict(
        os.environ,
        FASTVIT_TIMM_SUITE_MODE=mode,
        FASTVIT_TIMM_SUITE_MODELS=",".join(models),
        FASTVIT_TIMM_SUITE_TESTS=",".join(TESTS),
        FASTVIT_TIMM_SUITE_REPORT=str(report),
        PYTHONPATH=os.pathsep.join([str(REPO), str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]),
    )
    env.setdefault("TRITON_INTERPRET", "1")
    cmd = [
        sys.executable, "-m", "pytest", suite.name, "-q", "-p", "fastvit_timm_plugin", "-p", "no:cacheprovider",
        "-p", "no:timeout", "-W", "ignore", "-rfE", "--rootdir", str(suite.parent), "-c", os.devnull,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=suite.parent, env=env, capture_output=True, text=True, timeout=1800)
    if not report.is_file():
        raise AssertionError(f"timm suite ({mode}) wrote no report; exit {done.returncode}:\n{done.stdout[-4000:]}")
    outcomes = json.loads(report.read_text())["outcomes"]
    failed = sorted(k for k, v in outcomes.items() if v == "failed")
    print(f"timm suite, {mode}: {_counts(outcomes)}; failed: {failed}\n{done.stdout[-3000:] if failed else ''}")
    return outcomes


def _counts(outcomes: dict[str, str]) -> str:
    passed = sum(v == "passed" for v in outcomes.values())
    return f"{passed} of {len(outcomes)} passed"


def _passed(outcomes: dict[str, str]) -> set[str]:
    return {k for k, v in outcomes.items() if v == "passed"}


def _model_of(nodeid: str) -> str:
    return nodeid.rsplit("-", 1)[-1].rstrip("]").split(".", 1)[0]


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _run_suite("stock", TIMM_MODELS, tmp_path_factory.mktemp("timm_suite"))


def test_selection_covers_every_test_and_model_and_stock_passes(stock):
    assert {nodeid.split("[")[0].split("::")[-1] for nodeid in stock} == set(TESTS)
    assert {_model_of(nodeid) for nodeid in stock} == set(TIMM_MODELS)
    assert _passed(stock) == set(stock), f"stock timm fails its own tests here: {_counts(stock)}"


def test_patched_timm_models_pass_what_stock_passes(stock, tmp_path_factory):
    patched = _run_suite("patched", TIMM_MODELS, tmp_path_factory.mktemp("timm_suite"))
    assert set(patched) == set(stock)
    missing = sorted(_passed(stock) - _passed(patched))
    assert not missing, f"patched {_counts(patched)} vs stock {_counts(stock)}; fail patched only: {missing}"


def test_fastvit_models_pass_what_timm_models_pass(stock, tmp_path_factory):
    assert FASTVIT_MODELS == ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")
    ours = _run_suite("fastvit", FASTVIT_MODELS, tmp_path_factory.mktemp("timm_suite"))
    theirs = {k: v for k, v in stock.items() if _model_of(k) in FASTVIT_MODELS}
    assert set(ours) == set(theirs)
    missing = sorted(_passed(theirs) - _passed(ours))
    assert not missing, f"fastvit {_counts(ours)} vs timm {_counts(theirs)} on {FASTVIT_MODELS}; fail: {missing}"

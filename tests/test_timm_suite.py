"""timm's own ``tests/test_models.py`` against patched timm models and against fastvit's models.

The file comes from timm's source distribution for the installed timm (``.ci/fetch_timm_tests.sh`` caches it
under ~/.cache/fastvit/timm-tests/<version>/). It runs three times in a child pytest with
``tests/timm_suite/fastvit_timm_plugin.py``: stock timm, every ``timm.create_model`` result passed through
``fastvit.patch_model``, and fastvit's models built by ``fastvit.create_model`` under the same names. The
selection covers every class of behaviour, not every combination: the patched runs take timm's forward,
backward, ``forward_intermediates`` and FX forward / backward tests over small models with every layout the
patch meets (``test_vit``: plain, dynamic image size; ``test_vit2``: registers, GAP, LayerScale; ``test_vit3``:
attention-pool head; ``vit_tiny_r_s16_p8_224``: the ResNet hybrid; ``eva02_tiny_patch14_224``: rotary
attention and SwiGLU, which the patch leaves alone); fastvit's ``vit_tiny_patch16_224`` and
``deit_tiny_distilled_patch16_224`` also take timm's pretrained-cfg / head-API test, TorchScript in scriptable
mode and ``features_only``. Each run must pass every item stock timm passes.

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
from tests._timm_fx import stock_fx_problem

pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]  # three child suites on a CPU; each item is small

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = Path(__file__).resolve().parent / "timm_suite"
TIMM_TESTS = Path(
    os.environ.get("FASTVIT_TIMM_TESTS", Path.home() / ".cache" / "fastvit" / "timm-tests" / timm.__version__)
)
# The patch meets every layout in the small models; fastvit's models face every test on their two names.
PATCH_TESTS = (
    "test_model_forward",
    "test_model_backward",
    "test_model_forward_intermediates",
    "test_model_forward_fx",
    "test_model_backward_fx",
)
PATCH_MODELS = ("test_vit", "test_vit2", "test_vit3", "vit_tiny_r_s16_p8_224", "eva02_tiny_patch14_224")
FASTVIT_TESTS = (
    *PATCH_TESTS,
    "test_model_default_cfgs_non_std",
    "test_model_forward_torchscript",
    "test_model_forward_intermediates_features",
)
FASTVIT_MODELS = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")


def _selection(tests: tuple[str, ...], models: tuple[str, ...]) -> dict[str, list[str]]:
    return {t: list(models) for t in tests}


PATCH_SELECTION = _selection(PATCH_TESTS, PATCH_MODELS)
FASTVIT_SELECTION = _selection(FASTVIT_TESTS, FASTVIT_MODELS)
STOCK_SELECTION = {t: PATCH_SELECTION.get(t, []) + FASTVIT_SELECTION.get(t, []) for t in FASTVIT_TESTS}


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


def _run_suite(mode: str, selection: dict[str, list[str]], tmp: Path) -> dict[str, str]:
    suite = _suite_file()
    report = tmp / f"{mode}.json"
    env = dict(
        os.environ,
        FASTVIT_TIMM_SUITE_MODE=mode,
        FASTVIT_TIMM_SUITE_SELECTION=json.dumps(selection),
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


def _test_of(nodeid: str) -> str:
    return nodeid.split("[", 1)[0].split("::")[-1]


def _model_of(nodeid: str) -> str:
    return nodeid.rsplit("-", 1)[-1].rstrip("]").split(".", 1)[0]


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _run_suite("stock", STOCK_SELECTION, tmp_path_factory.mktemp("timm_suite"))


def _subset(outcomes: dict[str, str], selection: dict[str, list[str]]) -> dict[str, str]:
    return {k: v for k, v in outcomes.items() if _model_of(k) in selection.get(_test_of(k), ())}


def test_selection_covers_every_test_and_model_and_stock_passes(stock):
    assert {_test_of(nodeid) for nodeid in stock} == set(FASTVIT_TESTS)
    assert {_model_of(nodeid) for nodeid in stock} == set(PATCH_MODELS + FASTVIT_MODELS)
    assert len(stock) >= sum(len(m) for m in STOCK_SELECTION.values())  # tagged cfg names add items
    failing = set(stock) - _passed(stock)
    if stock_fx_problem() is not None:  # then timm's FX tests fail stock, and patched / fastvit are held to that
        failing -= {k for k in failing if _test_of(k) in ("test_model_forward_fx", "test_model_backward_fx")}
    assert not failing, f"stock timm fails its own tests here: {_counts(stock)}: {sorted(failing)}"


def test_patched_timm_models_pass_what_stock_passes(stock, tmp_path_factory):
    patched = _run_suite("patched", PATCH_SELECTION, tmp_path_factory.mktemp("timm_suite"))
    stock = _subset(stock, PATCH_SELECTION)
    assert set(patched) == set(stock) and stock
    missing = sorted(_passed(stock) - _passed(patched))
    assert not missing, f"patched {_counts(patched)} vs stock {_counts(stock)}; fail patched only: {missing}"


def test_fastvit_models_pass_what_timm_models_pass(stock, tmp_path_factory):
    assert all(fastvit.models.is_model(m) for m in FASTVIT_MODELS)
    ours = _run_suite("fastvit", FASTVIT_SELECTION, tmp_path_factory.mktemp("timm_suite"))
    theirs = _subset(stock, FASTVIT_SELECTION)
    assert set(ours) == set(theirs) and theirs
    missing = sorted(_passed(theirs) - _passed(ours))
    assert not missing, f"fastvit {_counts(ours)} vs timm {_counts(theirs)} on {FASTVIT_MODELS}; fail: {missing}"

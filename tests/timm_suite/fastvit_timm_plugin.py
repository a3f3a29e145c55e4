"""pytest plugin that runs timm's own ``tests/test_models.py`` against patched timm models or fastvit's models.

Loaded by tests/test_timm_suite.py in a child pytest (``-p fastvit_timm_plugin``), configured by environment:

- ``FASTVIT_TIMM_SUITE_MODE``: ``stock`` (timm as it is), ``patched`` (every model ``timm.create_model`` returns
  goes through ``fastvit.patch_model``) or ``fastvit`` (names fastvit registers are built by
  ``fastvit.create_model``; the rest are deselected);
- ``FASTVIT_TIMM_SUITE_SELECTION``: JSON ``{test function: [architecture names]}``, the items to keep
  (everything else is deselected);
- ``FASTVIT_TIMM_SUITE_REPORT``: where to write ``{nodeid: outcome}`` as JSON.

``create_model`` is replaced on ``timm`` and ``timm.models`` when the plugin loads, before the test module
imports it (``from timm import create_model``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import timm
import timm.models

import fastvit
from fastvit.fileio import atomic_write_text

MODE = os.environ.get("FASTVIT_TIMM_SUITE_MODE", "stock")
SELECTION = {t: set(models) for t, models in json.loads(os.environ.get("FASTVIT_TIMM_SUITE_SELECTION", "{}")).items()}
REPORT = os.environ.get("FASTVIT_TIMM_SUITE_REPORT")
if MODE not in ("stock", "patched", "fastvit"):
    raise ValueError(f"FASTVIT_TIMM_SUITE_MODE must be stock, patched or fastvit, got {MODE!r}")

_timm_create_model = timm.create_model


def _patched_create_model(*args: Any, **kwargs: Any) -> Any:
    model = _timm_create_model(*args, **kwargs)
    fastvit.patch_model(model)
    return model


def _fastvit_create_model(model_name: str, *args: Any, **kwargs: Any) -> Any:
    if fastvit.models.is_model(model_name):
        return fastvit.create_model(model_name, *args, **kwargs)
    return _timm_create_model(model_name, *args, **kwargs)  # helpers' own models (none in the selection)


if MODE != "stock":
    _wrapper = _patched_create_model if MODE == "patched" else _fastvit_create_model
    timm.create_model = _wrapper
    timm.models.create_model = _wrapper


def _arch(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("model_name", "") if callspec is not None else ""
    return str(name).split(".", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        arch = _arch(item)
        wanted = arch in SELECTION.get(item.originalname, ())
        if MODE == "fastvit":
            wanted = wanted and fastvit.models.is_model(arch)
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        # a failing setup / teardown, or a skip at setup, decides the outcome; otherwise the call does
        if report.nodeid not in _outcomes or _outcomes[report.nodeid] == "passed":
            _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REPORT:
        atomic_write_text(REPORT, json.dumps({"mode": MODE, "outcomes": _outcomes}, indent=1, sort_keys=True))

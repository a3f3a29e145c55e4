"""``import fastvit`` exposes its submodules as attributes, imported on first access (README: fastvit.utils...)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fastvit


def test_submodules_are_attributes_imported_lazily():
    code = (
        "import sys, fastvit\n"
        "assert 'fastvit.viz' not in sys.modules and 'fastvit.graphs' not in sys.modules\n"
        "assert callable(fastvit.utils.count_flops) and callable(fastvit.viz.attention_rollout)\n"
        "assert callable(fastvit.graphs.graph_replay) and 'fastvit.viz' in sys.modules\n"
        "assert {'utils', 'viz', 'graphs', 'info', 'checkpoints'} <= set(dir(fastvit))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_submodule'"):
        fastvit.not_a_submodule  # noqa: B018

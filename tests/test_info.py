"""``python -m fastvit.info``: the tested version range and its warnings, and an environment every op call
would refuse."""

import pytest

from fastvit import info


def test_installed_stack_is_reported_with_the_tested_range(capsys):
    collected = info.collect()
    assert set(collected["supported"]) == {"torch", "triton", "numpy"}
    info.main()
    out = capsys.readouterr().out
    assert "tested  torch 2.5.1 to 2.15.x, triton 3.1.0 to 3.9.x, numpy 1.26.4 to 2.4.x" in out
    assert ("WARNING" in out) == bool(collected["version_warnings"])


def test_both_pinned_ci_stacks_are_inside_the_range():
    assert info.version_warnings({"torch": "2.15.0+cu132", "triton": "3.9.0", "numpy": "2.4.6"}) == []
    assert info.version_warnings({"torch": "2.5.1+cu124", "triton": "3.1.0", "numpy": "1.26.4"}) == []
    assert info.version_warnings({"torch": "2.8.0", "triton": "3.4.0", "numpy": "2.3.5"}) == []


def test_out_of_range_versions_warn_with_the_fix():
    (old,) = info.version_warnings({"torch": "2.4.0+cu121", "triton": "3.1.0", "numpy": "1.26.4"})
    assert "torch 2.4.0+cu121 is outside the tested range 2.5.1 to 2.15.x" in old
    assert "pip install 'torch>=2.5.1,<2.16'" in old
    (new,) = info.version_warnings({"torch": "2.15.0", "triton": "3.10.0", "numpy": "2.4.6"})
    assert "triton 3.10.0 is outside" in new
    assert info.version_warnings({"torch": "2.15.3", "triton": "3.9.1", "numpy": "2.4.9"}) == []  # patch releases


def test_known_bad_pairings_warn():
    (zeros,) = info.version_warnings({"torch": "2.5.1", "triton": "3.1.0", "numpy": "2.3.5"})
    assert "numpy<2" in zeros
    (abi,) = info.version_warnings({"torch": "2.10.0", "triton": "3.6.0", "numpy": "2.4.6"})
    assert "numpy<2.4" in abi
    assert info.version_warnings({"torch": "2.10.0", "triton": "3.6.0", "numpy": "2.3.5"}) == []


def test_unparsable_or_missing_versions_are_skipped():
    assert info.version_warnings({"torch": "", "triton": "not importable (ImportError: x)"}) == []


@pytest.mark.parametrize("value", ["trtion", "Tritn", "flash"])
def test_unknown_backend_env_is_flagged(monkeypatch, capsys, value):
    monkeypatch.setenv("FASTVIT_BACKEND", value)
    assert info.env_problems() == [
        f"FASTVIT_BACKEND={value!r} is not a backend: every op call will raise. Set it to one of torch, triton, "
        "cuda or auto, or unset it"
    ]
    info.main()
    assert f"WARNING: FASTVIT_BACKEND={value!r} is not a backend" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["torch", "Triton", " auto ", ""])
def test_known_backend_env_is_not_flagged(monkeypatch, value):
    monkeypatch.setenv("FASTVIT_BACKEND", value)
    assert info.env_problems() == []

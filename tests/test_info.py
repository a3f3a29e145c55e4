"""``python -m fastvit.info`` flags an environment every op call would refuse."""

from __future__ import annotations

import pytest

from fastvit import info


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

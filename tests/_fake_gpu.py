"""A faked sm_90 GPU for the measured choices inside the Triton launchers (the TMA GEMM, the fused wgrad): CPU
tensors are passed off as on ``cuda:0`` of a "Fake H100", the dispatch cache lives under the test's tmp_path,
and the mode / switch environment variables are unset, so a test's injected timer decides."""

from __future__ import annotations

from pathlib import Path

import torch

from fastvit.ops import dispatch


def fake_sm90(monkeypatch, tmp_path: Path, module, device_attr: str, env_switch: str) -> Path:
    """Patches ``module.<device_attr>`` (the launcher's "which GPU" function) and dispatch's device queries;
    returns the cache file's path. The caller's fixture resets dispatch after the test."""
    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(dispatch, "_gpu_name", lambda index: "Fake H100")
    monkeypatch.setattr(dispatch, "_index", lambda device: 0)
    monkeypatch.setattr(module, device_attr, lambda t: torch.device("cuda", 0))
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    for name in (dispatch.MODE_ENV, env_switch):
        monkeypatch.delenv(name, raising=False)
    dispatch.reset()
    return tmp_path / "dispatch.json"

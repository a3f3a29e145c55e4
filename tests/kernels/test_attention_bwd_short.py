"""fastvit.kernels.attention's short-sequence backward (one program per (b, h), N <= 256): routing, and
agreement with the blocked backward it replaces there, with and without dropout."""

from __future__ import annotations

import pytest
import torch

from fastvit import kernels
from tests.conftest import DEVICE

pytestmark = pytest.mark.skipif(
    kernels.TRITON_IMPORT_ERROR is not None, reason=f"triton is not importable: {kernels.TRITON_IMPORT_ERROR}"
)


@pytest.mark.parametrize(
    "n_q,n_k,d,short",
    [
        (1, 1, 16, True),
        (197, 197, 64, True),  # ViT-B/16, DeiT-S
        (256, 256, 64, True),
        (64, 64, 128, True),  # 64 x 128 fp32 dq: as large as 256 x 64
        (128, 128, 128, True),
        (197, 197, 80, False),  # split head dims (64 + 16 columns) spill
        (64, 64, 80, False),
        (50, 50, 48, False),
        (256, 256, 128, False),  # 256 x 128 dq is over the on-chip budget
        (257, 257, 80, False),  # ViT-H/14
        (257, 257, 64, False),
        (577, 577, 64, False),  # ViT-L/16@384
        (40, 300, 32, False),  # long keys
    ],
)
def test_routing(n_q, n_k, d, short):
    from fastvit.kernels import attention as ka

    assert ka.uses_short_backward(n_q, n_k, d) is short


def _inputs(B, H, n_q, n_k, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(n_q * 1000 + n_k + D)
    q = torch.randn(B, H, n_q, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, H, n_k, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    dout = torch.randn(B, H, n_q, D, generator=g).to(DEVICE, dtype)
    return q, k, v, dout


def _backward(ka, q, k, v, dout, dropout_p=0.0, seed=None):
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    ka.attention_fwd(q, k, v, out, lse, scale, dropout_p, seed)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]  # every element must be written
    ka.attention_bwd(dout, q, k, v, out, lse, *grads, scale, dropout_p, seed)
    return grads


def _launched(ka, monkeypatch):
    names = []
    real = ka.launch_autotuned

    def recording(tuned, grid, *args, **kwargs):
        names.append(tuned.base_fn.__name__)
        return real(tuned, grid, *args, **kwargs)

    monkeypatch.setattr(ka, "launch_autotuned", recording)
    return names


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "n_q,n_k,d,dropout_p",
    [(40, 40, 32, 0.0), (45, 45, 64, 0.3), (17, 50, 16, 0.0), (33, 33, 128, 0.2)],
    ids=["plain", "dropout", "cross_d16", "d128_dropout"],
)
def test_short_backward_matches_blocked_backward(n_q, n_k, d, dropout_p, monkeypatch):
    """The same gradients (fp32, exact products) from both backward kernels, the dropout mask included."""
    from fastvit.kernels import attention as ka

    assert ka.uses_short_backward(n_q, n_k, d)
    q, k, v, dout = _inputs(2, 2, n_q, n_k, d)
    seed = torch.tensor([12345], device=DEVICE, dtype=torch.int64) if dropout_p else None
    launched = _launched(ka, monkeypatch)
    short = _backward(ka, q, k, v, dout, dropout_p, seed)
    monkeypatch.setattr(ka, "uses_short_backward", lambda *args: False)
    blocked = _backward(ka, q, k, v, dout, dropout_p, seed)
    assert launched == ["_attn_fwd_kernel", "_attn_bwd_short_kernel", "_attn_fwd_kernel", "_attn_bwd_kernel"]
    for name, a, b in zip(("dq", "dk", "dv"), short, blocked):
        assert not a.isnan().any(), f"{name}: the short backward left elements unwritten"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.interpreter
def test_long_sequences_keep_the_blocked_backward(monkeypatch):
    from fastvit.kernels import attention as ka

    q, k, v, dout = _inputs(1, 1, 260, 260, 16)
    launched = _launched(ka, monkeypatch)
    grads = _backward(ka, q, k, v, dout)
    assert launched == ["_attn_fwd_kernel", "_attn_bwd_kernel"]
    assert not any(g.isnan().any() for g in grads)


def test_routing_by_target(monkeypatch):
    """On a GPU only sm_90 and newer run the short backward (on sm_80 every tile spills; its shared memory
    exceeds sm_86 / sm_89's); the interpreter ignores the target."""
    from fastvit.kernels import attention as ka

    monkeypatch.setattr(ka, "INTERPRET", False)
    assert ka.uses_short_backward(197, 197, 64, 90) and ka.uses_short_backward(197, 197, 64, 100)
    assert not ka.uses_short_backward(197, 197, 64, 80) and not ka.uses_short_backward(197, 197, 64, 89)
    monkeypatch.setattr(ka, "INTERPRET", True)
    assert ka.uses_short_backward(197, 197, 64, 80)

"""fastvit.layers LayerNorm, Linear, Mlp, DropPath: timm/torch semantics on the torch backend (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp
from torch import nn

from fastvit.layers import DropPath, LayerNorm, Linear, Mlp, QuickGELU
from fastvit.testing import assert_close


def test_layer_norm_matches_torch_and_fuses_residual():
    ln = LayerNorm(48)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x, r = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    assert ln.eps == 1e-6
    assert_close(ln(x), F.layer_norm(x, (48,), ln.weight, ln.bias, 1e-6))
    y, z = ln(x, residual=r)
    assert_close(z, x + r)
    assert_close(y, F.layer_norm(x + r, (48,), ln.weight, ln.bias, 1e-6))
    assert set(ln.state_dict()) == {"weight", "bias"}


def test_layer_norm_refuses_non_affine():
    with pytest.raises(ValueError, match="elementwise_affine"):
        LayerNorm(8, elementwise_affine=False)


@pytest.mark.parametrize(
    "activation, ref", [(None, lambda h: h), ("gelu", F.gelu), ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh"))]
)
def test_linear_activation_and_residual(activation, ref):
    lin = Linear(32, 24)
    x, r = torch.randn(3, 7, 32), torch.randn(3, 7, 24)
    expected = ref(F.linear(x, lin.weight, lin.bias))
    assert_close(lin(x, activation=activation), expected)
    assert_close(lin(x, activation=activation, residual=r), expected + r)


def test_mlp_matches_timm_and_fuses_residual():
    ours, theirs = Mlp(32, 128), TimmMlp(32, 128)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.fused_act == "gelu"
    x, r = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    assert_close(ours(x), theirs(x))
    assert_close(ours(x, residual=r), r + theirs(x))


def test_mlp_unfusable_activation_runs_after_the_gemm():
    mlp = Mlp(16, 32, act_layer=nn.ReLU)
    assert mlp.fused_act is None
    x = torch.randn(2, 4, 16)
    expected = F.linear(F.relu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    assert_close(mlp(x), expected)
    assert Mlp(16, act_layer="quick_gelu").fused_act == "quick_gelu"
    assert isinstance(Mlp(16, act_layer="quick_gelu").act, QuickGELU)


def test_mlp_bad_activation_and_residual_under_dropout():
    with pytest.raises(ValueError, match="unknown act_layer"):
        Mlp(8, act_layer="swishy")
    mlp = Mlp(8, drop=0.5).train()
    assert not mlp.residual_fusable()
    with pytest.raises(RuntimeError, match="dropout"):
        mlp(torch.randn(1, 2, 8), residual=torch.randn(1, 2, 8))


def test_drop_path_only_in_training_and_per_sample():
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    assert dp.eval()(x) is x
    y = dp.train()(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert bool(((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()), "a sample must be kept or dropped whole"
    assert 0 < int((per_sample[:, 0] == 0).sum()) < 64
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)

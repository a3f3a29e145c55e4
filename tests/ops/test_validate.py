"""fastvit.ops._validate: None weights, wrong-type eps and K=0 GEMMs give errors naming the argument."""

from __future__ import annotations

import pytest
import torch

from fastvit import ops


def test_none_weights_are_named():
    x = torch.randn(2, 4, 8)
    with pytest.raises(TypeError, match=r"fastvit\.ops\.layer_norm: weight is None"):
        ops.layer_norm(x, None, torch.zeros(8))
    with pytest.raises(TypeError, match=r"fastvit\.ops\.linear: weight is None"):
        ops.linear(x, None)
    with pytest.raises(TypeError, match=r"fastvit\.ops\.linear: x is None"):
        ops.linear(None, torch.randn(3, 8))
    with pytest.raises(TypeError, match=r"fastvit\.ops\.patch_embed: weight is None"):
        ops.patch_embed(torch.randn(1, 3, 8, 8), None, None, patch_size=4)
    with pytest.raises(TypeError, match=r"fastvit\.ops\.linear: bias must be a torch\.Tensor or None, got list"):
        ops.linear(x, torch.randn(3, 8), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("eps, error", [("1e-6", TypeError), (None, TypeError), (True, TypeError), (0.0, ValueError),
                                        (float("inf"), ValueError), (-1e-5, ValueError)])  # fmt: skip
def test_eps_of_the_wrong_type_or_range_is_named(eps, error):
    x = torch.randn(2, 8)
    with pytest.raises(error, match=r"fastvit\.ops\.layer_norm: eps must be"):
        ops.layer_norm(x, torch.ones(8), torch.zeros(8), eps=eps)
    with pytest.raises(error, match=r"fastvit\.ops\.soft_split: norm_eps must be"):
        ops.soft_split(
            torch.randn(1, 3, 8, 8), kernel_size=3, stride=2, padding=1,
            norm_weight=torch.ones(27), norm_bias=torch.zeros(27), norm_eps=eps,
        )  # fmt: skip


def test_gemm_with_k_zero():
    x, w, b = torch.randn(4, 0), torch.randn(3, 0), torch.arange(3.0)
    with pytest.raises(ValueError, match=r"fastvit\.ops\.linear: x has in_features K=0.*backend='torch'"):
        ops.linear(x, w, b, backend="triton")
    # auto dispatch and the reference give the empty-reduction answer: bias only
    torch.testing.assert_close(ops.linear(x, w, b), b.expand(4, 3))
    torch.testing.assert_close(ops.linear(x, w, b, backend="torch"), b.expand(4, 3))

"""fastvit.layers.fused: fastvit's layers and patched timm modules run the same fused forwards, so they
follow the same fusion rules (which residual adds are fused, which submodules are called)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

import fastvit
from fastvit.layers import Block, fused
from fastvit.testing import assert_close


def _pair(init_values=None, drop_path=0.0):
    theirs = TimmBlock(32, num_heads=2, qkv_bias=True, init_values=init_values, drop_path=drop_path).eval()
    ours = Block(32, num_heads=2, qkv_bias=True, init_values=init_values, drop_path=drop_path).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fastvit.patch_model(theirs, backend="torch")
    return ours, theirs


def _spy(monkeypatch):
    """Records, per fused.mlp call, whether the residual went into fc2's epilogue."""
    calls: list[bool] = []
    real = fused.mlp

    def spy(module, x, activation, residual=None, backend=None):
        calls.append(residual is not None)
        return real(module, x, activation, residual=residual, backend=backend)

    monkeypatch.setattr(fused, "mlp", spy)
    return calls


# (name, setup on both blocks, expected: second residual fused into fc2)
CASES = [
    ("plain", lambda b: None, True),
    ("layer_scale", "init_values", False),
    ("drop_path_training", "drop_path", False),
    ("hook_on_fc2", lambda b: b.mlp.fc2.register_forward_hook(lambda *a: None), False),
    ("hook_on_mlp", lambda b: b.mlp.register_forward_hook(lambda *a: None), False),
    ("hook_on_act", lambda b: b.mlp.act.register_forward_hook(lambda *a: None), False),
    ("hook_on_drop_path2", lambda b: b.drop_path2.register_forward_hook(lambda *a: None), False),
]


@pytest.mark.parametrize("name,setup,expect", CASES, ids=[c[0] for c in CASES])
def test_both_sides_fuse_the_second_residual_under_one_rule(monkeypatch, name, setup, expect):
    ours, theirs = _pair(
        init_values=1e-2 if setup == "init_values" else None, drop_path=0.5 if setup == "drop_path" else 0.0
    )
    if setup == "drop_path":
        ours.train()
        theirs.train()
    elif callable(setup):
        setup(ours)
        setup(theirs)
    calls = _spy(monkeypatch)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        a = ours(x)
        torch.manual_seed(0)
        b = theirs(x)
    fused_calls = [c for c in calls if c]
    # each side made one MLP call through fused.mlp (or none, when hooks on the Mlp / act force module calls)
    assert len(fused_calls) == (2 if expect else 0), (name, calls)
    if setup != "drop_path":  # drop-path draws differ in order between the two module trees
        assert_close(a, b)


def test_both_sides_keep_an_fp32_stream_under_autocast(monkeypatch):
    ours, theirs = _pair()
    calls = _spy(monkeypatch)
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), theirs(x)
    assert not any(calls), "the bf16 epilogue would lower the fp32 residual stream"
    assert a.dtype == b.dtype == torch.float32
    assert_close(a, b, torch.bfloat16)


def test_a_hooked_linear_is_called_with_its_epilogue():
    """fastvit's Linear with a hook runs as a module (the hook fires), with the same result."""
    ours, _ = _pair()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = ours(x)
        seen = []
        ours.attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        ours.mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        out = ours(x)
    assert seen == [torch.Size([2, 5, 96]), torch.Size([2, 5, 128])]
    assert_close(out, ref)


def test_an_attn_drop_hook_selects_the_explicit_path():
    ours, _ = _pair()
    seen = []
    ours.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        ours(torch.randn(2, 5, 32))
    assert seen == [torch.Size([2, 2, 5, 5])]


def test_a_custom_mlp_layer_is_called_as_a_module():
    class Doubling(nn.Module):
        def __init__(self, in_features, hidden_features, act_layer, bias, drop):
            super().__init__()
            self.fc = nn.Linear(in_features, in_features)

        def forward(self, x):
            return 2 * self.fc(x)

    block = Block(32, num_heads=2, mlp_layer=Doubling).eval()
    assert block._mlp_plan() is None
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        y = block(x)
        a = block.attn(block.norm1(x))
        h = x + a
        assert_close(y, h + 2 * block.mlp.fc(block.norm2(h)))


def test_dropout_active_answers_identity_without_attribute_lookups():
    """A training-mode Identity (a block's unused drop_path2) is inactive by its class; one given a rate
    (an instance attribute) still answers by it."""
    ident = nn.Identity().train()
    assert not fused.dropout_active(ident)
    ident.p = 0.5
    assert fused.dropout_active(ident)
    holder = nn.Identity().train()
    holder.drop_prob = 0.0
    assert not fused.dropout_active(holder)
    assert fused.dropout_active(nn.Dropout(0.1).train()) and not fused.dropout_active(nn.Dropout(0.1).eval())
    assert not fused.dropout_active(nn.Dropout(0.0).train())

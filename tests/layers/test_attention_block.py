"""fastvit.layers Attention and Block against timm's (state dicts loaded strictly, CPU fp32)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models.vision_transformer import Block as TimmBlock
from timm.utils import AttentionExtract

from fastvit.layers import Attention, Block
from fastvit.layers import fused as fused_forwards
from fastvit.testing import assert_close


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_attention_matches_timm(qk_norm, fused):
    ours = Attention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm).eval()
    theirs = TimmAttention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=TimmLayerNorm).eval()
    if qk_norm:  # give the q/k norms non-trivial parameters
        for p in theirs.parameters():
            if p.dim() == 1:
                torch.nn.init.normal_(p)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.fused_attn = fused
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def test_explicit_path_keeps_probabilities_and_feeds_attention_extract():
    attn = Attention(32, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        fused_out = attn(x)
        assert attn.last_attn is None
        attn.fused_attn = False
        out = attn(x)
    assert_close(out, fused_out)
    probs = attn.last_attn
    assert probs.shape == (3, 2, 10, 10)
    assert_close(probs.sum(-1), torch.ones(3, 2, 10))
    q, k, _ = attn.qkv(x).reshape(3, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)
    assert_close(probs, torch.softmax(q @ k.transpose(-2, -1) * 16**-0.5, -1))

    # timm's hook-based extractor watches *attn_drop, which the explicit path calls with the probabilities
    model = torch.nn.Sequential()
    model.add_module("attn", attn)
    extracted = AttentionExtract(model, method="hook")(x)
    assert list(extracted) == ["attn.attn_drop"]
    assert_close(extracted["attn.attn_drop"], probs)


def test_attention_extra_macs_and_bad_heads():
    attn = Attention(64, num_heads=4)
    assert attn.extra_macs((2, 10, 64)) == {"attention": 2 * 2 * 4 * 10 * 10 * 16}
    with pytest.raises(ValueError, match="divisible"):
        Attention(65, num_heads=4)


@pytest.mark.parametrize("init_values", [None, 1e-2])
def test_block_matches_timm(init_values):
    ours = Block(48, num_heads=3, qkv_bias=True, init_values=init_values).eval()
    theirs = TimmBlock(48, num_heads=3, qkv_bias=True, init_values=init_values).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 13, 48)
    assert fused_forwards.mlp_residual_fusable(ours, x, ours._mlp_plan()) == (init_values is None)
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def test_block_scale_argument_reaches_attention():
    """Block(scale=s) scales q @ k.T by s (T2T-ViT's qk_scale); the default stays head_dim ** -0.5."""
    assert Block(48, num_heads=3).attn.scale == 16**-0.5
    ours = Block(48, num_heads=3, qkv_bias=True, scale=0.05).eval()
    theirs = TimmBlock(48, num_heads=3, qkv_bias=True).eval()
    # timm's Block has no scale argument; its explicit attention path reads the attribute (SDPA ignores it).
    theirs.attn.scale, theirs.attn.fused_attn = 0.05, False
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.attn.scale == 0.05
    x = torch.randn(2, 13, 48)
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def test_block_gradients_match_timm():
    ours = Block(32, num_heads=2, qkv_bias=True)
    theirs = TimmBlock(32, num_heads=2, qkv_bias=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x1 = torch.randn(2, 7, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    ours(x1).square().sum().backward()
    theirs(x2).square().sum().backward()
    assert_close(x1.grad, x2.grad)
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs_grads[name].grad)


def test_block_regularisers_only_in_training():
    block = Block(32, num_heads=2, drop_path=0.5, proj_drop=0.3, attn_drop=0.3)
    x = torch.randn(4, 9, 32)
    block.eval()
    with torch.no_grad():
        a, b = block(x), block(x)
        assert torch.equal(a, b)
        block.train()
        assert not fused_forwards.mlp_residual_fusable(block, x, block._mlp_plan())
        c = block(x)
    assert not torch.allclose(a, c)


def test_block_with_a_plain_torch_norm_runs_unfused():
    ours = Block(32, num_heads=2, qkv_bias=True, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)).eval()
    theirs = TimmBlock(32, num_heads=2, qkv_bias=True).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def _reachable_nodes(out: torch.Tensor) -> dict[str, int]:
    seen, counts, stack = set(), {}, [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        counts[type(fn).__name__] = counts.get(type(fn).__name__, 0) + 1
        stack.extend(f for f, _ in fn.next_functions)
    return counts


def test_block_row_path_matches_the_module_path_bit_for_bit():
    """The row path (norm1 / attn run without module calls on (B*N, C) rows) against the same block forced
    onto its per-module path by a hook: same outputs and gradients, four fewer view nodes around the GEMMs
    and two fewer around the packed attention (it takes and returns rows)."""
    block = Block(32, num_heads=2, qkv_bias=True)
    x1 = torch.randn(2, 7, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1 = block(x1)
    n1 = _reachable_nodes(y1)
    y1.square().sum().backward()
    g1 = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    handle = block.attn.register_forward_pre_hook(lambda m, i: None)  # any hook: the module is called
    try:
        y2 = block(x2)
        n2 = _reachable_nodes(y2)
        y2.square().sum().backward()
    finally:
        handle.remove()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    for name, p in block.named_parameters():
        assert torch.equal(p.grad, g1[name]), name
    if n2.get("UnsafeViewBackward0", 0):  # torch 2.15 records a view pair per 3-D GEMM; 2.5 does not
        assert n1.get("UnsafeViewBackward0", 0) == 0 and n2["UnsafeViewBackward0"] == 4
        assert n1["ViewBackward0"] == n2["ViewBackward0"] - 2, (n1, n2)
        assert sum(n1.values()) == sum(n2.values()) - 6
    else:
        assert sum(n1.values()) <= sum(n2.values()), (n1, n2)


def test_block_row_path_inference_reuses_the_previous_blocks_rows():
    """Without grad a block output (a view of its rows) enters the next row-path block as those rows."""
    blocks = torch.nn.Sequential(Block(32, num_heads=2), Block(32, num_heads=2)).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y = blocks(x)
        ref = blocks[1](blocks[0](x).clone())  # a fresh tensor: the reshape branch
    assert y.shape == (2, 5, 32) and y._base is not None and y._base.shape == (10, 32)
    assert torch.equal(y, ref)

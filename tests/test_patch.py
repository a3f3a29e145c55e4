"""fastvit.patch: patched timm models against the stock model (Liger-style), unpatch exactness, the report,
the fallbacks (masks, hooks, unsupported classes) and return_attention.

Models are timm architectures at reduced depth / width / image size with random weights (pretrained=False),
so the whole file runs in well under a minute on a CPU. On CPU the ops dispatch to their torch references,
so patched and stock agree to fp32 rounding; the Triton kernels are exercised under the interpreter in
the two ``backend="triton"`` cases; GPU cases compare bf16 against fp32 timm with the three-way rule.
"""

from __future__ import annotations

import collections
import copy
import functools
import types

import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import ParallelScalingBlock
from torch import nn

import fastvit
from fastvit import ops
from fastvit.patch import PatchError, PatchReport, patch_model, return_attention, unpatch_model
from fastvit.testing import assert_three_way
from tests._timm_fx import require_stock_fx

FP32 = dict(atol=1e-5, rtol=1e-5)

# (id, timm name, constructor overrides, input (H, W), classes expected in report.skipped)
ZOO = [
    ("vit_tiny", "vit_tiny_patch16_224", dict(depth=2, img_size=32), (32, 32), set()),
    ("vit_small_p32", "vit_small_patch32_224", dict(depth=1, img_size=64, embed_dim=64, num_heads=2), (64, 64), set()),
    ("deit_tiny", "deit_tiny_patch16_224", dict(depth=2, img_size=32), (32, 32), set()),
    ("deit_tiny_distilled", "deit_tiny_distilled_patch16_224", dict(depth=2, img_size=32), (32, 32), set()),
    (
        "deit3_layerscale",
        "deit3_small_patch16_224",
        dict(depth=2, img_size=32, embed_dim=64, num_heads=2),
        (32, 32),
        set(),
    ),
    ("hybrid_r_s16_p8", "vit_tiny_r_s16_p8_224", dict(depth=2, img_size=64), (64, 64), set()),
    ("hybrid_r50", "vit_base_r50_s16_224", dict(depth=1, img_size=32, embed_dim=64, num_heads=2), (32, 32), set()),
    (
        "clip_quickgelu_norm_pre",
        "vit_base_patch16_clip_quickgelu_224",
        dict(depth=2, img_size=32, embed_dim=64, num_heads=2),
        (32, 32),
        set(),
    ),
    (
        "siglip_gelu_tanh_map_pool",
        "vit_base_patch16_siglip_224",
        dict(depth=2, img_size=32, embed_dim=64, num_heads=2, act_layer="gelu_tanh"),
        (32, 32),
        {"AttentionPoolLatent"},
    ),
    (
        "gap_fc_norm_reg_tokens",
        "vit_base_patch16_reg4_gap_256",
        dict(depth=2, img_size=32, embed_dim=64, num_heads=2),
        (32, 32),
        set(),
    ),
    ("qk_norm", "vit_tiny_patch16_224", dict(depth=2, img_size=32, qk_norm=True), (32, 32), set()),
    ("dynamic_img_size", "vit_tiny_patch16_224", dict(depth=2, img_size=32, dynamic_img_size=True), (48, 32), set()),
    (
        "dynamic_img_pad",
        "vit_tiny_patch16_224",
        dict(depth=1, img_size=32, dynamic_img_size=True, dynamic_img_pad=True),
        (40, 36),
        set(),
    ),
    (
        "parallel_scaling_block",
        "vit_tiny_patch16_224",
        dict(depth=1, img_size=32, block_fn=ParallelScalingBlock),
        (32, 32),
        {"ParallelScalingBlock"},
    ),
    (
        "res_post_block",
        "vit_base_patch16_rpn_224",
        dict(depth=1, img_size=32, embed_dim=64, num_heads=2),
        (32, 32),
        {"ResPostBlock"},
    ),
    (
        "eva02_rotary_swiglu",
        "eva02_tiny_patch14_224",
        dict(depth=1, img_size=28),
        (28, 28),
        {"EvaBlock", "EvaAttention", "GluMlp"},
    ),
]


def _timm(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


def _tiny(**kwargs) -> nn.Module:
    args = dict(depth=2, img_size=32, embed_dim=32, num_heads=2)
    args.update(kwargs)
    return _timm("vit_tiny_patch16_224", **args)


def _pair(model: nn.Module, **patch_kwargs) -> tuple[nn.Module, nn.Module, PatchReport]:
    """(stock, patched copy, report)."""
    patched = copy.deepcopy(model)
    return model, patched, patch_model(patched, **patch_kwargs)


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def _grads(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _logits(model(x)).backward(grad_out)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts calls of the fastvit ops the patched forwards use."""
    calls: collections.Counter = collections.Counter()
    for name in ("linear", "layer_norm", "attention", "attention_qkvpacked", "patch_embed"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls


def _instance_forwards(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("case", ZOO, ids=[c[0] for c in ZOO])
def test_zoo_patched_matches_stock(case, op_calls):
    _, name, kwargs, (H, W), expected_skipped = case
    stock, patched, report = _pair(_timm(name, **kwargs).eval())
    keys = list(stock.state_dict().keys())
    assert list(patched.state_dict().keys()) == keys
    assert {s.class_name for s in report.skipped} == expected_skipped
    for s in report.skipped:
        assert s.reason and dict(patched.named_modules())[s.path].__class__.__name__ == s.class_name
        assert "forward" not in dict(patched.named_modules())[s.path].__dict__  # unsupported stays stock
    timm_attn = [m for m in stock.modules() if type(m).__name__ == "Attention"]
    assert report.counts().get("attention", 0) == len(timm_attn)
    assert report.num_patched == len(_instance_forwards(patched)) > 0

    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        ref = _logits(stock(x))
        op_calls.clear()
        out = _logits(patched(x))
    torch.testing.assert_close(out, ref, **FP32)
    # every patched module ran its ops once (a block's norm2 runs fused: one layer_norm call either way)
    counts = report.counts()
    assert op_calls["attention_qkvpacked"] + op_calls["attention"] == counts.get("attention", 0) == len(timm_attn)
    assert op_calls["linear"] == 2 * counts.get("attention", 0) + 2 * counts.get("mlp", 0)
    assert op_calls["layer_norm"] == counts.get("norm", 0)
    assert op_calls["patch_embed"] == counts.get("patch_embed", 0)

    # a training step: every parameter gradient (dropout rates are 0 in these builds)
    stock.train()
    patched.train()
    grad_out = torch.randn_like(ref)
    g_ref, g_out = _grads(stock, x, grad_out), _grads(patched, x, grad_out)
    assert g_out.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_out[n], g_ref[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"grad {n}: {m}")

    stock.eval()
    patched.eval()
    assert unpatch_model(patched) == report.num_patched
    assert _instance_forwards(patched) == []
    with torch.no_grad():
        assert torch.equal(_logits(patched(x)), ref)


@pytest.mark.parametrize(
    "act_layer, expected",
    [
        (nn.GELU, "gelu"),
        ("gelu", "gelu"),  # timm.layers.GELU
        (functools.partial(nn.GELU, approximate="tanh"), "gelu_tanh"),
        ("gelu_tanh", "gelu_tanh"),  # timm.layers.GELUTanh (SigLIP)
        ("quick_gelu", "quick_gelu"),  # timm.layers.QuickGELU (CLIP)
        (nn.SiLU, None),
    ],
)
def test_mlp_activation_dispatch(act_layer, expected):
    """Each GELU variant maps to its own epilogue (erf vs tanh differ by ~5e-4: a swap would show at 1e-5)."""
    model = _tiny(depth=1, act_layer=act_layer).eval()
    with torch.no_grad():  # pre-activations of order 1, where the variants differ, and a visible output
        model.blocks[0].mlp.fc1.weight.mul_(40.0)
        model.blocks[0].mlp.fc2.weight.mul_(40.0)
    stock, patched, report = _pair(model)
    mlp = patched.blocks[0].mlp
    x, h = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), **FP32)
        ref = stock.blocks[0].mlp(h)
        torch.testing.assert_close(mlp(h), ref, **FP32)
        if expected is None:
            assert "_fastvit_patch" not in mlp.__dict__
            assert [s.path for s in report.skipped] == ["blocks.0.mlp"]
            assert "SiLU has no fused epilogue" in report.skipped[0].reason
            return
        assert mlp._fastvit_patch.activation == expected
        mlp._fastvit_patch.activation = "gelu" if expected != "gelu" else "gelu_tanh"  # the wrong variant
        assert (mlp(h) - ref).abs().max() > 1e-3  # ... would be caught


def test_report_counts_and_table():
    model = _tiny()
    report = patch_model(model)
    assert report.counts() == {"attention": 2, "mlp": 2, "block": 2, "norm": 5, "patch_embed": 1}
    assert report.num_patched == 12 and report.skipped == []
    paths = {p.path: p.kind for p in report.patched}
    assert paths["blocks.0.attn"] == "attention" and paths["norm"] == "norm" and paths["patch_embed"] == "patch_embed"
    text = str(report).splitlines()
    assert text[0] == "fastvit.patch_model: 12 modules patched, 0 skipped (backend: auto)"
    assert text[1].split() == ["kind", "patched", "skipped"]
    assert text[2].split() == ["attention", "2", "0"] and text[5].split() == ["norm", "5", "0"]

    eva = _timm("eva02_tiny_patch14_224", depth=1, img_size=28)
    text = str(patch_model(eva, backend="torch"))
    assert "(backend: torch)" in text
    assert "blocks.0 (EvaBlock): EvaBlock is not timm's pre-norm ViT Block" in text


def test_flags_select_what_is_patched():
    x = torch.randn(2, 3, 32, 32)
    stock = _tiny().eval()
    only_embed = patch_model(copy.deepcopy(stock), attention=False, mlp=False, norm=False)
    assert only_embed.counts() == {"patch_embed": 1}
    # mlp without norm: blocks fuse the second residual into fc2 but keep the stock norm2
    model = copy.deepcopy(stock)
    report = patch_model(model, attention=False, norm=False)
    assert report.counts() == {"mlp": 2, "block": 2, "patch_embed": 1}
    assert not model.blocks[0]._fastvit_patch.fuse_norm2
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), **FP32)


def test_idempotent_and_unpatch_exact():
    x = torch.randn(2, 3, 32, 32)
    stock = _tiny(init_values=0.1).eval()
    with torch.no_grad():
        ref = stock(x)
    model = copy.deepcopy(stock)
    first = patch_model(model)
    funcs = {n: m.forward.__func__ for n, m in model.named_modules() if "forward" in m.__dict__}
    second = patch_model(model)
    assert second.patched == first.patched and second.num_patched == first.num_patched
    assert {n: m.forward.__func__ for n, m in model.named_modules() if "forward" in m.__dict__} == funcs
    assert unpatch_model(model) == first.num_patched
    for m in model.modules():
        assert "forward" not in m.__dict__ and "_fastvit_patch" not in m.__dict__
        assert m.forward.__func__ is type(m).forward
    assert unpatch_model(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_unpatch_restores_an_existing_instance_forward():
    model = _tiny(depth=1)
    norm = model.norm

    def custom(self, x):
        return nn.LayerNorm.forward(self, x)

    norm.forward = types.MethodType(custom, norm)
    saved = norm.__dict__["forward"]
    patch_model(model)
    assert norm.__dict__["forward"] is not saved
    unpatch_model(model)
    assert norm.__dict__["forward"] is saved


def test_parameters_and_buffers_are_the_same_objects():
    model = _tiny()
    before = {n: t.data_ptr() for n, t in model.state_dict().items()}
    params = list(model.parameters())
    patch_model(model)
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == before
    assert all(a is b for a, b in zip(params, model.parameters()))


def test_dropout_only_in_training():
    stock = _tiny(attn_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.2, init_values=0.5)
    stock, patched, _ = _pair(stock)
    x = torch.randn(2, 3, 32, 32)
    stock.eval(), patched.eval()
    with torch.no_grad():
        ref_eval = stock(x)
        torch.testing.assert_close(patched(x), ref_eval, **FP32)
        torch.testing.assert_close(patched(x), patched(x), atol=0, rtol=0)  # deterministic in eval
        stock.train(), patched.train()
        torch.manual_seed(1)
        ref_train = stock(x)
        torch.manual_seed(1)
        out_train = patched(x)
    # same dropout draws in the same order (the torch backend's attention dropout is SDPA's)
    assert (out_train - ref_eval).abs().max() > 1e-3  # dropout really active in training
    torch.testing.assert_close(out_train, ref_train, **FP32)
    patched.eval()  # train -> eval -> train does not stick the rate at 0
    patched.train()
    assert patched.blocks[0].attn.attn_drop.p == 0.2


def test_fused_attn_off_models_are_patched(op_calls):
    stock = _tiny()
    for blk in stock.blocks:
        blk.attn.fused_attn = False
    stock, patched, report = _pair(stock.eval())
    assert report.counts()["attention"] == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = stock(x)
        op_calls.clear()
        torch.testing.assert_close(patched(x), ref, **FP32)
    assert op_calls["attention_qkvpacked"] == 2


def test_attn_mask_and_is_causal_fall_back(op_calls):
    stock, patched, _ = _pair(_tiny().eval())
    tokens = torch.randn(2, 5, 32)
    mask = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        for kwargs in (dict(attn_mask=mask), dict(is_causal=True)):
            op_calls.clear()
            out = patched.blocks[0](tokens, **kwargs)
            assert op_calls["attention_qkvpacked"] + op_calls["attention"] == 0
            torch.testing.assert_close(out, stock.blocks[0](tokens, **kwargs), **FP32)
        op_calls.clear()
        out = patched.blocks[0].attn(tokens, mask)  # positional attn_mask
        assert op_calls["attention_qkvpacked"] == 0
        torch.testing.assert_close(out, stock.blocks[0].attn(tokens, mask), **FP32)
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(patched(x, attn_mask=mask[:1]), stock(x, attn_mask=mask[:1]), **FP32)


def test_attn_drop_hooks_see_probabilities():
    """timm.utils.AttentionExtract-style hooks on attn_drop: the call falls back to the explicit path."""
    model = _tiny(depth=1).eval()
    patch_model(model)
    model.blocks[0].attn.fused_attn = False
    seen = []
    model.blocks[0].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(seen) == 1 and seen[0].shape == (1, 2, 5, 5)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(1, 2, 5))


def test_autocast_bf16_cpu_keeps_the_fp32_residual_stream():
    """Under autocast timm's residual stream stays fp32 (pos_embed is fp32) while branches are bf16: the
    fused adds must not mix them (the ops require equal dtypes) nor lower the stream. No LayerScale here:
    its fp32 gamma would promote the branch back to fp32."""
    stock, patched, _ = _pair(_tiny())
    x = torch.randn(2, 3, 32, 32)
    grad_out = torch.randn(2, 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = stock(x), patched(x)
        g_ref, g_out = _grads(stock, x, grad_out), _grads(patched, x, grad_out)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for n in g_ref:
        torch.testing.assert_close(g_out[n], g_ref[n], atol=2e-2, rtol=5e-2, msg=lambda m, n=n: f"grad {n}: {m}")


def test_gradient_checkpointing():
    stock, patched, _ = _pair(_tiny(init_values=0.5))
    stock.set_grad_checkpointing(True)
    patched.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    grad_out = torch.randn(2, 1000)
    g_ref, g_out = _grads(stock, x, grad_out), _grads(patched, x, grad_out)
    for n in g_ref:
        torch.testing.assert_close(g_out[n], g_ref[n], atol=1e-5, rtol=1e-4)


def test_gated_scale_norm_qk_norm_attention():
    attn = TimmAttention(
        32, num_heads=2, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm
    )
    stock, patched, report = _pair(attn)
    assert [(p.path, p.kind) for p in report.patched] == [
        ("", "attention"),
        ("q_norm", "norm"),
        ("k_norm", "norm"),
        ("norm", "norm"),
    ]
    x = torch.randn(2, 7, 32, requires_grad=True)
    grad_out = torch.randn(2, 7, 32)
    ref = stock(x)
    ref.backward(grad_out)
    dx_ref, x.grad = x.grad, None
    out = patched(x)
    out.backward(grad_out)
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(x.grad, dx_ref, **FP32)
    for (n, p), q in zip(stock.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"grad {n}: {m}")


def _timm_named_class(name: str, module: str, forward) -> type:
    """A class that looks like timm's (same name and defining module) with the given forward: old timm
    versions' signatures without installing them."""
    return type(name, (TimmAttention,), {"__module__": module, "forward": forward})


def test_old_timm_attention_signature_and_unknown_arguments():
    def forward_x_only(self, x):  # timm <= 1.0.15: Attention.forward(x)
        return TimmAttention.forward(self, x)

    def forward_rope(self, x, rope=None):  # unknown call-time argument: must not be patched
        return TimmAttention.forward(self, x)

    old = _timm_named_class("Attention", "timm.models.vision_transformer", forward_x_only)(32, num_heads=2)
    stock, patched, report = _pair(old)
    assert report.counts() == {"attention": 1}
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(patched(x), stock(x), **FP32)
    with pytest.raises(TypeError):  # the original forward(x) rejects a mask: the fallback keeps that
        patched(x, attn_mask=None, is_causal=True)

    roped = _timm_named_class("Attention", "timm.layers.attention", forward_rope)(32, num_heads=2)
    report = patch_model(roped)
    assert report.num_patched == 0 and "rope" in report.skipped[0].reason


def test_on_unsupported_raise_patches_nothing():
    model = _timm("eva02_tiny_patch14_224", depth=1, img_size=28)
    with pytest.raises(PatchError, match=r"blocks\.0\.attn \(EvaAttention\)"):
        patch_model(model, on_unsupported="raise")
    assert _instance_forwards(model) == []
    assert patch_model(_tiny(), on_unsupported="raise").num_patched == 12  # nothing unsupported: no error


def test_timm_scriptable_mode_leaves_the_model_stock():
    from timm.layers import set_layer_config

    model = _tiny(depth=1)
    with set_layer_config(scriptable=True):
        report = patch_model(model)
        assert report.num_patched == 0 and _instance_forwards(model) == []
        assert report.skipped[0].kind == "model" and "scriptable mode" in report.skipped[0].reason
        with pytest.raises(PatchError, match="TorchScript"):
            patch_model(model, on_unsupported="raise")
    assert patch_model(model).num_patched == 7  # once the mode is off again


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch_model(object())
    with pytest.raises(ValueError, match="backend must be None or one of"):
        patch_model(_tiny(), backend="cudnn")
    with pytest.raises(ValueError, match="on_unsupported"):
        patch_model(_tiny(), on_unsupported="ignore")


def test_fastvit_models_are_left_alone():
    model = fastvit.create_model("deit_tiny_patch16_224", depth=1, img_size=32)
    report = patch_model(model)
    assert report.num_patched == 0 and report.skipped == []


def _manual_probs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """softmax(scale * q @ k.T) per block, recomputed from each block's input with timm's own modules."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    out = []
    for blk in model.blocks:
        y = blk.norm1(h)
        B, N, _ = y.shape
        q, k, _ = blk.attn.qkv(y).reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out.append(((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1))
        h = blk(h)
    return out


def test_return_attention_patched_timm():
    stock = _tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _manual_probs(stock, x)
        ref = stock(x)
    model = copy.deepcopy(stock)
    patch_model(model)
    with torch.no_grad(), return_attention(model) as maps:
        out = model(x)
    torch.testing.assert_close(out, ref, **FP32)
    assert len(maps) == 3
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, **FP32)
    assert all(blk.attn.fused_attn for blk in model.blocks)  # restored
    assert all(not blk.attn.attn_drop._forward_hooks for blk in model.blocks)


def test_return_attention_fastvit_model():
    model = fastvit.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.attention_maps(x)
        with fastvit.return_attention(model) as maps:
            model(x)
    assert len(maps) == 2 and maps[0].shape == (1, 3, 6, 6)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, **FP32)
    with pytest.raises(ValueError, match="no fastvit.layers.Attention or timm ViT Attention"):
        with return_attention(nn.Linear(2, 2)):
            pass


def test_compile_fullgraph_patched_timm_and_fastvit():
    x = torch.randn(1, 3, 32, 32)
    for model in (
        _tiny(depth=1),
        fastvit.create_model("vit_tiny_patch16_224", depth=1, img_size=32, embed_dim=32, num_heads=2),
    ):
        model.eval()
        patch_model(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), **FP32)


@pytest.mark.interpreter
def test_triton_backend_under_interpreter():
    """The patched forwards on the Triton kernels (interpreter on CPU): tiny ViT, logits and gradients."""
    stock, patched, report = _pair(_tiny(depth=1, init_values=0.5), backend="triton")
    assert report.backend == "triton"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stock, patched = stock.to(device), patched.to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    grad_out = torch.randn(2, 1000, device=device)
    g_ref, g_out = _grads(stock, x, grad_out), _grads(patched, x, grad_out)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), atol=1e-4, rtol=1e-4)
    for n in g_ref:
        torch.testing.assert_close(g_out[n], g_ref[n], atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.interpreter
def test_triton_backend_distilled_qk_norm_forward():
    model = _timm(
        "deit_tiny_distilled_patch16_224", depth=1, img_size=32, embed_dim=32, num_heads=2, qk_norm=True
    ).eval()
    stock, patched, _ = _pair(model, backend="triton")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit3_small_patch16_224", "vit_tiny_r_s16_p8_224"])
def test_gpu_bf16_three_way(name):
    """Patched bf16 vs fp32 timm: error at most 2x that of stock timm in bf16 (the three-way rule)."""
    ref_model = _timm(name).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = ref_model(x)
        lowp = copy.deepcopy(ref_model).to(torch.bfloat16)
        stock_bf16 = lowp(x.bfloat16()).float()
        patch_model(lowp)
        fused = lowp(x.bfloat16()).float()
    assert_three_way(fused, ref, stock_bf16, name=f"{name} logits")


@pytest.mark.gpu
def test_gpu_training_step_bf16_autocast():
    stock, patched, _ = _pair(_timm("vit_small_patch16_224", depth=4).cuda())
    x = torch.randn(8, 3, 224, 224, device="cuda")
    grad_out = torch.randn(8, 1000, device="cuda")
    fp32 = _grads(stock, x, grad_out)
    lowp = copy.deepcopy(stock)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        g_stock = _grads(lowp, x, grad_out)
        g_fused = _grads(patched, x, grad_out)
    for n in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc1.weight", "patch_embed.proj.weight"):
        assert_three_way(g_fused[n], fp32[n], g_stock[n], factor=3.0, name=f"grad {n}")


@pytest.mark.gpu
def test_gpu_compile_fullgraph_and_cuda_graph_capture():
    from fastvit.graphs import graph_replay

    model = _timm("vit_small_patch16_224", depth=2).cuda().eval().half()
    patch_model(model)
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.half)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    runner = graph_replay(model, x)
    torch.testing.assert_close(runner(x), eager, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------- timm ecosystem: FX, pickle, copies, hooks


def _assert_same_outputs_and_grads(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    out_a, out_b = _logits(a(x)), _logits(b(x))
    torch.testing.assert_close(out_b, out_a, **FP32)
    g = torch.randn_like(out_a)
    ga, gb = _grads(a, x, g), _grads(b, x, g)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], **FP32, msg=name)


def test_fx_symbolic_trace_of_a_patched_model_matches_stock():
    require_stock_fx()
    stock, patched, _ = _pair(_tiny(depth=2, qk_norm=True).eval())
    traced = torch.fx.symbolic_trace(patched)
    assert not any(n.op == "call_function" and "fastvit" in str(n.target) for n in traced.graph.nodes)
    _assert_same_outputs_and_grads(stock, traced, torch.randn(2, 3, 32, 32))


def test_fx_feature_extraction_and_attention_extract_on_patched_models():
    require_stock_fx()
    from timm.utils import AttentionExtract
    from torchvision.models.feature_extraction import create_feature_extractor

    stock, patched, _ = _pair(_tiny(depth=2).eval())
    x = torch.randn(1, 3, 32, 32)
    nodes = {"blocks.1": "last_block"}
    want = create_feature_extractor(stock, return_nodes=nodes)(x)["last_block"]
    got = create_feature_extractor(patched, return_nodes=nodes)(x)["last_block"]
    torch.testing.assert_close(got, want, **FP32)
    for model in (stock, patched):
        for m in model.modules():
            if isinstance(m, TimmAttention):
                m.fused_attn = False  # AttentionExtract reads the explicit softmax; the patch still fuses it
    maps = AttentionExtract(patched, method="fx")(x)
    ref = AttentionExtract(stock, method="fx")(x)
    assert maps.keys() == ref.keys() and len(maps) == 2
    for k in ref:
        torch.testing.assert_close(maps[k], ref[k], **FP32)


def test_timm_features_only_fx_wrapper_on_a_patched_model():
    require_stock_fx()
    from timm.models import FeatureGraphNet

    stock, patched, _ = _pair(_tiny(depth=2).eval())
    feats = FeatureGraphNet(patched, out_indices=(0, 1), return_dict=False)
    ref = FeatureGraphNet(stock, out_indices=(0, 1), return_dict=False)
    x = torch.randn(1, 3, 32, 32)
    for a, b in zip(feats(x), ref(x)):
        torch.testing.assert_close(a, b, **FP32)


def test_pickle_and_torch_save_load_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = _tiny(depth=1).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    report = patch_model(model)
    path = tmp_path / "patched.pt"
    torch.save({"model": model, "x": x, "ref": ref, "n": report.num_patched}, path)
    child = f"""
import torch, pickle
blob = torch.load({str(path)!r}, weights_only=False)
model = blob["model"]
patched = [m for m in model.modules() if "_fastvit_patch" in m.__dict__]
assert len(patched) == blob["n"], (len(patched), blob["n"])
with torch.no_grad():
    torch.testing.assert_close(model(blob["x"]), blob["ref"], atol=1e-5, rtol=1e-5)
again = pickle.loads(pickle.dumps(model))
import fastvit
assert fastvit.unpatch_model(again) == blob["n"]
assert not any("forward" in m.__dict__ for m in again.modules())
with torch.no_grad():
    torch.testing.assert_close(again(blob["x"]), blob["ref"], atol=1e-5, rtol=1e-5)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_deepcopy_ema_copies_unpatch_and_round_trip():
    model = _tiny(depth=1, init_values=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    n = patch_model(model).num_patched
    ema = copy.deepcopy(model)
    for m in ema.modules():
        fwd = m.__dict__.get("forward")
        assert fwd is None or fwd.__self__ is m  # bound to the copy, not the source
    with torch.no_grad():
        torch.testing.assert_close(ema(x), ref, **FP32)
    assert unpatch_model(ema) == n
    assert all("forward" not in m.__dict__ for m in ema.modules())
    with torch.no_grad():
        assert torch.equal(ema(x), copy.deepcopy(ema)(x))
        torch.testing.assert_close(ema(x), ref, **FP32)
    again = copy.deepcopy(ema)
    assert patch_model(again).num_patched == n
    assert unpatch_model(copy.deepcopy(again)) == n
    assert unpatch_model(model) == n  # the source is untouched by its copies


def test_compile_fullgraph_several_widths_in_one_process():
    torch._dynamo.reset()
    x = torch.randn(1, 3, 32, 32)
    for dim, heads in ((32, 2), (48, 2), (64, 4), (96, 2)):
        model = _tiny(depth=1, embed_dim=dim, num_heads=heads).eval()
        patch_model(model)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), **FP32)


def test_compile_dynamic_fullgraph_patched_timm_and_fastvit_block():
    """torch.compile(dynamic=True) traces the float attributes (LayerNorm eps, attention scale) as symbols:
    the ops' argument checks must take them (math.isfinite on a SymFloat broke the trace), with grads too."""
    from fastvit.layers import Block

    torch._dynamo.reset()
    model = _tiny(depth=1).eval()
    patch_model(model)
    block = Block(32, 2).eval()
    for module, shapes in ((model, [(1, 3, 32, 32), (3, 3, 32, 32)]), (block, [(2, 5, 32), (3, 7, 32)])):
        compiled = torch.compile(module, backend="eager", fullgraph=True, dynamic=True)
        for shape in shapes:
            x = torch.randn(shape, requires_grad=True)
            out = compiled(x)
            torch.testing.assert_close(out, module(x), **FP32)
            (dx,) = torch.autograd.grad(out.sum(), [x])
            torch.testing.assert_close(dx, torch.autograd.grad(module(x).sum(), [x])[0], **FP32)


def test_compile_fullgraph_with_a_non_default_scale():
    torch._dynamo.reset()
    x = torch.randn(1, 3, 32, 32)
    for scale in (0.1, 0.2):
        model = _tiny(depth=1).eval()
        model.blocks[0].attn.scale = scale
        stock = copy.deepcopy(model)
        stock.blocks[0].attn.fused_attn = False  # timm's SDPA path ignores .scale; its explicit path uses it
        patch_model(model)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), stock(x), **FP32)


@pytest.mark.parametrize(
    "path",
    [
        "blocks.0.mlp.drop2",
        "blocks.0.attn.q_norm",
        "blocks.0.attn.k_norm",
        "blocks.0.attn.norm",
        "blocks.0.mlp.norm",
        "blocks.0.mlp.fc2",
        "blocks.0.mlp.act",
        "blocks.0.ls2",
        "blocks.0.drop_path2",
        "blocks.0.norm2",
        "patch_embed.proj",
    ],
)
def test_forward_hooks_on_every_submodule_fire(path):
    stock, patched, _ = _pair(_tiny(depth=1).eval())
    x = torch.randn(1, 3, 32, 32)
    seen: dict[str, list] = {"stock": [], "patched": []}
    for key, model in (("stock", stock), ("patched", patched)):
        model.get_submodule(path).register_forward_hook(lambda m, i, o, _k=key: seen[_k].append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), **FP32)
    assert seen["patched"] == seen["stock"] and len(seen["stock"]) == 1


def test_float64_falls_back_with_a_logged_reason(caplog, op_calls):
    stock, patched, _ = _pair(_tiny(depth=1).eval())
    stock, patched = stock.double(), patched.double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="fastvit.patch"), torch.no_grad():
        out = patched(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, stock(x), atol=1e-12, rtol=1e-12)
    assert sum(op_calls.values()) == 0
    assert any("float64" in r.getMessage() and "original forward" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        patched.float()(x.float())
    assert op_calls["linear"] > 0  # the fused path again once the dtype is served


def test_torch_jit_script_of_a_patched_model_says_unpatch_first():
    model = _tiny(depth=1).eval()
    patch_model(model)
    with pytest.raises(PatchError, match="Unpatch first: fastvit.unpatch_model"):
        torch.jit.script(model)
    unpatch_model(model)
    assert all("__prepare_scriptable__" not in m.__dict__ for m in model.modules())


# ------------------------------------------------- the block's row path (host overhead, issue #14 item 3)


def _graph_nodes(out: torch.Tensor) -> collections.Counter:
    """Autograd node classes reachable from ``out``."""
    seen, counts, stack = set(), collections.Counter(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        counts[type(fn).__name__] += 1
        stack.extend(f for f, _ in fn.next_functions)
    return counts


def test_row_path_same_values_and_grads_with_fewer_autograd_nodes():
    stock, patched, _ = _pair(_tiny(depth=3).train())  # drop rates are 0: the row path applies in training
    x = torch.randn(2, 3, 32, 32)
    ys, yp = stock(x), patched(x)
    torch.testing.assert_close(yp, ys, atol=0, rtol=0)  # the same ops on the same values: bit-identical
    ns, np_ = _graph_nodes(ys), _graph_nodes(yp)
    # per block the four GEMMs run on 2-D rows: no view / unsafe-view pair around each, and the packed
    # attention takes and returns rows: two views fewer around it. Where torch records the GEMMs' pair
    # (2.15: one UnsafeViewBackward0 per 3-D GEMM; 2.5 decomposes 3-D linear without it) the row path has
    # 6 nodes fewer per block; it never has more
    if ns["UnsafeViewBackward0"]:
        assert ns["UnsafeViewBackward0"] == 4 * 3 and np_["UnsafeViewBackward0"] == 0
        assert np_["ViewBackward0"] == ns["ViewBackward0"] - 2 * 3, (np_, ns)
        assert sum(np_.values()) == sum(ns.values()) - 6 * 3
    else:
        assert sum(np_.values()) <= sum(ns.values()), (np_, ns)
    g = torch.randn_like(ys)
    gs, gp = _grads(stock, x, g), _grads(patched, x, g)
    assert gs.keys() == gp.keys() and gs
    for name in gs:
        torch.testing.assert_close(gp[name], gs[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(
    "path",
    [
        "blocks.0.norm1",
        "blocks.0.attn",
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.attn.proj_drop",
        "blocks.0.mlp.drop1",
        "blocks.0.mlp.fc1",
        "blocks.0",
    ],
)
def test_hooks_see_token_shapes_where_the_row_path_would_skip_them(path):
    """A hook on a module the row path runs without a call (or on 2-D rows) keeps the module call and
    timm's (B, N, C) shapes: the block takes its per-module path then."""
    stock, patched, _ = _pair(_tiny(depth=2).eval())
    x = torch.randn(2, 3, 32, 32)
    seen: dict[str, list] = {"stock": [], "patched": []}
    for key, model in (("stock", stock), ("patched", patched)):
        model.get_submodule(path).register_forward_pre_hook(lambda m, i, _k=key: seen[_k].append(tuple(i[0].shape)))
    with torch.no_grad():
        torch.testing.assert_close(patched(x), stock(x), **FP32)
    assert seen["patched"] == seen["stock"] and len(seen["stock"]) == 1


def test_global_module_hooks_see_norm1_and_attention_calls():
    """A global module hook keeps the block on its per-module path: norm1 and attn are called (norm2 stays
    fused into the residual add, as it is when only norm2's own hooks are absent)."""
    stock, patched, _ = _pair(_tiny(depth=2).eval())
    x = torch.randn(1, 3, 32, 32)
    calls: list = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(type(m).__name__) if type(m).__name__ in ("Attention", "LayerNorm") else None
    )
    try:
        with torch.no_grad():
            ref = stock(x)
            calls.clear()
            torch.testing.assert_close(patched(x), ref, **FP32)
    finally:
        handle.remove()
    assert calls == ["LayerNorm", "Attention"] * 2 + ["LayerNorm"]


def test_backward_hook_and_retain_grad_on_row_path_modules_and_outputs():
    stock, patched, _ = _pair(_tiny(depth=2).train())
    x = torch.randn(2, 3, 32, 32)
    got: dict[str, list] = {"stock": [], "patched": []}
    kept = {}
    for key, model in (("stock", stock), ("patched", patched)):
        model.blocks[1].attn.register_full_backward_hook(lambda m, gi, go, _k=key: got[_k].append(go[0].shape))

        def keep(m, i, o, _k=key):  # returns None: the output stays as it is
            o.retain_grad()
            kept[_k] = o

        model.blocks[0].register_forward_hook(keep)
        model(x).sum().backward()
    assert got["patched"] == got["stock"] and len(got["stock"]) == 1
    torch.testing.assert_close(kept["patched"].grad, kept["stock"].grad, **FP32)

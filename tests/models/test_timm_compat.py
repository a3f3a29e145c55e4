"""fastvit's models by timm's definition of drop-in (fastvit/models/_timm_compat.py): default_cfg and timm's
cfg fields, feature_info, create_model's features_only / out_indices / feature_cls / device / dtype, timm's
scriptable mode, and FX symbolic tracing with the same outputs and gradients. Small configurations, CPU."""

from __future__ import annotations

import pytest
import timm
import torch

import fastvit

SMALL = dict(depth=3, img_size=32, embed_dim=32, num_heads=2)


def test_default_cfg_is_pretrained_cfg_with_timm_fields():
    for name in ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "t2t_vit_7"):
        model = fastvit.create_model(name)
        assert model.default_cfg is model.pretrained_cfg
        assert model.default_cfg["fixed_input_size"] is True
        assert model.default_cfg["input_size"] == (3, 224, 224)
    model = fastvit.create_model("vit_tiny_patch16_224", **SMALL)
    model.set_input_size((48, 48))
    assert model.default_cfg is model.pretrained_cfg and model.default_cfg["input_size"] == (3, 48, 48)
    assert model.in_chans == 3


def test_feature_info_matches_forward_intermediates():
    model = fastvit.create_model("vit_tiny_patch16_224", **SMALL).eval()
    info = model.feature_info
    assert [i["module"] for i in info] == ["blocks.0", "blocks.1", "blocks.2"]
    assert {i["num_chs"] for i in info} == {32} and {i["reduction"] for i in info} == {16}
    feats = model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    assert [f.shape[1] for f in feats] == [i["num_chs"] for i in info]


@pytest.mark.parametrize("feature_cls", ["getter", "fx"])
def test_features_only_as_timm_offers_it(feature_cls):
    x = torch.randn(2, 3, 32, 32)
    model = fastvit.create_model("vit_tiny_patch16_224", **SMALL).eval()
    feats = fastvit.create_model(
        "vit_tiny_patch16_224", **SMALL, features_only=True, out_indices=(0, 2), feature_cls=feature_cls
    )
    prefix = "model." if feature_cls == "getter" else "graph_module."  # where each wrapper holds the model
    missing, _ = feats.load_state_dict({prefix + k: v for k, v in model.state_dict().items()}, strict=False)
    assert not missing
    feats.eval()
    assert feats.feature_info.channels() == [32, 32] and feats.feature_info.reduction() == [16, 16]
    assert "num_classes" not in feats.default_cfg
    out = feats(x)
    want = model.forward_intermediates(x, indices=(0, 2), intermediates_only=True)
    assert len(out) == 2
    if feature_cls == "getter":  # NCHW maps, like timm's ViT getter
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b)
    else:  # the FX wrapper returns the blocks' token outputs
        assert [tuple(o.shape) for o in out] == [(2, 5, 32), (2, 5, 32)]


def test_feature_options_need_features_only_and_unknown_feature_cls_is_named():
    with pytest.raises(TypeError, match="out_indices need features_only=True"):
        fastvit.create_model("vit_tiny_patch16_224", out_indices=(1,))
    with pytest.raises(ValueError, match="feature_cls='hook' is not supported"):
        fastvit.create_model("vit_tiny_patch16_224", **SMALL, features_only=True, feature_cls="hook")


def test_t2t_features_only_gives_the_encoder_block_maps():
    model = fastvit.create_model("t2t_vit_7", img_size=64, depth=3, features_only=True, out_indices=(0, 2)).eval()
    assert model.feature_info.channels() == [256, 256] and model.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 256, 4, 4), (2, 256, 4, 4)]


def test_device_and_dtype_factory_options():
    model = fastvit.create_model("vit_tiny_patch16_224", device="meta", dtype=torch.bfloat16)
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_timm_scriptable_mode_builds_timms_model_that_scripts():
    x = torch.randn(1, 3, 32, 32)
    with timm.set_scriptable(True):
        model = fastvit.create_model("vit_tiny_patch16_224", **SMALL)
        with pytest.raises(RuntimeError, match="scriptable mode is on.*torch.compile"):
            fastvit.create_model("t2t_vit_7")
    assert type(model).__module__ == "timm.models.vision_transformer"
    ours = fastvit.create_model("vit_tiny_patch16_224", **SMALL)
    ours.load_state_dict(model.state_dict())  # same architecture, same keys
    scripted = torch.jit.script(model.eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ours.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", SMALL),
        ("deit_tiny_distilled_patch16_224", SMALL),
        ("vit_base_r50_s16_224", dict(depth=1, img_size=64, embed_dim=32, num_heads=2)),
    ],
)
def test_fx_symbolic_trace_same_outputs_and_gradients(name, kwargs):
    model = fastvit.create_model(name, **kwargs).eval()
    traced = torch.fx.symbolic_trace(model)
    ops_called = {getattr(n.target, "__name__", "") for n in traced.graph.nodes if n.op == "call_function"}
    assert {"linear", "layer_norm", "attention_qkvpacked", "patch_embed"} <= ops_called  # each op one node
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size)

    def logits_and_grads(fn):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (out, grads), (want, want_grads) = logits_and_grads(traced), logits_and_grads(model)
    torch.testing.assert_close(out, want)
    assert grads.keys() == want_grads.keys() and grads
    for n in want_grads:
        torch.testing.assert_close(grads[n], want_grads[n], msg=n)

"""fastvit/_geometry.py: the shared patch-grid, unfold-size, int-pair and program-count helpers."""

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F

from fastvit import _geometry as g
from fastvit.layers import to_2tuple as layers_to_2tuple
from fastvit.layers.patch_embed import to_2tuple as patch_embed_to_2tuple


@pytest.mark.parametrize("a, b, want", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (224, 16, 14), (225, 16, 15)])
def test_ceil_div(a, b, want):
    assert g.ceil_div(a, b) == want


@pytest.mark.parametrize("hw, p", [((224, 224), 16), ((225, 230), 16), ((7, 3), 4), ((1, 1), 14)])
def test_patch_grid_matches_padded_conv(hw, p):
    H, W = hw
    x = torch.zeros(1, 1, H, W)
    x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
    y = F.conv2d(x, torch.zeros(1, 1, p, p), stride=p)
    assert g.patch_grid(H, W, p) == tuple(y.shape[-2:])


@pytest.mark.parametrize(
    "hw, kernel",
    [
        ((56, 56), (7, 7, 4, 4, 2, 2)),
        ((14, 14), (3, 3, 2, 2, 1, 1)),
        ((9, 5), (3, 2, 2, 1, 0, 1)),
        ((4, 4), (4, 4, 1, 1, 0, 0)),
    ],
)
def test_unfold_grid_matches_f_unfold(hw, kernel):
    H, W = hw
    kh, kw, sh, sw, ph, pw = kernel
    u = F.unfold(torch.zeros(1, 1, H, W), (kh, kw), padding=(ph, pw), stride=(sh, sw))
    Ho, Wo = g.unfold_grid(H, W, kernel)
    assert Ho * Wo == u.shape[-1]
    assert (Ho, Wo) == (g.unfold_size(H, kh, sh, ph), g.unfold_size(W, kw, sw, pw))


def _err(v):
    return ValueError(f"bad {v!r}")


def test_int_pair_exact():
    assert g.int_pair(3, _err) == (3, 3)
    assert g.int_pair((2, 5), _err) == (2, 5)
    assert g.int_pair([2, 5], _err) == (2, 5)
    assert type(g.int_pair([2, 5], _err)) is tuple
    for bad in [(1, 2, 3), (1,), True, (1, False), 2.0, "ab", None]:
        with pytest.raises(ValueError, match="bad"):
            g.int_pair(bad, _err)
    with pytest.raises(ValueError, match=r"bad \(0, 1\)"):
        g.int_pair((0, 1), _err, minimum=1)
    assert g.int_pair(0, _err, minimum=0) == (0, 0)


def test_int_pair_error_type_is_the_callers():
    with pytest.raises(TypeError, match="img_size"):
        g.int_pair("x", lambda v: TypeError(f"img_size {v!r}"))


def test_to_2tuple_lenient_and_reexported():
    assert layers_to_2tuple is g.to_2tuple and patch_embed_to_2tuple is g.to_2tuple
    assert g.to_2tuple(16) == (16, 16)
    assert g.to_2tuple((16.0, torch.tensor(8))) == (16, 8)
    with pytest.raises(ValueError, match=r"expected an int or an \(h, w\) pair, got \(1, 2, 3\)"):
        g.to_2tuple((1, 2, 3))


def test_num_programs_on_cpu():
    t = torch.zeros(1)
    assert g.sm_count(t) == 1
    assert g.num_programs(t, 1000) == 4
    assert g.num_programs(t, 3) == 3
    assert g.num_programs(t, 0) == 1
    assert g.num_programs(t, 1000, per_sm=8) == 8


@pytest.mark.gpu
def test_num_programs_on_cuda():
    t = torch.zeros(1, device="cuda")
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count
    assert g.sm_count(t) == sms
    assert g.num_programs(t, 10**9) == 4 * sms


def test_geometry_sits_low_in_the_layering():
    tree = ast.parse(pathlib.Path(g.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith("fastvit") for m in imported), imported


def test_int_pair_takes_numpy_integers_as_plain_ints_and_image_size_uses_it():
    import numpy as np

    from fastvit.models._validate import image_size

    pair = g.int_pair((np.int64(3), 4), ValueError)
    assert pair == (3, 4) and all(type(v) is int for v in pair)
    assert image_size("M", np.int32(224)) == (224, 224)
    with pytest.raises(TypeError, match="M: img_size must be an int or an"):
        image_size("M", (224.0, 224))
    with pytest.raises(ValueError, match="must be positive"):
        image_size("M", (0, 224))

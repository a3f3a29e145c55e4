"""fastvit.graphs: the CPU error, and on GPU capture + replay equal to eager for patched timm and fastvit models."""

from __future__ import annotations

import pytest
import timm
import torch

import fastvit
from fastvit.graphs import graph_replay


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where torch sees no GPU")
def test_no_gpu_error():
    with pytest.raises(RuntimeError, match=r"CUDA graphs need an NVIDIA GPU.*call the model directly on CPU"):
        graph_replay(torch.nn.Linear(2, 2), torch.randn(1, 2))


@pytest.mark.gpu
def test_cpu_input_error_on_gpu_machine():
    with pytest.raises(ValueError, match=r"example input 0 is on cpu.*move the model and the inputs to the GPU"):
        graph_replay(torch.nn.Linear(2, 2), torch.randn(1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["timm_patched", "fastvit"])
def test_replay_matches_eager(kind):
    if kind == "timm_patched":
        model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2)
        fastvit.patch_model(model)
    else:
        model = fastvit.create_model("vit_small_patch16_224", depth=2)
    model = model.cuda().eval().half()
    example = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.half)
    runner = graph_replay(model, example)
    for _ in range(2):
        x = torch.randn_like(example)
        with torch.no_grad():
            eager = model(x)
        torch.testing.assert_close(runner(x), eager, atol=1e-3, rtol=1e-3)
    first = runner(example)
    snapshot = first.clone()
    runner(torch.randn_like(example))
    assert torch.equal(first, snapshot)  # returned clones survive later replays
    with pytest.raises(ValueError, match="captured for"):
        runner(torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.half))

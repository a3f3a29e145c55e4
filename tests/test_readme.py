"""The README's Python blocks run as written: every ```python block that needs neither a GPU nor downloaded
weights or files is executed, each in a fresh namespace, exactly as a reader would paste it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pytest

from tests._timm_fx import require_stock_fx

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# What makes a block unrunnable here, with the reason shown for it.
_NEEDS = (
    (re.compile(r"""["']cuda["']|\.cuda\(|device=["']cuda"""), "needs a GPU"),
    (re.compile(r"pretrained=(True|[\"'])"), "needs downloaded weights"),
    (re.compile(r"""["'][^"'\s]+\.(npz|pth|pt|tar|bin|safetensors|jpg|jpeg|png)["']"""), "needs a file on disk"),
)


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def _unrunnable(code: str) -> Optional[str]:
    for pattern, reason in _NEEDS:
        if pattern.search(code):
            return reason
    return None


BLOCKS = _blocks()
RUNNABLE = [(line, code) for line, code in BLOCKS if _unrunnable(code) is None]


def test_readme_has_runnable_python_blocks():
    assert len(BLOCKS) >= 4, f"found only {len(BLOCKS)} python blocks in {README}"
    assert len(RUNNABLE) >= 2, [(line, _unrunnable(code)) for line, code in BLOCKS]


def test_the_classifier_sees_gpu_and_weight_blocks():
    assert _unrunnable('x = torch.randn(2, device="cuda")') == "needs a GPU"
    assert _unrunnable('m = fastvit.create_model("vit_b16", pretrained=True)') == "needs downloaded weights"
    assert _unrunnable('fastvit.load_checkpoint(model, "ViT-B_16.npz")') == "needs a file on disk"
    assert _unrunnable("import fastvit\nfastvit.list_models()") is None


@pytest.mark.parametrize("line, code", RUNNABLE, ids=[f"README.md:{line}" for line, _ in RUNNABLE])
def test_readme_block_runs(line, code, capsys):
    if "fx.symbolic_trace" in code:
        require_stock_fx()
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102

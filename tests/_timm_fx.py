"""Whether stock timm traces under ``torch.fx`` on the installed torch.

timm 1.0.31's ``Attention.forward`` hands its ``is_causal`` argument to ``F.scaled_dot_product_attention``;
``torch.fx`` on torch 2.5 turns it into a Proxy, which SDPA rejects, so stock timm ViTs do not FX-trace there
(timm's own FX tests fail on that stack). A patched model runs timm's original forward under FX, so it traces
exactly where stock timm does: the FX tests of patched models skip, with this reason, where stock cannot.
"""

import functools
from typing import Optional

import pytest


@functools.lru_cache(maxsize=None)
def stock_fx_problem() -> Optional[str]:
    """None when a stock timm ViT traces here, else why not (the exception, with the versions)."""
    import timm
    import torch

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=2).eval()
    try:
        torch.fx.symbolic_trace(model)
    except Exception as exc:  # whatever FX raises is the reason
        return (
            f"stock timm {timm.__version__} does not FX-trace on torch {torch.__version__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); patched models trace wherever stock does"
        )
    return None


def require_stock_fx() -> None:
    """Skips the calling test, with the reason, where stock timm itself cannot be FX-traced."""
    problem = stock_fx_problem()
    if problem is not None:
        pytest.skip(problem)

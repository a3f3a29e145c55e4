"""Triton flash attention (forward and backward). Work in progress: the kernels land in the next commit."""

from __future__ import annotations

__all__ = ["unsupported_reasons"]


def unsupported_reasons(head_dim: int, q_tokens: int, k_tokens: int) -> list[str]:
    return ["the Triton attention kernels are not implemented yet (issue 4 in progress)"]

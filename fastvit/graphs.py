"""Fixed-shape CUDA-graph replay for low-latency inference (batch-1 serving).

A ViT forward at batch 1 is launch-bound: dozens of small kernels whose CPU-side launch cost exceeds
their GPU time. Capturing the forward once in a CUDA graph and replaying it removes that cost. The
helper follows PyTorch's recipe: warm up on a side stream (so Triton autotuning, cuBLAS workspace and
lazy initialisation happen outside the capture), capture into static input/output buffers, then per
call copy the new input in, replay, and hand the output back (a clone by default, so it survives the
next replay). fastvit's ops are capture-safe after warm-up (no host syncs, no allocation of new
autotune configs inside the graph).

    runner = fastvit.graphs.graph_replay(model.eval(), torch.randn(1, 3, 224, 224, device="cuda"))
    logits = runner(image)        # same shape, dtype and device as the example

Inference only: capture runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

__all__ = ["GraphReplay", "graph_replay"]

Outputs = Union[Tensor, tuple[Tensor, ...], list[Tensor]]


def _check_cuda_inputs(inputs: Sequence[Tensor]) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "fastvit.graphs: CUDA graphs need an NVIDIA GPU and torch.cuda.is_available() is False here; "
            "call the model directly on CPU"
        )
    if not inputs:
        raise ValueError("fastvit.graphs: give at least one example input tensor")
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastvit.graphs: example input {i} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(
                f"fastvit.graphs: example input {i} is on {t.device}; CUDA graphs replay CUDA work only: move the "
                "model and the inputs to the GPU (model.cuda(), x.cuda())"
            )


class GraphReplay:
    """A captured forward: call it with tensors of the example inputs' shapes, dtypes and devices.

    Args:
        fn: the callable to capture (a model in eval mode, or a function of tensors).
        example_inputs: CUDA tensors with the fixed shapes every later call uses.
        warmup: eager iterations on a side stream before the capture (autotuning, lazy init).
        clone_outputs: return clones (True) or the static output buffers, overwritten by the next replay.

    Raises:
        RuntimeError: no CUDA GPU in this process.
        ValueError / TypeError: example inputs that are not CUDA tensors.
    """

    def __init__(
        self,
        fn: Callable[..., Outputs],
        example_inputs: Sequence[Tensor],
        *,
        warmup: int = 3,
        clone_outputs: bool = True,
    ) -> None:
        _check_cuda_inputs(example_inputs)
        if warmup < 1:
            raise ValueError(
                f"fastvit.graphs: warmup must be >= 1 (autotuning must happen before capture), got {warmup}"
            )
        self.clone_outputs = clone_outputs
        self._static_inputs = [t.detach().clone() for t in example_inputs]
        side = torch.cuda.Stream(device=self._static_inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self._static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._static_outputs = fn(*self._static_inputs)

    def __call__(self, *inputs: Tensor) -> Outputs:
        if len(inputs) != len(self._static_inputs):
            raise TypeError(
                f"fastvit.graphs: captured with {len(self._static_inputs)} inputs, called with {len(inputs)}"
            )
        for i, (src, dst) in enumerate(zip(inputs, self._static_inputs)):
            if (
                not isinstance(src, Tensor)
                or src.shape != dst.shape
                or src.dtype != dst.dtype
                or src.device != dst.device
            ):
                got = (
                    f"{tuple(src.shape)} {src.dtype} on {src.device}" if isinstance(src, Tensor) else type(src).__name__
                )
                raise ValueError(
                    f"fastvit.graphs: input {i} is {got}; the graph was captured for {tuple(dst.shape)} {dst.dtype} on "
                    f"{dst.device} (capture another GraphReplay for other shapes)"
                )
            dst.copy_(src)
        self.graph.replay()
        return self._hand_back(self._static_outputs)

    def _hand_back(self, out: Any) -> Any:
        if isinstance(out, Tensor):
            return out.clone() if self.clone_outputs else out
        if isinstance(out, (tuple, list)):
            return type(out)(self._hand_back(o) for o in out)
        return out


def graph_replay(
    fn: Callable[..., Outputs], *example_inputs: Tensor, warmup: int = 3, clone_outputs: bool = True
) -> GraphReplay:
    """Captures ``fn(*example_inputs)`` in a CUDA graph; see :class:`GraphReplay` for the arguments."""
    return GraphReplay(fn, example_inputs, warmup=warmup, clone_outputs=clone_outputs)

"""CUDA-graph capture of the TD3 update steps, and of the policy step that acts in the envs (``model.cuda_graphs:
true``).

An update of these small networks is launch-bound: a GPU runs the few hundred kernels of a critic and an actor step
faster than Python and Lightning can issue them. Captured as a CUDA graph, one ``replay()`` issues them all. What a
step does is unchanged: the same ``manual_backward``, ``clip_gradients`` in ``on_before_optimizer_step``, gradient
telemetry, non-finite guard and fused Adam ran once, during capture, and each replay repeats their kernels on the
new batch. The policy step (``TD3Module.act``: mu(s) for the envs' newest observations, which each env step waits
for) is captured the same way, one graph per batch size. The rules capture imposes, and how lit_td3 keeps them:

- Static memory: each batch is copied into input tensors the graph owns, and the outputs (losses, norms) are
  overwritten in place by the next replay, so callers read them before that.
- No host synchronization inside a step: the non-finite guard and the Q-bound alert count on the device
  (``lit_td3.events``) and are read at log points; the optimizers are capturable fused Adam, which skips a
  non-finite step on the device (hence full precision only: under AMP, Adam is not fused).
- No Python side effects inside a step: the module keeps its counters outside; Lightning's count of optimizer steps
  (``global_step``) is advanced for each replay by ``on_replay``.
- Warm-up: the first ``warmup`` calls run eagerly on a side stream (cuDNN, cuBLAS and Adam create their state there),
  following PyTorch's whole-network capture recipe; they are real updates, as are the replays.
- Through ``TD3DDPStrategy``'s wrappers (one process: world size 1), a step is captured with DDP's all-reduces inside,
  following PyTorch's recipe for DDP in a captured backward ("Usage with DistributedDataParallel" in PyTorch's CUDA
  notes): the wrappers are built on the stream the steps warm up and are captured on (``capture_stream``), and at
  least ``DDP_WARMUP`` eager calls come first, past the iterations in which DDP rebuilds its buckets and times
  itself. Several processes are refused: on 2×H200 such a run hung, not yet diagnosed (BENCHMARKS.md, "Several
  GPUs").
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from functools import cache
from typing import Any, Generic, TypeVar

import torch
from torch.utils import _pytree as pytree

from lit_td3.config import ConfigError

Out = TypeVar("Out")

FULL_PRECISIONS = ("32-true", "32", "64-true", "64")
"""Precisions of fused Adam, whose non-finite skip (``found_inf``) happens on the device and can be captured."""

WARMUP = 3
"""Eager calls before the capture, in one process."""
DDP_WARMUP = 11
"""Eager calls before the capture of a step that runs through DDP wrappers (PyTorch's CUDA notes: DDP rebuilds its
buckets and records its runtime statistics with CUDA events in its first iterations, which a capture must not hold)."""


def check_cuda_graphs(device: torch.device, world_size: int, precision: str, compile: bool = False) -> None:
    """Refuses ``model.cuda_graphs: true`` where capture cannot work, naming what to change."""
    problems = []
    if compile:
        problems.append("model.compile false (a torch.compile recompilation inside a capture would break it; the "
                        "graphs already remove the launch overhead that compile saves)")
    if device.type != "cuda":
        problems.append(f"a CUDA device (this run trains on {device.type!r}: set --trainer.accelerator gpu)")
    if world_size > 1:
        problems.append(f"one process (this run has {world_size}: with DDP's all-reduces captured, a 2-GPU run hung; "
                        "use model.cuda_graphs false with several devices)")
    if str(precision) not in FULL_PRECISIONS:
        problems.append(f"precision 32-true or 64-true (this run: {precision!r}; under mixed precision Adam is not "
                        "fused, and the decision to skip a non-finite step is read on the host)")
    if problems:
        raise ConfigError(f"model.cuda_graphs=true needs {'; and '.join(problems)}")


@cache
def capture_stream(device: int) -> torch.cuda.Stream:
    """The side stream on which the graphed steps of CUDA device ``device`` warm up and are captured, one per process
    and device; ``TD3DDPStrategy`` builds its wrappers on it too, so that their gradient accumulators live on it."""
    return torch.cuda.Stream(device)


class GraphedStep(Generic[Out]):
    """Calls ``step(*inputs)`` eagerly ``warmup`` times, then captures it once as a CUDA graph and replays it.

    Inputs are tensors or (nested) tuples and dicts of them, of the same shapes at every call. The TD3 module draws
    its random numbers outside and passes them in, so that graphed and eager runs take the same ones.
    """

    def __init__(self, step: Callable[[Any], Out], on_replay: Callable[[], None] | None = None,
                 warmup: int = WARMUP) -> None:
        self.step, self.on_replay, self.warmup = step, on_replay, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor] = []  # the graph's own copies of the input tensors
        self._outputs: Any = None
        self._stream = capture_stream(torch.cuda.current_device())

    def __call__(self, *inputs: Any) -> Out:
        self.calls += 1
        if self.graph is not None:
            torch._foreach_copy_(self._inputs, pytree.tree_leaves(inputs))
            self.graph.replay()
            if self.on_replay is not None:
                self.on_replay()
            return self._outputs
        if self.calls <= self.warmup:
            return self._on_side_stream(lambda: self.step(*inputs))
        static = pytree.tree_map(torch.clone, inputs)
        self._inputs = pytree.tree_leaves(static)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: a dead cycle freed then (an earlier Trainer's CUDA tensors and
        # events) runs CUDA calls that invalidate the capture.
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self._outputs = self.step(*static)
        finally:
            if gc_was_enabled:
                gc.enable()
        self.graph = graph
        graph.replay()  # capture records without running: this replay is the update; capture counted its steps
        return self._outputs

    def _on_side_stream(self, fn: Callable[[], Out]) -> Out:
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self._stream)
        return out

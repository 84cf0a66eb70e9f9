"""Capturing a callable into a CUDA graph, and the CPU stand-in that keeps the same contract.

Both give a :class:`CapturedCall`: outputs at fixed addresses, refreshed by ``replay()``. On CPU
(no CUDA graphs) replay re-runs the callable on the same static inputs and copies the results
into the captured outputs, so CI exercises the padding, static-buffer and address-check paths
the GPU takes.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fullgraph_backend.compat import outputs_as_tuple, weak_tensor


@dataclass
class CapturedCall:
    """One captured key: ``replay()`` recomputes ``outputs`` in place from the static inputs."""

    replay: Callable[[], None]
    outputs: tuple
    pool_bytes: int = 0  # growth of the graph pool during this capture
    # the outputs held strongly until every piece of the key is captured, so no later piece of the
    # same key allocates over memory it reads in place
    hold: tuple | None = None


class CudaGraphs:
    """Captures on one side stream into one shared pool (replay in capture order, one at a time)."""

    emulated = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def warmup(self, fn: Callable, args: list) -> tuple:
        """Run once on the capture stream: Triton JIT, autotuning and cuBLAS handles happen here."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = outputs_as_tuple(fn(*args))
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def capture(self, fn: Callable, args: list) -> CapturedCall:
        """Capture ``fn(*args)`` (nothing runs: the outputs hold no values until a replay) and hand
        the outputs out weakly."""
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph empties the allocator's cache on entry; do it first so the difference
        # below is the pool's growth, not the cache it released
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(self.device)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = outputs_as_tuple(fn(*args))
        weak = tuple(weak_tensor(o) if isinstance(o, torch.Tensor) else o for o in out)
        return CapturedCall(graph.replay, weak, torch.cuda.memory_reserved(self.device) - before, hold=out)


class EmulatedGraphs:
    """CPU stand-in: no capture, same static inputs and fixed output addresses. Its "capture" runs
    the callable, which a CUDA capture does not: the runner undoes what that run wrote."""

    emulated = True
    device = torch.device("cpu")

    def warmup(self, fn: Callable, args: list) -> tuple:
        return outputs_as_tuple(fn(*args))

    def capture(self, fn: Callable, args: list) -> CapturedCall:
        # An output aliasing an input stays that view, as under CUDA capture (each replay writes the
        # same memory); other outputs get copies of their own, refilled by each replay (outputs may be
        # views of one another, which must not be written in place).
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        first = outputs_as_tuple(fn(*args))
        refilled = [i for i, o in enumerate(first)
                    if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs]
        outputs = tuple(o.clone() if i in refilled else o for i, o in enumerate(first))

        def replay() -> None:
            fresh = outputs_as_tuple(fn(*args))
            for i in refilled:
                outputs[i].copy_(fresh[i])

        return CapturedCall(replay, outputs)


def graphs_for(device: torch.device) -> CudaGraphs | EmulatedGraphs:
    """CUDA graphs on a CUDA device, the emulation elsewhere."""
    return CudaGraphs(device) if device.type == "cuda" else EmulatedGraphs()


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """No garbage collection during a capture loop: a collection mid-capture is slow and can
    free objects the capture still uses (vLLM measured 35 s -> 2 s for its capture loop)."""
    gc.collect()
    gc.freeze()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.unfreeze()

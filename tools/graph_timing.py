"""Timing one CUDA-graph replay after a chosen L2 flush: the one method of the kernel benchmarks.

``capture(fn)`` warms ``fn`` up on a side stream and captures it; ``replay_us(graph, iters, flush)``
is the median microseconds of single replays, each after ``flush``:
  read   sum a 256 MiB buffer: L2 cold and clean, as after the weight reads that precede a kernel
         in a model;
  write  zero it: L2 cold and dirty, so the kernel's reads also pay the write-back of ~50 MB;
  none   back to back (small inputs stay L2-resident).
"""
from __future__ import annotations

import functools
import statistics

import torch

FLUSHES = ("read", "write", "none")


@functools.lru_cache(maxsize=None)
def _flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")


def capture(fn) -> torch.cuda.CUDAGraph:
    """``fn`` warmed up (three calls on a side stream), then captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, iters: int, flush: str) -> float:
    """Median microseconds of ``iters`` single replays of ``graph``, each after ``flush`` (see FLUSHES)."""
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")
    buffer = _flush_buffer() if flush != "none" else None
    evict = {"read": lambda: buffer.sum(dtype=torch.int32), "write": lambda: buffer.zero_(), "none": None}[flush]
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for _ in range(5):
        graph.replay()
    for start, end in pairs:
        if evict is not None:
            evict()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs) * 1e3

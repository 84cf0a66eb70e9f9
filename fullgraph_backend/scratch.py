"""Device buffers our kernels keep across calls (split partials, merge tickets), allocated once,
and the SM count the split work is sized to.

A captured graph keeps writing to the addresses it was captured with, so such a buffer lives as
long as the graphs that use it: entries are never dropped. Kernels that merge split work through
an atomic ticket counter leave their counters at 0, so every launch, replayed or not, finds them
zeroed.

Two launches that share a buffer must not run at once. Inside one graph runner they do not (its
calls hold a lock and run in order on the caller's stream), but two compiled models may run at
once on two streams (a draft and a target model, say), so each runner keeps its own buffers
(:func:`owned_by`, around every call of a :class:`fullgraph_backend.graph_runner.GraphRunner`);
kernels launched outside a runner share the process's.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

_OWNER: ContextVar[dict | None] = ContextVar("fullgraph_scratch_owner", default=None)


@contextlib.contextmanager
def owned_by(store: dict) -> Iterator[None]:
    """Buffers :func:`kept_buffers` hands out inside this block are ``store``'s: made there at their
    first use inside such a block, and found there again (a graph runner's warm-up makes them, its
    captures bake in their addresses). ``store`` must outlive every graph captured with its buffers,
    as a runner's does: dropped, its buffers go back to the allocator, which may give them to the
    next store, and two graphs then share them (docs/perf-notes.md, section 47). Example::

        with owned_by(self.scratch):
            out = compiled_step(*args)
    """
    token = _OWNER.set(store)
    try:
        yield
    finally:
        _OWNER.reset(token)

# Stand-in SM count where there are no SMs (the CPU interpreter), so tests exercise splitting.
NOMINAL_SMS = 16


@functools.lru_cache(maxsize=None)  # asked at every eager attention launch (launch_plan): once a device
def sm_count(device: torch.device) -> int:
    """The SMs a launch on ``device`` can fill: its multiprocessors on CUDA, :data:`NOMINAL_SMS` elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_SMS


def kept_buffers(table: dict, key: tuple, device: torch.device, make: Callable[[], tuple[torch.Tensor, ...]],
                 owner: str) -> tuple[torch.Tensor, ...]:
    """The buffers ``make()`` returns on ``device``, made at the first call for ``(device, *key)`` and
    kept in ``table`` under it (each kernel module holds its own; ``key`` names the shape), or, inside
    :func:`owned_by`, in the owner's store in place of ``table``.

    The first call for a key must not be under CUDA graph capture (the graph runner warms every
    graph key up first, which makes them); ``owner`` names the kernel in that error. ``make`` runs
    on a worker thread: cudagraph trees (``mode="reduce-overhead"``) send every allocation of the
    thread that warms up or records a graph to their pool and refuse a pool tensor that is not an
    output (docs/perf-notes.md, section 35). The device is synchronised after it, so zeros it
    wrote are in place before the caller's stream uses them.
    """
    store = _OWNER.get()
    if store is not None:
        table = store.setdefault(id(table), {})  # the module's table outlives every store: its id is one key
    key = (device, *key)
    if key not in table:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{owner}: scratch for this shape was not allocated before CUDA graph capture; run "
                               "the op once at this padded size (warmup) before capturing")

        def allocate() -> tuple[torch.Tensor, ...]:
            buffers = make()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return buffers

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            table[key] = pool.submit(allocate).result()
    return table[key]

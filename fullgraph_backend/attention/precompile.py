"""The Triton variants of our attention kernels that a capture loop will launch, compiled before it
in worker processes (docs/perf-notes.md, sections 23 and 28).

Triton's JIT compiles a kernel once per variant: its constexprs, its launch options and, per
argument, a specialization (an int's divisibility by 16, a pointer's alignment). On a cold start
every variant our attention launches (9 for qwen2.5-1.5b on an H200) was compiled in the warm-up
of the first graph key launching it, one after the other, about 1 s each for sm_90 and most of it
holding the GIL. Here, before the model compiles:

1. :func:`graph_launches` lists the launches :func:`~.triton_paged.paged_attention` makes at every
   graph key (:func:`graph_keys`), from :func:`~.triton_paged.kernel_launches`, launching nothing;
2. :func:`variants` turns them into the compiles the JIT would make at launch, with the JIT's own
   binder and argument packing for a target given instead of read off a device;
3. :func:`start` hands the compiles to worker processes (Inductor's compile workers in the engine),
   which write them into the on-disk cache the JIT reads; :meth:`Precompile.wait` waits for them.

The capture's warm-ups then find each variant in the cache, as on a warm start: a compile made here
is the JIT's own, made earlier (same inputs, so the same cache key and binary). A variant listed
wrong, or compiled too late, is missed and costs its compile at warm-up, as before.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit

from fullgraph_backend import compat
from fullgraph_backend.attention import triton_paged
from fullgraph_backend.forward_context import AttentionMetadata, BatchKind

log = logging.getLogger("fullgraph")


class Variant(NamedTuple):
    """One compile of one kernel, as the JIT makes it at launch: ``triton.compile``'s arguments
    (``kernel`` names the kernel in :mod:`.triton_paged`)."""

    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    target: GPUTarget


class Compiled(NamedTuple):
    """What a worker did with a variant: the hash Triton filed it under, and whether it was there
    already (``cached``) or compiled."""

    kernel: str
    hash: str
    cached: bool
    seconds: float


def graph_keys(capture_sizes: Sequence[int], max_num_tokens: int, max_num_seqs: int) -> list[tuple[int, BatchKind]]:
    """The graph keys a capture loop captures for an attention implementation with a decode variant:
    every capture size within the token buffers as a mixed batch, and as a uniform-decode batch up
    to the first size holding ``max_num_seqs`` requests (the graph runner's rule)."""
    sizes = sorted(s for s in capture_sizes if s <= max_num_tokens)
    decode_limit = next((s for s in sizes if s >= max_num_seqs), sizes[-1] if sizes else 0)
    return [(size, kind) for size in sizes for kind in BatchKind
            if kind is BatchKind.MIXED or size <= decode_limit]


def graph_launches(keys: Iterable[tuple[int, BatchKind]], calls: Iterable[tuple[int, int]], kv_cache: torch.Tensor,
                   metadata: AttentionMetadata, *, pdl: bool) -> list[triton_paged.Launch]:
    """The launches :func:`~.triton_paged.paged_attention` makes at each graph key, for each attention
    call ``(query heads, sliding window)`` over ``kv_cache`` and ``metadata`` (a forward context's:
    only their shapes, strides, alignment and device are read).

    ``q``, ``k`` and ``v`` are views of one projection's output, as in the engine's graphs; split-KV
    launches allocate their scratch as the warm-up would (no memory, on the meta device).
    """
    keys, calls = list(keys), sorted(set(calls))
    _, _, _, kv_heads, head_dim = kv_cache.shape
    buffers = (kv_cache, *metadata.tensors().values())
    found = []
    for q_heads, window in calls:
        widths = [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        qkv = torch.empty(max((size for size, _ in keys), default=0), sum(widths), dtype=kv_cache.dtype,
                          device=kv_cache.device)
        for size, kind in keys:
            q, k, v = (x.unflatten(1, (-1, head_dim)) for x in qkv[:size].split(widths, dim=1))
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            found += triton_paged.kernel_launches(out, q, k, v, *buffers, head_dim ** -0.5, window,
                                                  split_kv=kind is BatchKind.DECODE, pdl=pdl)
    return found


@functools.cache
def jit_function(kernel) -> jit.JITFunction:
    """The JITFunction behind a kernel of :mod:`.triton_paged`: the kernel itself, or, under
    ``TRITON_INTERPRET=1`` (where the decorator returns an interpreter wrapper holding the function
    and the decorator's arguments), one made from the same function and arguments."""
    if isinstance(kernel, jit.JITFunction):
        return kernel
    return jit.JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if k.startswith("do_not_specialize")})


def variants(launches: Iterable[triton_paged.Launch], target: GPUTarget) -> list[Variant]:
    """The distinct compiles ``launches`` cost Triton's JIT on ``target``, in launch order.

    Computed as ``JITFunction.run`` computes them at a launch: its keyword prelude, then its binder
    (the specialization) and ``_pack_args`` (signature, constexprs, attributes, options), with
    ``target`` instead of the current device's. Two launches are one variant when the JIT's key of
    them (specialization and options) is equal.
    """
    backend = make_backend(target)
    binders, found = {}, {}
    for launch in launches:
        fn = jit_function(launch.kernel)
        if fn.__name__ not in binders:
            binders[fn.__name__] = jit.create_function_from_signature(fn.signature, fn.params, backend)
        kwargs = compat.triton_launch_kwargs(fn, launch.kwargs)
        bound, specialization, options = binders[fn.__name__](*launch.args, **kwargs)
        key = (fn.__name__, jit.compute_cache_key({}, specialization, options))
        if key not in found:
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            found[key] = Variant(fn.__name__, signature, constexprs, attrs, options.__dict__, target)
    return list(found.values())


def compile_variant(variant: Variant, source: str, cache_dir: str) -> Compiled:
    """Compile ``variant`` into Triton's cache in ``cache_dir``, as the JIT's ``_do_compile`` does
    (``triton.compile`` of the same source, target and options: the same cache key). Runs in a
    worker process; uses no device. ``source``: the kernel's ``cache_key`` in the engine's process
    (a hash of its source and its callees'), so a worker that imported other sources refuses."""
    fn = jit_function(getattr(triton_paged, variant.kernel))
    if fn.cache_key != source:
        raise RuntimeError(f"{variant.kernel} in this worker ({triton_paged.__file__}) is not the engine's: "
                           f"another checkout of fullgraph_backend on the workers' path?")
    hits = []
    start = time.perf_counter()
    with knobs.cache.scope(), knobs.compilation.scope():
        knobs.cache.dir = cache_dir
        knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(cache_hit)
        kernel = triton.compile(ASTSource(fn, variant.signature, variant.constexprs, variant.attrs),
                                target=variant.target, options=variant.options)
    return Compiled(variant.kernel, kernel.hash, hits == [True], time.perf_counter() - start)


class Precompile:
    """Variants compiling in worker processes since :func:`start`; :meth:`wait` collects them."""

    def __init__(self, total: int, futures: dict[concurrent.futures.Future, str], started: float) -> None:
        self._total, self._futures, self._started = total, futures, started
        self._finished = time.perf_counter()  # when the last compile finished (or the cache lookups)
        self.summary: str | None = None  # the startup report's line, once waited for
        for future in futures:
            future.add_done_callback(self._finish)

    def _finish(self, future: concurrent.futures.Future) -> None:
        self._finished = max(self._finished, time.perf_counter())

    def wait(self, timeout: float) -> str:
        """Wait up to ``timeout`` s for every compile (once; later calls return the first answer)
        and return a line for the startup report: variants, seconds from :func:`start` to the last
        compile's end, how many were compiled and how many found in the cache. A compile that
        failed, is late, or was filed under another key than this process's JIT computes (another
        ptxas, say) is logged in one line: the JIT compiles those at warm-up, as without a
        precompile (late ones still finish)."""
        if self.summary is not None:
            return self.summary
        done, late = concurrent.futures.wait(self._futures, timeout=timeout)
        compiled, astray, failed = 0, 0, []
        for future in done:
            try:
                result = future.result()
            except Exception as error:  # a worker's
                failed.append(f"{type(error).__name__}: {error}")
                continue
            compiled += not result.cached
            astray += result.hash != self._futures[future]
        self.summary = (f"{self._total} in {self._finished - self._started:.1f} s ({compiled} compiled, "
                        f"{self._total - compiled - len(failed) - len(late)} cached)")
        trouble = ([f"{len(failed)} failed ({failed[0]})"] if failed else []) + (
            [f"{len(late)} late"] if late else []) + ([f"{astray} under other keys"] if astray else [])
        if trouble:
            self.summary += ", " + ", ".join(trouble)
            log.warning("fullgraph: attention kernels precompiled: %s; the JIT compiles those at warm-up",
                        self.summary)
        return self.summary


def start(variants: Sequence[Variant], pool: Callable[[], object]) -> Precompile:
    """Compile the ``variants`` missing from the cache the JIT reads now (``triton.knobs.cache.dir``)
    in worker processes: ``pool()`` (only called if one is missing, so a warm start starts no
    workers) returns an executor whose ``submit(fn, *args)`` runs a module-level ``fn`` in a
    process that must not share the caller's CUDA context (the workers never touch a device)."""
    started = time.perf_counter()
    cache_dir = knobs.cache.dir
    fns = {v.kernel: jit_function(getattr(triton_paged, v.kernel)) for v in variants}
    hashes = [compat.triton_cache_hash(ASTSource(fns[v.kernel], v.signature, v.constexprs, v.attrs), v.target,
                                       v.options) for v in variants]
    missing = [(v, h) for v, h in zip(variants, hashes) if not compat.triton_cached(h, v.kernel)]
    workers = pool() if missing else None
    return Precompile(len(variants), {workers.submit(compile_variant, v, fns[v.kernel].cache_key, cache_dir): h
                                      for v, h in missing}, started)

"""The graph runner: pad a call to its capture size, replay that size's graph, slice the outputs.

``GraphRunner`` is the callable the backend returns. It owns the graph keys and the capture
loop; each compiled piece (the whole graph in ``full`` mode, the parts between attention calls
in ``piecewise`` mode) is a :class:`GraphedPiece` holding its static input buffers and one
captured call per key. Outputs of a replay live in the shared graph pool and stay valid only
until the next call of any compiled model on this device.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fullgraph_backend.compat import outputs_as_tuple
from fullgraph_backend.cuda_graph import CapturedCall, CudaGraphs, EmulatedGraphs, frozen_gc
from fullgraph_backend.forward_context import BatchKind, ForwardContext, current_forward_context
from fullgraph_backend.padding import ArgKind, BatchSignature

log = logging.getLogger("fullgraph")

Key = tuple  # (padded size or None for a static graph, BatchKind)


class GraphedPiece:
    """A compiled callable captured once per key, reading its inputs from fixed addresses.

    The runner sets ``mode`` and ``key`` before calling it: ``eager`` calls straight through;
    ``warmup``, ``capture`` and ``replay`` run at the key's padded size, with the size arg
    replaced. A batched or per-call input is read from a static buffer (rows past the real count
    keep stale, finite values), except one that is the output of a piece captured earlier for
    the same key (piecewise mode): the graph reads that pool address in place, as vLLM's
    piecewise graphs do, so a replay copies only what moved.
    """

    def __init__(self, fn: Callable, signature: BatchSignature, graphs: CudaGraphs | EmulatedGraphs,
                 max_size: int | None, single_output: bool = False,
                 produced: dict[Key, set[int]] | None = None) -> None:
        self.fn, self.sig, self.graphs = fn, signature, graphs
        self.single_output = single_output  # fn returns one value, not a tuple
        # addresses of outputs captured so far in the current key's capture pass, shared by the pieces
        self._produced = produced if produced is not None else {}
        specs = signature.inputs
        self._copied = [i for i, s in enumerate(specs) if s.kind in (ArgKind.BATCHED, ArgKind.COPIED)]
        self._sizes = [i for i, s in enumerate(specs) if s.kind is ArgKind.SIZE]
        self._static = [i for i, s in enumerate(specs) if s.kind is ArgKind.STATIC]
        self._max_size = max_size
        self._buffers: dict[int, torch.Tensor] = {}  # allocated on first use, outside any fake mode
        self._views: dict[int | None, dict[int, torch.Tensor]] = {}
        self._reads: dict[Key, dict[int, torch.Tensor]] = {}  # per key: what the graph reads for each input
        self.calls: dict[Key, CapturedCall] = {}
        self._static_ptrs: dict[Key, list[int]] = {}
        self.mode, self.key = "eager", None

    def __call__(self, *args):
        if self.mode == "eager":
            return self.fn(*args)
        key = self.key
        if self.mode == "warmup":
            return self._as_fn_returns(self.graphs.warmup(self.fn, self._stage(args, self._staging(key[0]))))
        if self.mode == "capture":
            produced = self._produced.setdefault(key, set())
            reads = {i: args[i] if _same_place(args[i], view) and args[i].data_ptr() in produced else view
                     for i, view in self._staging(key[0]).items()}
            staged = self._stage(args, reads)
            self.calls[key] = call = self.graphs.capture(self.fn, staged)
            self._reads[key] = reads
            self._static_ptrs[key] = [staged[i].data_ptr() for i in self._static]
            produced.update(o.data_ptr() for o in call.outputs if isinstance(o, torch.Tensor))
            return self._as_fn_returns(call.outputs)
        call = self.calls[key]
        if [args[i].data_ptr() for i in self._static] != self._static_ptrs[key]:
            self._raise_moved(args)
        self._stage(args, self._reads[key])
        call.replay()
        return self._as_fn_returns(call.outputs)

    def end_capture(self, key: Key) -> None:
        """After every piece captured ``key``: let later captures reuse this key's output memory."""
        self.calls[key].hold = None
        self._produced.pop(key, None)

    def _as_fn_returns(self, outputs: tuple):
        return outputs[0] if self.single_output else outputs

    def _staging(self, size: int | None) -> dict[int, torch.Tensor]:
        """The static buffers viewed at ``size``, by input position."""
        views = self._views.get(size)
        if views is None:
            if not self._buffers:
                self._buffers = {i: self.sig.allocate(self.sig.inputs[i], self._max_size) for i in self._copied}
            views = self._views[size] = {i: self.sig.view(self.sig.inputs[i], self._buffers[i], size)
                                         for i in self._copied}
        return views

    def _stage(self, args: tuple, reads: dict[int, torch.Tensor]) -> list:
        """The args the graph sees: each input copied to where the graph reads it, unless it is there."""
        args = list(args)
        size = self.key[0]
        for i in self._copied:
            src, dst = args[i], reads[i]
            if src.data_ptr() != dst.data_ptr():
                for d in self.sig.inputs[i].batch_dims:  # capture loops stage real args at smaller sizes too
                    rows = min(src.shape[d], dst.shape[d])
                    src, dst = src.narrow(d, 0, rows), dst.narrow(d, 0, rows)
                dst.copy_(src)
            args[i] = reads[i]
        for i in self._sizes:
            args[i] = size
        return args

    def _raise_moved(self, args) -> None:
        moved = [i for i, p in zip(self._static, self._static_ptrs[self.key]) if args[i].data_ptr() != p]
        raise RuntimeError(
            f"fullgraph: {len(moved)} graph input(s) without a batch dim (weights or buffers, arg positions "
            f"{moved[:8]}) are not at the addresses captured in the CUDA graph, so a replay would read stale "
            f"memory. This happens after model.to(...), load_state_dict(assign=True) or replacing a parameter. "
            f"Update weights in place (param.data.copy_(...)), or call torch._dynamo.reset() and compile again.")


def _same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


@dataclass
class CaptureRecord:
    """One row of the capture table."""

    size: int | None
    kind: str
    warmup_ms: float
    capture_ms: float
    pool_mib: float


@dataclass
class Path:
    """One way to run the graph: ``fn`` calls the pieces (the whole graph, or the parts between
    attention calls with attention eager in between)."""

    fn: Callable
    pieces: list[GraphedPiece]


class GraphRunner:
    """The callable the backend returns: picks the graph key, captures, replays, falls back.

    Keys are ``(padded size, batch kind)``. Padded graphs are captured for every capture size on
    the first call, largest first; graphs whose ops mix rows across the batch dim are keyed by
    exact size and captured on first sight of each size. A batch beyond the largest capture
    size runs the compiled code without graphs (logged once). ``paths`` maps a batch kind to how
    it runs: ``full_and_piecewise`` gives uniform-decode batches the full graph and mixed
    batches the pieces; every other mode has one path for both.
    """

    def __init__(self, paths: dict[BatchKind, Path], signature: BatchSignature,
                 extra_args: tuple[torch.Tensor, ...], *,
                 capture_sizes: tuple[int, ...], pad: bool, use_graphs: bool, ctx: ForwardContext | None,
                 decode_variant: bool, max_num_seqs: int | None, static_tokens: int | None = None,
                 on_capture: Callable[[list[CaptureRecord]], None] | None = None) -> None:
        self.paths = {BatchKind.MIXED: paths[BatchKind.MIXED],
                      BatchKind.DECODE: paths.get(BatchKind.DECODE, paths[BatchKind.MIXED])}
        self.sig = signature
        # decode batches get keys of their own when a kernel or the path differs for them
        self.kinds_differ = decode_variant or self.paths[BatchKind.DECODE] is not self.paths[BatchKind.MIXED]
        self.on_capture = on_capture  # called with the capture table after each capture loop (the dump)
        self.extra_args = extra_args  # the forward-context buffers the attention swap made graph inputs
        self.capture_sizes, self.pad, self.use_graphs = capture_sizes, pad, use_graphs
        self.ctx = ctx
        self.static_tokens = static_tokens  # the token count a static (size-specialised) graph was traced at
        # uniform-decode graphs exist up to the first capture size holding max_num_seqs requests
        seqs = max_num_seqs or (capture_sizes[-1] if capture_sizes else 0)
        self._decode_limit = next((s for s in capture_sizes if s >= seqs), capture_sizes[-1] if capture_sizes else 0)
        self.capture_table: list[CaptureRecord] = []
        self._said: set[str] = set()

    @property
    def pieces(self) -> list[GraphedPiece]:
        """Every captured piece, of every path."""
        return list({id(p): p for path in self.paths.values() for p in path.pieces}.values())

    @property
    def __code__(self):
        """depyf's dump (``fullgraph_backend.dump``) decompiles a compiled function's ``__code__``."""
        return type(self).__call__.__code__

    def __call__(self, *args):
        args = args + self.extra_args
        n = self.sig.batch_size(args)
        kind = self._check_context(n)
        key = self._key(n, kind)
        if key is None:
            return self._run("eager", None, args)
        if key not in self.paths[key[1]].pieces[0].calls:
            self._capture(self._all_keys() if self.pad and not self.capture_table else [key], args)
        out = self._run("replay", key, args)
        return out if n is None else self.sig.slice_outputs(out, n)

    # ---- keys ----------------------------------------------------------------------------
    def _check_context(self, n: int | None) -> BatchKind:
        if self.ctx is None:
            return BatchKind.MIXED
        active = current_forward_context()
        if active is not self.ctx:
            raise RuntimeError("fullgraph: this model was compiled against another ForwardContext (or none is "
                               "active); call it inside `with use_forward_context(ctx)` with the context it was "
                               "compiled with, or torch._dynamo.reset() and compile again")
        tokens = n if n is not None else self.static_tokens
        if tokens is not None and tokens != active.num_tokens:
            raise RuntimeError(f"fullgraph: the model got {tokens} tokens but ctx.prepare(...) described "
                               f"{active.num_tokens}; prepare the metadata for this batch first")
        return active.batch_kind if self.kinds_differ else BatchKind.MIXED

    def _key(self, n: int | None, kind: BatchKind) -> Key | None:
        if not self.use_graphs:
            return None
        if n is None:
            return (None, kind)
        sizes = self.capture_sizes
        if not sizes or n > sizes[-1]:
            self._say_once("beyond", f"batch of {n} is beyond the largest capture size "
                                     f"{sizes[-1] if sizes else 0}: running the compiled graph without CUDA graphs")
            return None
        if not self.pad:
            return (n, kind)
        size = sizes[bisect.bisect_left(sizes, n)]
        # a decode batch past the decode graphs runs the mixed graph: correct for any batch
        return (size, kind if size <= self._decode_limit else BatchKind.MIXED)

    def _all_keys(self) -> list[Key]:
        """Every padded key, largest size first (smaller captures reuse the pool's blocks)."""
        kinds = [BatchKind.MIXED, BatchKind.DECODE] if self.kinds_differ else [BatchKind.MIXED]
        return [(size, kind) for size in reversed(self.capture_sizes) for kind in kinds
                if kind is BatchKind.MIXED or size <= self._decode_limit]

    # ---- capture and run -----------------------------------------------------------------
    def _run(self, mode: str, key: Key | None, args) -> tuple:
        path = self.paths[key[1] if key else BatchKind.MIXED]
        for piece in path.pieces:
            piece.mode, piece.key = mode, key
        try:
            return outputs_as_tuple(path.fn(*args))
        finally:
            for piece in path.pieces:
                piece.mode = "eager"

    def _capture(self, keys: list[Key], args) -> None:
        """Warm up and capture ``keys`` in order (largest first) with benign attention metadata."""
        start = time.perf_counter()
        with frozen_gc():
            for size, kind in keys:
                tokens = size if size is not None else self.ctx and self.ctx.num_tokens  # static graph: as traced
                metadata = self.ctx.capture_metadata(tokens, kind) if self.ctx else contextlib.nullcontext()
                with metadata:
                    t0 = time.perf_counter()
                    self._run("warmup", (size, kind), args)
                    t1 = time.perf_counter()
                    self._run("capture", (size, kind), args)
                    t2 = time.perf_counter()
                pieces = self.paths[kind].pieces
                for piece in pieces:
                    piece.end_capture((size, kind))
                pool = sum(p.calls[(size, kind)].pool_bytes for p in pieces) / 2**20
                self.capture_table.append(CaptureRecord(size, kind.value, (t1 - t0) * 1e3, (t2 - t1) * 1e3, pool))
        log.info("fullgraph: captured %d graph key(s) x %d piece(s) in %.2f s", len(keys), len(self.pieces),
                 time.perf_counter() - start)
        if self.on_capture:
            self.on_capture(self.capture_table)

    def _say_once(self, topic: str, message: str) -> None:
        if topic not in self._said:
            self._said.add(topic)
            log.warning("fullgraph: %s", message)

"""The graph runner: pad a call to its capture size, replay that size's graph, slice the outputs.

``GraphRunner`` is the callable the backend returns. A call, under its device's lock: pick the
:class:`GraphKey`, capture what is missing, then for each compiled piece (the whole graph in
``full`` mode, the parts between attention calls in ``piecewise`` mode) check the fixed
addresses -> copy the inputs in -> replay -> copy the inputs the graph wrote back; then slice
the outputs and hand them out. Each piece holds one :class:`Recording` per key.

What a caller sees is what one eager call would do: warm-up and capture runs leave every tensor
the graph writes as they found it (:class:`CaptureSession`), and writes to inputs that are not at
fixed addresses reach the caller's tensors. Outputs living in graph memory are valid until the
next call of this runner: on CUDA, reading one afterwards raises; on CPU (emulated graphs) each
call hands out its own copies.
"""
from __future__ import annotations

import bisect
import contextlib
import enum
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from fullgraph_backend import compat
from fullgraph_backend.compat import outputs_as_tuple
from fullgraph_backend.cuda_graph import CapturedCall, CudaGraphs, EmulatedGraphs, frozen_gc
from fullgraph_backend.forward_context import BatchKind, ForwardContext, current_forward_context
from fullgraph_backend.padding import BatchSignature
from fullgraph_backend.scratch import owned_by
from fullgraph_backend.staging import InputPlan, Role, StagedInputs

log = logging.getLogger("fullgraph")

# When state a graph reads in place moves (transformers' generate makes a new static cache per call),
# the key is captured again, as cudagraph trees re-record, if its recording served STABLE_REPLAYS
# replays: a capture costs about as much as that many calls' copies of the state in and out. A key
# whose state moved sooner RECAPTURES_BEFORE_COPYING times copies it at every call from then on.
STABLE_REPLAYS = 16
RECAPTURES_BEFORE_COPYING = 2

OVERWRITTEN = ("fullgraph: this output of a compiled call was overwritten by a later call of the same compiled "
               "model (outputs live in CUDA-graph memory until the next call, from any thread); clone() it before "
               "calling again, under a lock of your own when several threads share the model")


class GraphKey(NamedTuple):
    """What a recording is captured for: the padded size (None: a graph without a batch dim) and the kind."""

    size: int | None
    kind: BatchKind


class Phase(enum.Enum):
    WARMUP = "warmup"
    CAPTURE = "capture"
    REPLAY = "replay"


@dataclass(frozen=True)
class _Step:
    """What the pieces of the call in progress do; None outside a runner call: run eagerly."""

    phase: Phase
    key: GraphKey
    session: "CaptureSession | None" = None


_STEP: ContextVar[_Step | None] = ContextVar("fullgraph_step", default=None)


class CaptureSession:
    """One capture loop: gc frozen, RNG state kept, and every fixed-address tensor a warm-up or
    capture run writes put back as it was, so a caller sees one call's effect, not one per key.

    Also tracks, per key, the outputs captured so far: a later piece of the same key reads those
    where they live (piecewise mode).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._produced: dict[GraphKey, set[int]] = {}
        self._staged: dict[tuple[int, GraphKey], StagedInputs] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "CaptureSession":
        self._stack.enter_context(frozen_gc())
        cuda = self.device.type == "cuda"
        self._stack.enter_context(torch.random.fork_rng(
            devices=[self.device.index or torch.cuda.current_device()] if cuda else [],
            device_type="cuda" if cuda else "cpu"))
        return self

    def __exit__(self, *exc) -> None:
        self.restore(t for t, _ in self._kept.values())
        self._kept.clear()
        self._stack.close()

    def keep(self, tensors) -> None:
        """Snapshot ``tensors`` the first time this session sees them."""
        for t in tensors:
            if id(t) not in self._kept:
                self._kept[id(t)] = (t, t.clone())

    def restore(self, tensors) -> None:
        """Put ``tensors`` (snapshotted by :meth:`keep`) back as they were."""
        for t in tensors:
            t.copy_(self._kept[id(t)][1])

    def produced(self, key: GraphKey) -> set[int]:
        """Addresses of outputs captured so far for ``key``."""
        return self._produced.setdefault(key, set())

    def staged(self, piece: "CapturedPiece", key: GraphKey, args: tuple) -> StagedInputs:
        """The staging of ``piece`` at ``key``: made at warm-up, kept for the capture unless an input
        is now an earlier piece's captured output (read in place)."""
        produced = self.produced(key)
        staged = self._staged.get((id(piece), key))
        if staged is None or any(isinstance(args[i], torch.Tensor) and args[i].data_ptr() in produced
                                 for i in staged.reads if i not in staged.adopted):
            staged = self._staged[(id(piece), key)] = StagedInputs(piece.sig, piece.plan, key.size, args, produced,
                                                                   adopt=piece.adopts(key))
        return staged


class Recording:
    """One key of one piece: the captured call, the buffers it reads, the fixed addresses it read."""

    def __init__(self, call: CapturedCall, staged: StagedInputs, inputs: list) -> None:
        self.call, self.staged = call, staged
        self.replays = 0
        # what the graph reads where the caller keeps it, checked at every replay in one C++ call: the
        # fixed-address inputs and the adopted state; addresses indexed like the inputs, as
        # compat.data_ptrs_equal reads them (numbers: an adopted input may be another graph's output,
        # unreadable once that graph replays again)
        self.in_place = sorted([*staged.plan.indices(Role.IN_PLACE), *staged.adopted])
        self.ptrs = [None] * len(inputs)
        for i in self.in_place:
            self.ptrs[i] = inputs[i].data_ptr()
        # storages a caller must not keep past the next call: staging buffers and graph outputs;
        # an output aliasing an input the caller owns (an adopted or fixed-address one) is not ours
        theirs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)} - staged.owned
        self.owned = staged.owned | {o.untyped_storage().data_ptr() for o in call.outputs
                                     if isinstance(o, torch.Tensor)} - theirs
        # per staging buffer's storage: the input position it holds, and the buffer
        self.buffers = {t.untyped_storage().data_ptr(): (i, t) for i, t in staged.reads.items()}

    @property
    def reads(self) -> dict[int, torch.Tensor]:
        """Per copied input position, the tensor the graph reads."""
        return self.staged.reads


class InputsMoved(Exception):
    """An input a recording reads in place is no longer there: capture the key again. ``fixed``: the
    positions of the fixed-address inputs that moved (none where only adopted state did)."""

    def __init__(self, fixed: list[int]) -> None:
        super().__init__(fixed)
        self.fixed = fixed


class CapturedPiece:
    """A compiled callable captured once per key. Called by the runner's path (directly, or by the
    split module between eager attention calls); what it does comes from the call in progress.

    ``adopt_inputs``: read state inputs the graph writes (``InputPlan.adopt``) where the caller
    keeps them. Only for a piece that is the whole path: its address check runs before anything
    replays, so a moved input can be captured again instead.
    """

    def __init__(self, fn: Callable, signature: BatchSignature, graphs: CudaGraphs | EmulatedGraphs,
                 single_output: bool = False, adopt_inputs: bool = False) -> None:
        self.fn, self.sig, self.graphs = fn, signature, graphs
        self.single_output = single_output  # fn returns one value, not a tuple
        self.plan = InputPlan.of(signature)
        self.static = self.plan.indices(Role.IN_PLACE)
        self.recordings: dict[GraphKey, Recording] = {}
        self.adopt_inputs = adopt_inputs
        self.copy_only: set[GraphKey] = set()  # keys whose adopted inputs moved too often: copied instead

    def adopts(self, key: GraphKey) -> bool:
        """Whether ``key``'s recording reads the plan's state inputs in place."""
        return self.adopt_inputs and key not in self.copy_only

    def __call__(self, *args):
        step = _STEP.get()
        if step is None:
            return self.fn(*args)
        if step.phase is Phase.REPLAY:
            return self._as_fn_returns(self._replay(self.recordings[step.key], args))
        session = step.session
        staged = session.staged(self, step.key, args)
        # adopted inputs are the caller's own state: warm-up and capture runs must leave them as found
        written = [args[i] for i in (*self.plan.restore, *staged.adopted)]
        session.keep(written)
        try:
            if step.phase is Phase.WARMUP:
                return self._as_fn_returns(self.graphs.warmup(self.fn, staged.stage(args)))
            inputs = staged.stage(args)
            call = self.graphs.capture(self.fn, inputs)
        finally:
            session.restore(written)
        self.recordings[step.key] = Recording(call, staged, inputs)
        session.produced(step.key).update(o.data_ptr() for o in call.outputs if isinstance(o, torch.Tensor))
        return self._as_fn_returns(call.outputs)

    def end_capture(self, key: GraphKey) -> None:
        """After every piece captured ``key``: later captures may reuse this key's output memory."""
        self.recordings[key].call.hold = None

    def _replay(self, rec: Recording, args: tuple) -> tuple:
        if not compat.data_ptrs_equal(args, rec.ptrs, rec.in_place):
            fixed = [i for i in self.static if args[i].data_ptr() != rec.ptrs[i]]
            if fixed and not self.adopt_inputs:  # a piece among several: one before it may have replayed
                self._raise_moved(fixed)
            raise InputsMoved(fixed)
        rec.staged.copy_in(args)
        rec.call.replay()
        rec.staged.write_back(args)
        rec.replays += 1
        return rec.call.outputs

    def _as_fn_returns(self, outputs: tuple):
        return outputs[0] if self.single_output else outputs

    @staticmethod
    def _raise_moved(moved: list[int]) -> None:
        raise RuntimeError(
            f"fullgraph: {len(moved)} fixed-address graph input(s) (weights, buffers or marked tensors; arg "
            f"positions {moved[:8]}) are not at the addresses captured in the CUDA graph, so a replay would read "
            f"stale memory. This happens after model.to(...), load_state_dict(assign=True) or replacing a "
            f"parameter. Update weights in place (param.data.copy_(...)), or call torch._dynamo.reset() and "
            f"compile again.")


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
    pieces: list[CapturedPiece]


_LOCKS: dict[torch.device, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def device_lock(device: torch.device) -> threading.RLock:
    """The lock every compiled call on ``device`` holds from copy-in to hand-out: replays of one
    runner share its buffers and graph memory, so two threads must not interleave them."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(device, threading.RLock())


class GraphRunner:
    """The callable the backend returns: picks the graph key, captures, replays, falls back.

    Padded graphs reading a forward context (the engine's) are captured for every capture size
    on the first call, largest first, so startup pays for all of them once; other graphs are
    captured per key on first use, so a program pays only for the sizes it runs. Graphs whose ops
    mix rows across the batch dim are keyed by exact size. A batch beyond the largest capture size
    runs the compiled code without graphs (logged once). ``paths`` maps a batch kind to how it
    runs: ``full_and_piecewise`` gives uniform-decode batches the full graph and mixed batches
    the pieces; every other mode has one path for both.
    """

    def __init__(self, paths: dict[BatchKind, Path], signature: BatchSignature,
                 extra_args: tuple[torch.Tensor, ...], *, graphs: CudaGraphs | EmulatedGraphs,
                 capture_sizes: tuple[int, ...], pad: bool, use_graphs: bool, ctx: ForwardContext | None,
                 decode_variant: bool, max_num_seqs: int | None, static_tokens: int | None = None,
                 on_capture: Callable[[list[CaptureRecord]], None] | None = None,
                 input_sources: list | None = None, example_inputs: list | None = None) -> None:
        self.paths = {BatchKind.MIXED: paths[BatchKind.MIXED],
                      BatchKind.DECODE: paths.get(BatchKind.DECODE, paths[BatchKind.MIXED])}
        self.sig, self.graphs = signature, graphs
        self.plan = InputPlan.of(signature)
        # decode batches get keys of their own when a kernel or the path differs for them
        self.kinds_differ = decode_variant or self.paths[BatchKind.DECODE] is not self.paths[BatchKind.MIXED]
        self.on_capture = on_capture  # called with the capture table after each capture loop (the dump)
        self.extra_args = extra_args  # the forward-context buffers the attention swap made graph inputs
        self.capture_sizes, self.pad, self.use_graphs = capture_sizes, pad, use_graphs
        # Dynamo's source and compile-time value of each argument before extra_args, for DirectCall
        self.input_sources, self.example_inputs = input_sources or [], example_inputs
        self.ctx = ctx
        self.static_tokens = static_tokens  # the token count a static (size-specialised) graph was traced at
        # uniform-decode graphs exist up to the first capture size holding max_num_seqs requests
        seqs = max_num_seqs or (capture_sizes[-1] if capture_sizes else 0)
        self._decode_limit = next((s for s in capture_sizes if s >= seqs), capture_sizes[-1] if capture_sizes else 0)
        self.capture_table: list[CaptureRecord] = []
        self._said: set[str] = set()
        self._owned: dict[GraphKey, set[int]] = {}  # per key, storages a caller must not keep
        self._all_owned: set[int] = set()
        self._not_ours: list[int] | None = None  # _unshare's last all-clear: the copied inputs' addresses
        self._copied = self.plan.indices(Role.COPY)
        self._handed_out: list[torch.Tensor] = []  # outputs of the last call that live in graph memory
        # per key and whether fixed-address inputs moved (else adopted state), recaptures that came soon
        self._moves: dict[tuple[GraphKey, bool], int] = {}
        self._ungraphed: set[GraphKey] = set()  # keys whose weights moved too often: run without graphs
        self._lock = device_lock(graphs.device)
        self._scratch: dict = {}  # our kernels' kept buffers for this runner's launches (scratch.owned_by)

    @property
    def pieces(self) -> list[CapturedPiece]:
        """Every captured piece, of every path."""
        return list({id(p): p for path in self.paths.values() for p in path.pieces}.values())

    @property
    def __code__(self):
        """depyf's dump (``fullgraph_backend.dump``) decompiles a compiled function's ``__code__``."""
        return type(self).__call__.__code__

    def __call__(self, *args):
        args = args + self.extra_args
        if self.plan.host:  # CPU tensors the graph reads on the device (passes/host_inputs.py)
            args = tuple(a.to(self.graphs.device) if i in self.plan.host else a for i, a in enumerate(args))
        with self._lock, owned_by(self._scratch):
            n = self.sig.batch_size(args)
            key = self._key(n, self._check_context(n))
            if key is None:
                return outputs_as_tuple(self.paths[BatchKind.MIXED].fn(*args))
            if key not in self.paths[key.kind].pieces[0].recordings:
                self._capture(self._keys_to_capture(key), args)
            args = self._unshare(args)
            self._expire_outputs()
            try:
                out = self._run(_Step(Phase.REPLAY, key), args)
            except InputsMoved as moved:  # raised before anything replayed: capture the key for the new addresses
                if not self._recapture(key, args, moved.fixed):
                    return outputs_as_tuple(self.paths[BatchKind.MIXED].fn(*args))
                out = self._run(_Step(Phase.REPLAY, key), args)
            return self._hand_out(out if n is None else self.sig.slice_outputs(out, n, args), key, args)

    def release(self) -> None:
        """Drop every captured graph (outputs handed out from them become unreadable); the next call
        captures again. NCCL destroys a communicator only once every graph that captured its
        collectives is gone: tensor parallelism's shutdown calls this first."""
        with self._lock:
            self._expire_outputs()
            for piece in self.pieces:
                piece.recordings.clear()
                piece.copy_only.clear()
            self._owned.clear()
            self._moves.clear()
            self._ungraphed.clear()
            self._owned_changed()

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

    def _key(self, n: int | None, kind: BatchKind) -> GraphKey | None:
        if not self.use_graphs:
            return None
        if n is None:
            return GraphKey(None, kind)
        sizes = self.capture_sizes
        if not sizes or n > sizes[-1]:
            self._say_once("beyond", f"batch of {n} is beyond the largest capture size "
                                     f"{sizes[-1] if sizes else 0}: running the compiled graph without CUDA graphs")
            return None
        if not self.pad:
            key = GraphKey(n, kind)
        else:
            size = sizes[bisect.bisect_left(sizes, n)]
            # a decode batch past the decode graphs runs the mixed graph: correct for any batch
            key = GraphKey(size, kind if size <= self._decode_limit else BatchKind.MIXED)
        return None if key in self._ungraphed else key

    def _keys_to_capture(self, key: GraphKey) -> list[GraphKey]:
        """``key``; with a forward context and padding, every padded key not captured yet, largest
        first (smaller captures reuse the pool's blocks)."""
        if not (self.pad and self.ctx is not None):
            return [key]
        kinds = [BatchKind.MIXED, BatchKind.DECODE] if self.kinds_differ else [BatchKind.MIXED]
        return [GraphKey(size, kind) for size in reversed(self.capture_sizes) for kind in kinds
                if (kind is BatchKind.MIXED or size <= self._decode_limit)
                and GraphKey(size, kind) not in self.paths[kind].pieces[0].recordings]

    # ---- capture and replay --------------------------------------------------------------
    def _run(self, step: _Step, args: tuple) -> tuple:
        token = _STEP.set(step)
        try:
            return outputs_as_tuple(self.paths[step.key.kind].fn(*args))
        finally:
            _STEP.reset(token)

    def _capture(self, keys: list[GraphKey], args: tuple) -> None:
        """Warm up and capture ``keys`` in order with benign attention metadata."""
        start = time.perf_counter()
        with CaptureSession(self.graphs.device) as session:
            for key in keys:
                tokens = key.size if key.size is not None else self.ctx and self.ctx.num_tokens  # static: as traced
                metadata = self.ctx.capture_metadata(tokens, key.kind) if self.ctx else contextlib.nullcontext()
                with metadata:
                    t0 = time.perf_counter()
                    self._run(_Step(Phase.WARMUP, key, session), args)
                    t1 = time.perf_counter()
                    self._run(_Step(Phase.CAPTURE, key, session), args)
                    t2 = time.perf_counter()
                pieces = self.paths[key.kind].pieces
                for piece in pieces:
                    piece.end_capture(key)
                self._owned[key] = set().union(*(p.recordings[key].owned for p in pieces))
                self._all_owned |= self._owned[key]  # a capture only adds: no union over every key per key
                self._not_ours = None
                pool = sum(p.recordings[key].call.pool_bytes for p in pieces) / 2**20
                self.capture_table.append(CaptureRecord(key.size, key.kind.value, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                                                        pool))
        log.info("fullgraph: captured %d graph key(s) x %d piece(s) in %.2f s", len(keys), len(self.pieces),
                 time.perf_counter() - start)
        if self.on_capture:
            self.on_capture(self.capture_table)

    def _recapture(self, key: GraphKey, args: tuple, fixed: list[int]) -> bool:
        """Capture ``key`` again: an input it reads in place moved (``fixed``: the fixed-address ones,
        as cudagraph trees re-record when a parameter moves). After :data:`RECAPTURES_BEFORE_COPYING`
        moves within :data:`STABLE_REPLAYS` replays of their capture, copy moved state in and out
        instead; for moved weights, which are too large to copy, run ``key`` without graphs (returns
        False)."""
        pieces = self.paths[key.kind].pieces
        if min(p.recordings[key].replays for p in pieces) < STABLE_REPLAYS:
            self._moves[key, bool(fixed)] = self._moves.get((key, bool(fixed)), 0) + 1
        moves = self._moves.get((key, bool(fixed)), 0)
        for piece in pieces:
            del piece.recordings[key]
        # the dropped recording's memory is free for anyone's tensors now (on CUDA, once its pool
        # releases it): a new state tensor there is the caller's, not ours to copy (_unshare)
        del self._owned[key]
        self._owned_changed()
        if fixed:
            self._say_once("fixed moved", f"{len(fixed)} fixed-address input(s) (weights, buffers or marked tensors; "
                                          f"arg positions {fixed[:8]}) moved since the capture: another instance of "
                                          f"the model, model.to(...) or load_state_dict(assign=True); capturing again "
                                          f"for the new addresses")
        if fixed and moves > RECAPTURES_BEFORE_COPYING:
            self._say_once(f"fixed moved {key}", f"fixed-address inputs of the graph for {key.size} rows moved {moves} "
                                                 f"times within {STABLE_REPLAYS} calls: running it without CUDA graphs")
            self._ungraphed.add(key)
            return False
        if moves > RECAPTURES_BEFORE_COPYING:
            self._say_once(f"moved {key}", f"state inputs of the graph for {key.size} rows moved {moves} times "
                                           f"within {STABLE_REPLAYS} calls: copying them in and out at every call "
                                           f"instead of reading them in place")
            for piece in pieces:
                piece.copy_only.add(key)
        self._capture([key], args)
        return True

    def _owned_changed(self) -> None:
        """What the runner owns lost a key's storages: the set again from the keys left, and
        :meth:`_unshare`'s remembered addresses forgotten."""
        self._all_owned = set().union(*self._owned.values())
        self._not_ours = None

    def _unshare(self, args: tuple) -> tuple:
        """Copy inputs that live in this runner's memory (an earlier call's outputs fed back): a replay
        may overwrite them before a later piece copies them in.

        Whether a tensor is ours depends only on its storage and on what we own; while what we own is
        unchanged, memory we own stays ours and memory we do not stays the caller's, so inputs at the
        addresses of the last all-clear call are clear again. One C++ address check then replaces a
        storage lookup per copied input (~50 for transformers' static cache, where cProfile gave the
        lookups ~40% of the runner's host time on the H200's host: perf-notes 34)."""
        if self._not_ours is not None and compat.data_ptrs_equal(args, self._not_ours, self._copied):
            return args
        tensors = all(isinstance(args[i], torch.Tensor) for i in self._copied)
        shared = [i for i in self._copied
                  if isinstance(args[i], torch.Tensor) and args[i].untyped_storage().data_ptr() in self._all_owned]
        if not shared and tensors:
            self._not_ours = [a.data_ptr() if isinstance(a, torch.Tensor) else 0 for a in args]
        return tuple(a.clone() if i in shared else a for i, a in enumerate(args)) if shared else args

    def _hand_out(self, outputs: tuple, key: GraphKey, args: tuple) -> tuple:
        """Outputs for the caller. A view of a copied input is that view of the caller's tensor, as
        eagerly; other outputs in graph memory are new tensor objects over it (CUDA: marked
        unreadable once the next call overwrites them), or copies where that cannot be marked."""
        owned = self._owned[key]
        path = self.paths[key.kind]
        # a whole-graph piece's inputs are the call's; split pieces number their own inputs
        buffers = path.pieces[0].recordings[key].buffers if path.fn is path.pieces[0] else {}
        result = []
        for out in outputs:
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() in buffers:
                i, buffer = buffers[out.untyped_storage().data_ptr()]
                out = _caller_view(out, buffer, args[i])
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() in owned:
                if self.graphs.emulated or not compat.can_forbid_access():
                    out = out.clone()
                else:
                    out = compat.weak_tensor(out)
                    self._handed_out.append(out)
            result.append(out)
        return tuple(result)

    def _expire_outputs(self) -> None:
        for out in self._handed_out:
            compat.forbid_access(out, OVERWRITTEN)
        self._handed_out.clear()

    def _say_once(self, topic: str, message: str) -> None:
        if topic not in self._said:
            self._said.add(topic)
            log.warning("fullgraph: %s", message)


def _caller_view(out: torch.Tensor, buffer: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """``out``, a view of the staging ``buffer`` of the caller's ``arg``, as the same view of ``arg``
    (what an eager call returns); ``out`` itself where the two are laid out differently."""
    if arg.dim() != buffer.dim() or arg.stride() != buffer.stride() or arg.dtype != buffer.dtype:
        return out
    return arg.as_strided(out.shape, out.stride(), arg.storage_offset() + out.storage_offset() - buffer.storage_offset())

"""Runs one scheduled step: metadata into the forward context, the model (eager or compiled), sampling.

The runner owns the :class:`~fullgraph_backend.ForwardContext` (paged KV cache and static
metadata) and the model, compiled with ``backend="fullgraph"`` per the optimization level. Two
rules of the compiled model shape it:

- The token inputs are marked *unbacked* (:func:`fullgraph_backend.compat.mark_unbacked`), not
  merely dynamic: Dynamo specialises a backed size of 1, so a one-token step would compile a
  second graph (or need a dummy request beside it, which also kept one-row linears off the
  GEMV). With an unbacked size, one graph serves every step, one token included.
- Outputs of a compiled call are overwritten by the next call: the rows to sample are indexed
  out (a copy) and sampled before the next step. Logits are taken only at those rows.
- Compile once, then call without Dynamo. Dynamo compiles an engine's entry function, whose code
  object is the engine's own (:func:`engine_entry`): Dynamo keeps compiled code per code object,
  so engines do not share its recompile limit (the 9th engine of a process ran uncompiled). After
  warm-up, steps call the graph runner directly (:class:`~fullgraph_backend.direct_call.DirectCall`),
  skipping Dynamo's guards.

:meth:`warm_up` runs a dummy step at the token budget, where compilation and the capture of
every graph key happen, then a dummy uniform-decode step, and reports what startup cost.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fullgraph_backend import compat
from fullgraph_backend.backend import RecordingBackend
from fullgraph_backend.direct_call import CannotBind, DirectCall
from fullgraph_backend.engine.host import to_device
from fullgraph_backend.engine.levels import backend_options
from fullgraph_backend.engine.sampler import Sampler
from fullgraph_backend.engine.scheduler import ScheduledBatch
from fullgraph_backend.forward_context import ForwardContext, use_forward_context
from fullgraph_backend.kv_cache import NULL_BLOCK
from fullgraph_backend.models import Decoder

log = logging.getLogger("fullgraph")

SCRATCH_BLOCK = NULL_BLOCK + 1  # written by dummy requests only, never read by a real one
NUM_RESERVED_BLOCKS = SCRATCH_BLOCK + 1


@dataclass
class StartupReport:
    """What getting the engine ready cost (compile = first-call time minus warmup/capture time)."""

    level: int
    cudagraph_mode: str  # "eager" at -O0
    compile_s: float = 0.0
    capture_s: float = 0.0
    num_graphs: int = 0
    graph_mib: float = 0.0  # graph pool growth over all captures (0 on CPU: graphs are emulated)
    kv_blocks: int = 0
    kv_gib: float = 0.0

    def __str__(self) -> str:
        return (f"-O{self.level} ({self.cudagraph_mode}): compile {self.compile_s:.1f} s, "
                f"capture {self.capture_s:.2f} s, {self.num_graphs} graphs, graph memory {self.graph_mib:.0f} MiB, "
                f"KV cache {self.kv_blocks} blocks ({self.kv_gib:.2f} GiB)")


class ModelRunner:
    """Owns the forward context and the (compiled) model; ``execute(batch)`` runs one step."""

    def __init__(self, model: Decoder, *, level: int, cudagraph_mode: str | None, compile_options: dict | None,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int,
                 num_blocks: int, attention_impl: str, seed: int) -> None:
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.options = backend_options(level, cudagraph_mode, compile_options)
        if self.options is not None:  # decode graphs up to the real request limit, not the context's extra lane
            self.options.setdefault("max_num_seqs", max(max_num_seqs, 2))
        self.level = level
        self.ctx = make_context(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len, block_size=block_size, num_blocks=num_blocks,
                                attention_impl=attention_impl)
        self.eager_model = model
        self._backend = RecordingBackend(self.options) if self.options is not None else None
        # the per-step call: compiled through Dynamo until warm_up swaps in a DirectCall
        self.model: Callable = (functools.partial(torch.compile(engine_entry(), backend=self._backend), model)
                                if self._backend else model)
        self.sampler = Sampler(self.device, seed)
        pin = self.device.type == "cuda"
        self._ids = torch.zeros(self.ctx.max_num_tokens, dtype=torch.int64, pin_memory=pin)  # staging
        self._ids_copied = torch.cuda.Event() if pin else None
        # the last launch's sampled tokens (on the device) and their rows by request id
        self._last_sampled: tuple[torch.Tensor | None, dict[int, int]] = (None, {})

    @property
    def compiled(self) -> bool:
        return self._backend is not None

    @property
    def graph_runners(self) -> list:
        """The graph runners the backend returned for this engine's model (one per Dynamo graph)."""
        return list(self._backend.runners) if self._backend else []

    # ---- one step --------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch) -> "SampledTokens":
        """Launch ``batch`` (the model, then sampling) without waiting for the device.

        A token the previous launch is still sampling (:data:`~fullgraph_backend.engine.sequence.PENDING`)
        is fed from that launch's device tensor, so the host never waits between steps.
        """
        samples = batch.samples
        query_lens = list(batch.num_new)
        seq_lens = [s.num_computed + n for s, n in zip(batch.seqs, batch.num_new)]
        tables = [s.block_table for s in batch.seqs]
        ids, gathers = self._input_ids(batch)
        rows = [end - 1 for end, sample in zip(itertools.accumulate(query_lens), samples) if sample]
        logits = self._forward(query_lens, seq_lens, tables, ids, rows, gathers)
        picked = [(s.params, s.request_id) for s, sample in zip(batch.seqs, samples) if sample]
        tokens = None if logits is None else self.sampler(logits, [p for p, _ in picked], [r for _, r in picked])
        self._last_sampled = tokens, {rid: row for row, (_, rid) in enumerate(picked)}
        return SampledTokens(samples, tokens)

    def _input_ids(self, batch: ScheduledBatch) -> tuple[list[int], list[tuple[int, int]]]:
        """The packed token ids (0 where a token is pending) and, per pending token, (its index in
        the packed ids, its row in the previous launch's samples)."""
        ids, gathers = [], []
        previous_rows = self._last_sampled[1]
        for seq, n in zip(batch.seqs, batch.num_new):
            fed = seq.token_ids[seq.num_computed: seq.num_computed + n]
            if seq.num_pending and seq.num_computed + n > seq.num_tokens - seq.num_pending:
                if seq.num_pending > 1 or seq.request_id not in previous_rows:
                    raise RuntimeError(f"request {seq.request_id}: its pending token is not the previous "
                                       f"launch's (scheduled more than one step ahead)")
                gathers.append((len(ids) + n - 1, previous_rows[seq.request_id]))
                fed[-1] = 0
            ids += fed
        return ids, gathers

    def _forward(self, query_lens: list[int], seq_lens: list[int], tables: list[list[int]], ids: list[int],
                 rows: list[int], gathers: list[tuple[int, int]] = ()) -> torch.Tensor | None:
        """The model on one packed step; the logits at ``rows`` (a copy), or None when no rows.
        ``gathers``: (index in ``ids``, row of the previous launch's samples) for pending tokens."""
        n = len(ids)
        with use_forward_context(self.ctx), torch.inference_mode():
            positions = self.ctx.prepare(query_lens, seq_lens, tables)
            if self._ids_copied is not None:
                self._ids_copied.synchronize()  # the previous step's copy may still read the staging
            self._ids.numpy()[:n] = ids
            input_ids = self._ids[:n].to(self.device, non_blocking=True, copy=True)
            if self._ids_copied is not None:
                self._ids_copied.record()
            if gathers:
                into, rows_of_last = to_device(list(zip(*gathers)), torch.int64, self.device)
                input_ids[into] = self._last_sampled[0][rows_of_last]
            if self.compiled:  # see the module docstring
                compat.mark_unbacked(input_ids, 0)
                compat.mark_unbacked(positions, 0)
            logits = self.model(input_ids, positions)
            if not rows:
                return None
            # a copy, taken before the next call overwrites the logits
            return logits.index_select(0, to_device(rows, torch.int64, self.device))

    # ---- startup ---------------------------------------------------------------------------
    def warm_up(self) -> StartupReport:
        """Compile and capture (compiled levels) with dummy steps; report the cost."""
        report = StartupReport(self.level, self.options["cudagraph_mode"] if self.options else "eager",
                               kv_blocks=self.ctx.num_blocks,
                               kv_gib=sum(c.numel() * c.element_size() for c in self.ctx.kv_caches) / 2**30)
        if not self.compiled:
            return report
        start = time.perf_counter()
        self._forward(*dummy_step(self.ctx, self.ctx.max_num_tokens, mixed=True), rows=[])
        self._sync()
        first_call = time.perf_counter() - start
        self._forward(*dummy_step(self.ctx, self.ctx.max_num_seqs, mixed=False), rows=[])  # eager attention kernels
        self._sync()
        table = [rec for r in self._backend.runners for rec in r.capture_table]
        report.capture_s = sum(rec.warmup_ms + rec.capture_ms for rec in table) / 1e3
        report.compile_s = first_call - report.capture_s
        report.num_graphs = self._backend.graphs
        report.graph_mib = sum(rec.pool_mib for rec in table)
        self.model = self._direct_call()
        return report

    def _direct_call(self) -> Callable:
        """The graph runner called directly, where Dynamo compiled the step into one graph; else the
        Dynamo path, logged."""
        runners = self.graph_runners
        try:
            if len(runners) != 1:
                raise CannotBind(f"Dynamo compiled the step into {len(runners)} graphs")
            return functools.partial(DirectCall(runners[0], ("model", "input_ids", "positions"), fixed=("model",)),
                                     self.eager_model)
        except CannotBind as why:
            log.warning("fullgraph engine: steps go through Dynamo's guards: %s", why)
            return self.model

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class SampledTokens:
    """The tokens a launched step samples, on their way to the host; :meth:`wait` reads them."""

    def __init__(self, samples: list[bool], tokens: torch.Tensor | None) -> None:
        self.samples = samples
        self._host = None if tokens is None else tokens.to("cpu", non_blocking=True)
        self._ready = None
        if tokens is not None and tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def wait(self) -> list[int | None]:
        """Per request of the step: its sampled token, or None where it samples nothing. Blocks
        until the step has run: the one host-device synchronisation of a step."""
        if self._ready is not None:
            self._ready.synchronize()
        values = iter(self._host.tolist() if self._host is not None else ())
        return [next(values) if sample else None for sample in self.samples]


def engine_entry() -> Callable:
    """``entry(model, input_ids, positions) = model(input_ids, positions)``, with a code object no
    other engine shares: Dynamo keeps compiled code, and counts recompiles against its limit, per
    code object, so each engine compiles as if it were the first."""
    def entry(model, input_ids, positions):
        return model(input_ids, positions)

    entry.__code__ = entry.__code__.replace(co_name=f"engine_step_{next(_ENTRIES)}")  # named in Dynamo's logs
    return entry


_ENTRIES = itertools.count()


def dummy_step(ctx: ForwardContext, num_tokens: int,
               mixed: bool) -> tuple[list[int], list[int], list[list[int]], list[int]]:
    """A step of >= 2 tokens over dummy requests that all write the scratch block.

    ``mixed``: requests of up to ``max_model_len`` tokens (prefills); else one token each.
    Duplicate slots are fine: nothing real reads the scratch block.
    """
    num_tokens = min(num_tokens, ctx.max_num_tokens)
    if mixed:
        num_reqs = min(ctx.max_num_seqs, max(2, math.ceil(num_tokens / ctx.max_model_len)))
        total = min(num_tokens, num_reqs * ctx.max_model_len)
        query_lens = [total // num_reqs + (i < total % num_reqs) for i in range(num_reqs)]
    else:
        query_lens = [1] * max(2, min(ctx.max_num_seqs, num_tokens))
    tables = [[SCRATCH_BLOCK] * math.ceil(q / ctx.block_size) for q in query_lens]
    return query_lens, list(query_lens), tables, [0] * sum(query_lens)


def make_context(model: Decoder, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 block_size: int, num_blocks: int, attention_impl: str) -> ForwardContext:
    """The forward context of an engine: one more request and at least two tokens than the limits,
    room for the warm-up's dummy steps of at least two requests."""
    param = next(model.parameters())
    return model.config.forward_context(
        dtype=param.dtype, device=param.device, max_num_seqs=max_num_seqs + 1,
        max_num_tokens=max(max_num_batched_tokens, 2), max_model_len=max_model_len, block_size=block_size,
        num_blocks=num_blocks, attention_impl=attention_impl)


def profile_activation_bytes(model: Decoder, **limits) -> int:
    """Peak memory of one eager step at the token budget, on a throwaway cache of the reserved
    blocks (CUDA; 0 elsewhere). ``limits``: :func:`make_context`'s arguments but ``num_blocks``."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 0
    ctx = make_context(model, num_blocks=NUM_RESERVED_BLOCKS, **limits)
    query_lens, seq_lens, tables, ids = dummy_step(ctx, ctx.max_num_tokens, mixed=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare(query_lens, seq_lens, tables)
        logits = model(torch.tensor(ids, device=device), positions)
        logits[-len(query_lens):].float().softmax(-1)  # what sampling adds
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del ctx, logits, positions
    torch.cuda.empty_cache()
    return peak


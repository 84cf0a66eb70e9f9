"""Runs one scheduled step: metadata into the forward context, the model (eager or compiled), sampling.

The runner owns the :class:`~fullgraph_backend.ForwardContext` (paged KV cache and static
metadata) and the model, compiled with ``backend="fullgraph"`` per the optimization level. Two
rules of the compiled model shape it:

- The token inputs are marked *unbacked* (:func:`fullgraph_backend.compat.mark_unbacked`), not
  merely dynamic: Dynamo specialises a backed size of 1, so a one-token step would compile a
  second graph (or need a dummy request beside it, which also kept one-row linears off the
  GEMV). With an unbacked size, one graph serves every step, one token included.
- Outputs of a compiled call are overwritten by the next call: the rows to sample are indexed
  out (a copy) and sampled before the next step. The model computes logits only where a request
  ends (``request_ends=True``: row ``i`` is request ``i``'s last token), not for every token.
- Compile once, then call without Dynamo. Dynamo compiles an engine's entry function, whose code
  object is the engine's own (:func:`engine_entry`): Dynamo keeps compiled code per code object,
  so engines do not share its recompile limit (the 9th engine of a process ran uncompiled). After
  warm-up, steps call the graph runner directly (:class:`~fullgraph_backend.direct_call.DirectCall`),
  skipping Dynamo's guards.

:meth:`warm_up` runs a dummy step at the token budget, where compilation and the capture of
every graph key happen, then a dummy uniform-decode step, and reports what startup cost. While the
model compiles, Inductor's compile workers compile the attention kernels' Triton variants the
capture will launch (:mod:`fullgraph_backend.attention.precompile`), so the capture loads them.
"""
from __future__ import annotations

import functools
import gc
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from fullgraph_backend import compat
from fullgraph_backend.attention.registry import resolve_impl
from fullgraph_backend.backend import RecordingBackend
from fullgraph_backend.config import FullgraphConfig
from fullgraph_backend.direct_call import CannotBind, DirectCall
from fullgraph_backend.distributed.layers import rank_cache_config, shard_decoder
from fullgraph_backend.engine import compile_cache
from fullgraph_backend.engine.config import EngineConfig
from fullgraph_backend.engine.host import to_device
from fullgraph_backend.engine.kv_budget import num_kv_blocks
from fullgraph_backend.engine.levels import backend_options
from fullgraph_backend.engine.loader import LoadedModel, load_model
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.sampler import Sampler
from fullgraph_backend.engine.scheduler import ScheduledBatch
from fullgraph_backend.forward_context import ForwardContext, use_forward_context
from fullgraph_backend.kv_cache import NULL_BLOCK
from fullgraph_backend.models import Decoder, DecoderConfig
from fullgraph_backend.pdl import supported as pdl_supported

if TYPE_CHECKING:
    from fullgraph_backend.attention.precompile import Precompile
    from fullgraph_backend.distributed.processes import ParallelGroup

log = logging.getLogger("fullgraph")

SCRATCH_BLOCK = NULL_BLOCK + 1  # written by dummy requests only, never read by a real one
NUM_RESERVED_BLOCKS = SCRATCH_BLOCK + 1
# Most seconds the capture loop waits for attention kernels compiling in worker processes: far
# more than they take (the workers' start and the longest single compile, docs/perf-notes.md,
# section 28), and the JIT compiles whatever is still missing at warm-up anyway, as without them.
PRECOMPILE_WAIT_S = 60.0


@dataclass
class StartupReport:
    """What getting the engine ready cost: ``load_s`` builds the model, profiles activations and
    allocates the KV cache; compile = first-call time minus warmup/capture time."""

    level: int
    cudagraph_mode: str  # "eager" at -O0
    load_s: float = 0.0
    compile_s: float = 0.0
    capture_s: float = 0.0
    num_graphs: int = 0
    graph_mib: float = 0.0  # graph pool growth over all captures (0 on CPU: graphs are emulated)
    kv_blocks: int = 0
    kv_gib: float = 0.0
    # Inductor's on-disk cache for the compile: hit, miss, bypass or unused, and why (compile_cache.py)
    compile_cache: str = "unused"
    compile_cache_why: str = ""
    # attention kernel variants compiled in worker processes before capture (attention/precompile.py)
    precompiled: str = ""

    def __str__(self) -> str:
        cache = f"; compile cache: {self.compile_cache} ({self.compile_cache_why})" if self.compile_cache_why else ""
        kernels = f"; attention kernels precompiled: {self.precompiled}" if self.precompiled else ""
        return (f"-O{self.level} ({self.cudagraph_mode}): load {self.load_s:.1f} s, compile {self.compile_s:.1f} s, "
                f"capture {self.capture_s:.2f} s, {self.num_graphs} graphs, graph memory {self.graph_mib:.0f} MiB, "
                f"KV cache {self.kv_blocks} blocks ({self.kv_gib:.2f} GiB){cache}{kernels}")


@dataclass(frozen=True)
class Step:
    """One step on the host: what :meth:`ModelRunner.run` launches, and what rank 0 of a
    tensor-parallel engine sends the other ranks, which run it too.

    ``input_ids`` holds 0 where a token is still being sampled by the previous launch; ``gathers``
    lists, per such token, (its index in ``input_ids``, its row in that launch's samples).
    ``rows`` are the logits rows sampled (row ``i``: request ``i`` of the step), for ``request_ids``
    with ``params``.
    ``forget``: requests whose sampling state can go (finished since the step before).
    """

    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    input_ids: list[int]
    gathers: list[tuple[int, int]]
    rows: list[int]
    params: list[SamplingParams]
    request_ids: list[int]
    forget: list[int]


class ModelRunner:
    """Owns the forward context and the (compiled) model; ``execute(batch)`` runs one step.

    ``workers``: on rank 0 of a tensor-parallel engine, the other ranks, sent every step
    (:mod:`fullgraph_backend.engine.parallel`); ``cache_config``: the KV cache's shapes where they are
    not ``model.config``'s (a rank holds some of the KV heads).
    """

    def __init__(self, model: Decoder, *, level: int, cudagraph_mode: str | None, compile_options: dict | None,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int,
                 num_blocks: int, attention_impl: str, seed: int, cache_config: DecoderConfig | None = None,
                 workers: ParallelGroup | None = None) -> None:
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.options = backend_options(level, cudagraph_mode, compile_options)
        if self.options is not None:  # decode graphs up to the real request limit, not the context's extra lane
            self.options.setdefault("max_num_seqs", max(max_num_seqs, 2))
        self.level = level
        self.ctx = make_context(model, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len, block_size=block_size, num_blocks=num_blocks,
                                attention_impl=attention_impl, cache_config=cache_config)
        self.workers = workers
        self._forgotten: list[int] = []  # for the workers' samplers, with the next step
        self.eager_model = model
        self._backend = RecordingBackend(self.options) if self.options is not None else None
        self._kernels: Precompile | None = None  # compiling during warm_up's compile
        # the per-step call: compiled through Dynamo until warm_up swaps in a DirectCall
        entry = engine_entry()
        self.model: Callable = functools.partial(torch.compile(entry, backend=self._compile_graph) if self._backend
                                                 else entry, model)
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

    def release_graphs(self) -> None:
        """Drop this engine's captured graphs (a later step would capture again), and what still
        refers to them, now: before its process groups are left (see :meth:`GraphRunner.release`)."""
        for runner in self.graph_runners:
            runner.release()
        gc.collect()

    # ---- one step --------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch) -> "SampledTokens":
        """Launch ``batch`` (the model, then sampling) without waiting for the device.

        A token the previous launch is still sampling (:data:`~fullgraph_backend.engine.sequence.PENDING`)
        is fed from that launch's device tensor, so the host never waits between steps. With
        ``workers``, every rank runs the step: it is sent to them first.
        """
        step = self.plan(batch)
        if self.workers is None:
            return SampledTokens(batch.samples, self.run(step))
        with self.workers.lockstep():  # an error between sending and finishing shuts the workers down
            self.workers.send(step)
            tokens = self.run(step)
        return SampledTokens(batch.samples, tokens, watch=self.workers.check)

    def plan(self, batch: ScheduledBatch) -> Step:
        """``batch`` as a :class:`Step`: host work only, nothing launched."""
        query_lens = list(batch.num_new)
        ids, gathers = self._input_ids(batch)
        rows = [i for i, sample in enumerate(batch.samples) if sample]
        picked = [s for s, sample in zip(batch.seqs, batch.samples) if sample]
        forget, self._forgotten = self._forgotten, []
        return Step(query_lens, [s.num_computed + n for s, n in zip(batch.seqs, batch.num_new)],
                    [s.block_table for s in batch.seqs], ids, gathers, rows, [s.params for s in picked],
                    [s.request_id for s in picked], forget)

    def run(self, step: Step) -> torch.Tensor | None:
        """Launch ``step``: the model, then sampling. Returns the sampled tokens on the device (None
        when no row samples), before the device has computed them."""
        for request_id in step.forget:
            self.sampler.forget(request_id)
        logits = self._forward(step.query_lens, step.seq_lens, step.block_tables, step.input_ids, step.rows,
                               step.gathers)
        tokens = None if logits is None else self.sampler(logits, step.params, step.request_ids)
        self._last_sampled = tokens, {rid: row for row, rid in enumerate(step.request_ids)}
        return tokens

    def forget(self, request_id: int) -> None:
        """Drop a finished request's sampling state (the workers' samplers drop theirs with the next step)."""
        self.sampler.forget(request_id)
        if self.workers is not None:
            self._forgotten.append(request_id)

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
        events = compile_cache.cache_events()
        start = time.perf_counter()
        self._kernels = self._precompile_attention()
        self._forward(*dummy_step(self.ctx, self.ctx.max_num_tokens, mixed=True), rows=[])
        self._sync()
        report.compile_s = time.perf_counter() - start - self._capture_table_s()
        report.compile_cache, report.compile_cache_why = compile_cache.outcome(events, compile_cache.cache_events())
        if self._kernels is not None:
            report.precompiled = self._kernels.wait(PRECOMPILE_WAIT_S)
        # eager attention kernels; and where the budget is beyond the largest capture size (so the step
        # above ran without graphs), the first step within it: it captures every key now, not in a request
        decode = min(self.ctx.max_num_seqs, max((s for r in self.graph_runners for s in r.capture_sizes), default=2))
        self._forward(*dummy_step(self.ctx, decode, mixed=False), rows=[])
        self._sync()
        table = [rec for r in self.graph_runners for rec in r.capture_table]
        report.capture_s = self._capture_table_s()
        report.num_graphs = self._backend.graphs
        report.graph_mib = sum(rec.pool_mib for rec in table)
        self.model = self._direct_call()
        return report

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """The backend Dynamo calls: compile; then, before the graph runner's first call captures every
        graph key, wait for the attention kernels compiling in worker processes, so that the
        capture's warm-ups load them from Triton's cache instead of compiling them."""
        runner = self._backend(gm, example_inputs)
        if self._kernels is not None:
            self._kernels.wait(PRECOMPILE_WAIT_S)
        return runner

    def _precompile_attention(self) -> Precompile | None:
        """Start compiling the Triton attention kernels the capture loop will launch, in Inductor's
        compile workers, while the model compiles (:mod:`fullgraph_backend.attention.precompile`).
        None where the capture launches none (CPU, no CUDA graphs, another implementation) or they
        could not be listed or started (logged; the JIT compiles them at warm-up, as without this)."""
        config = FullgraphConfig.from_options(self.options)
        if self.device.type != "cuda" or config.cudagraph_mode == "none":
            return None
        try:
            impl = config.attention_impl if config.attention_impl != "auto" else self.ctx.attention_impl
            if resolve_impl(impl, self.device).name != "triton":
                return None
            from fullgraph_backend.attention import precompile  # Triton's kernels: imported where they run

            keys = precompile.graph_keys(config.capture_sizes, self.ctx.max_num_tokens,
                                         config.max_num_seqs or self.ctx.max_num_seqs)
            launches = precompile.graph_launches(keys, attention_calls(self.eager_model), self.ctx.kv_caches[0],
                                                 self.ctx.metadata, pdl=config.pdl and pdl_supported(self.device))
            variants = precompile.variants(launches, compat.triton_target(self.device))
            return precompile.start(variants, compat.inductor_compile_pool)
        except Exception as why:  # never worse than not precompiling
            log.warning("fullgraph engine: attention kernels not precompiled, the JIT compiles them at warm-up: %s: %s",
                        type(why).__name__, why)
            return None

    def _capture_table_s(self) -> float:
        """Seconds of warm-up and capture runs so far."""
        return sum(rec.warmup_ms + rec.capture_ms for r in self.graph_runners for rec in r.capture_table) / 1e3

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
    """The tokens a launched step samples, on their way to the host; :meth:`wait` reads them.

    ``watch``, if given, is called while waiting for the device and may raise (rank 0 of a
    tensor-parallel engine checks that its workers live: a replay waiting in a collective for a
    dead rank would never end).
    """

    def __init__(self, samples: list[bool], tokens: torch.Tensor | None,
                 watch: Callable[[], None] | None = None) -> None:
        self.samples, self._watch = samples, watch
        self._host = None if tokens is None else tokens.to("cpu", non_blocking=True)
        self._ready = None
        if tokens is not None and tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def wait(self) -> list[int | None]:
        """Per request of the step: its sampled token, or None where it samples nothing. Blocks
        until the step has run: the one host-device synchronisation of a step."""
        if self._ready is not None and self._watch is None:
            self._ready.synchronize()
        while self._ready is not None and self._watch is not None and not self._ready.query():
            self._watch()
        values = iter(self._host.tolist() if self._host is not None else ())
        return [next(values) if sample else None for sample in self.samples]


def attention_calls(model: torch.nn.Module) -> set[tuple[int, int]]:
    """``(query heads, sliding window or 0)`` of the model's attention calls on this rank: with the KV
    cache's shapes, what the attention kernels' launches depend on."""
    if isinstance(model, Decoder):
        return {(layer.self_attn.num_heads, layer.self_attn.sliding_window or 0) for layer in model.layers}
    heads = model.model.config.num_attention_heads  # a TransformersDecoder: transformers' own config
    return {(heads, window or 0) for window in model.config.sliding_windows}


def engine_entry() -> Callable:
    """``entry(model, input_ids, positions) = model(input_ids, positions, request_ends=True)``, the
    step compiled steps and eager ones (-O0) call alike, with a code object no other engine shares:
    Dynamo keeps compiled code, and counts recompiles against its limit, per code object, so each
    engine compiles as if it were the first."""
    def entry(model, input_ids, positions):
        return model(input_ids, positions, request_ends=True)

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
                 block_size: int, num_blocks: int, attention_impl: str,
                 cache_config: DecoderConfig | None = None) -> ForwardContext:
    """The forward context of an engine: one more request and at least two tokens than the limits,
    room for the warm-up's dummy steps of at least two requests. Its KV cache has ``cache_config``'s
    shapes (default: the model's)."""
    param = next(model.parameters())
    return (cache_config or model.config).forward_context(
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
        logits = model(torch.tensor(ids, device=device), positions, request_ends=True)
        logits.float().softmax(-1)  # what sampling adds
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del ctx, logits, positions
    torch.cuda.empty_cache()
    return peak


def build_runner(config: EngineConfig, group: ParallelGroup | None = None) -> tuple[LoadedModel, int, ModelRunner]:
    """What each process of an engine builds from ``config``: the model, the KV cache's size and the
    runner; returns them with ``max_model_len``.

    With ``group`` (tensor parallelism, every rank calls this in step): this rank's part of the model
    on its device, a KV cache of its KV heads with as many blocks as the rank with the least room
    has, and a dump folder of its own (``<dump_dir>/rank<r>``). Rank 0's runner sends its steps to
    the others.
    """
    c = config
    tp = group is not None
    device = group.device if tp else c.torch_device
    if device.type == "cuda" and c.optimization_level > 0:  # before any Triton compile: see its docstring
        compat.share_inductor_triton_settings(device)
    if tp and c.all_reduce == "auto" and device.type == "cuda":
        why = group.set_up_one_shot(c.torch_dtype)
        if why:
            log.warning("fullgraph: tensor-parallel all-reduces all go through NCCL: %s", why)
    loaded = load_model(c.model, dtype=c.torch_dtype, device=device, seed=c.seed,
                        model_impl=c.model_impl, shard=functools.partial(shard_decoder, tp=group.tp) if tp else None)
    mc = loaded.model.config
    max_model_len = c.max_model_len or min(2048, mc.max_position_embeddings)
    if max_model_len > mc.max_position_embeddings:
        raise ValueError(f"max_model_len {max_model_len} exceeds {mc.name!r}'s max_position_embeddings "
                         f"{mc.max_position_embeddings}")
    cache = rank_cache_config(mc, group.size) if tp else mc
    limits = dict(max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                  max_model_len=max_model_len, block_size=c.block_size, attention_impl=c.attention_impl,
                  cache_config=cache)
    activations = 0 if c.num_kv_blocks else profile_activation_bytes(loaded.model, **limits)
    device = next(loaded.model.parameters()).device
    blocks = num_kv_blocks(cache, block_size=c.block_size, dtype=c.torch_dtype, device=device,
                           max_num_seqs=c.max_num_seqs, max_model_len=max_model_len, num_reserved=NUM_RESERVED_BLOCKS,
                           override=c.num_kv_blocks, gpu_memory_utilization=c.gpu_memory_utilization,
                           activation_bytes=activations)
    compile_options = c.compile_options
    if tp:
        blocks = group.min(blocks)  # the scheduler hands out block ids every rank's cache must hold
        options = backend_options(c.optimization_level, c.cudagraph_mode, c.compile_options)
        root = options and FullgraphConfig.from_options(options).dump_dir
        if root:  # ranks compile the same graphs: one dump each, not one folder written by all
            compile_options = {**(c.compile_options or {}), "dump_dir": os.path.join(root, f"rank{group.rank}")}
    runner = ModelRunner(loaded.model, level=c.optimization_level, cudagraph_mode=c.cudagraph_mode,
                         compile_options=compile_options, num_blocks=blocks, seed=c.seed,
                         workers=group if tp and group.is_driver else None, **limits)
    if tp:
        group.before_leaving(runner.release_graphs)
    return loaded, max_model_len, runner

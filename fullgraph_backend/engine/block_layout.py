"""Where the engine's KV blocks lie: its scheduler and block manager on a simulated serving run, no model.

Decode attention reads a request's blocks fastest when they run in order (docs/perf-notes.md,
section 15), so how contiguous the engine's block tables are decides which of the attention
benchmark's two placements (blocks scattered, blocks in order) a served model sees.
:func:`simulate` replays a serving workload (Poisson arrivals, fixed prompt and output lengths,
every step taking ``step_ms``) through the engine's own ``Scheduler`` and ``BlockManager`` and, at
every decode step, looks at each running request's block table. A small ``num_kv_blocks`` makes
the free list wrap many times (a long-running server); a smaller one forces preemptions.

Example (CPU, about a second)::

    layout = simulate(Workload(num_prompts=120, num_kv_blocks=100_000))
    layout.boundaries_in_order  # share of block boundaries b -> b + 1 seen by decode steps

``python tools/block_layout.py`` runs it from the command line.
"""
from __future__ import annotations

from dataclasses import dataclass

from fullgraph_backend.engine.bench import _poisson_arrivals
from fullgraph_backend.engine.block_manager import BlockManager
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.scheduler import Scheduler
from fullgraph_backend.engine.sequence import Sequence

WINDOW = 4  # blocks of one 64-key attention tile at block size 16


@dataclass(frozen=True)
class Workload:
    """A simulated serving run: ``num_prompts`` requests of ``input_len`` tokens arriving at ``rate``
    per second, each generating ``output_len``, on ``num_kv_blocks`` blocks, every step ``step_ms``."""

    num_prompts: int = 2000
    rate: float = 10.0
    input_len: int = 1000
    output_len: int = 100
    num_kv_blocks: int = 8192
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    step_ms: float = 2.2
    seed: int = 0


@dataclass(frozen=True)
class BlockLayout:
    """What the decode steps of one run saw, over every running request's block table."""

    decode_steps: int
    boundaries_in_order: float  # share of block boundaries where block b is followed by b + 1
    tiles_one_run: float  # share of WINDOW-block windows (one 64-key tile) that are one ascending run


def simulate(workload: Workload) -> BlockLayout:
    """Run ``workload`` through the engine's scheduler and block manager; the block layout it left."""
    w = workload
    scheduler = Scheduler(BlockManager(w.num_kv_blocks, w.block_size, num_reserved=2), max_num_seqs=w.max_num_seqs,
                          max_num_batched_tokens=w.max_num_batched_tokens, max_model_len=w.input_len + w.output_len)
    params = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
    arrivals = _poisson_arrivals(w.num_prompts, w.rate, w.seed)  # the serving benchmark's arrivals
    now, next_id = 0.0, 0
    boundaries = in_order = windows = whole = decode_steps = 0
    while next_id < w.num_prompts or scheduler.has_unfinished():
        while next_id < w.num_prompts and arrivals[next_id] <= now:
            scheduler.add(Sequence(next_id, [1] * w.input_len, params, arrivals[next_id]))
            next_id += 1
        batch = scheduler.schedule()
        if batch is None:  # idle until the next arrival
            now = arrivals[next_id]
            continue
        if batch.is_decode:
            decode_steps += 1
            for seq in batch.seqs:
                table = seq.block_table
                steps = [b - a == 1 for a, b in zip(table, table[1:])]
                boundaries += len(steps)
                in_order += sum(steps)
                for start in range(0, len(steps) - WINDOW + 2, WINDOW):
                    windows += 1
                    whole += all(steps[start:start + WINDOW - 1])
        scheduler.commit(batch)
        now += w.step_ms / 1e3
        scheduler.update(batch, [0 if s else None for s in batch.samples], now, frozenset())
    return BlockLayout(decode_steps, round(in_order / max(boundaries, 1), 4), round(whole / max(windows, 1), 4))

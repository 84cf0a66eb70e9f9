"""How contiguous are the KV blocks the engine hands out? The scheduler and block manager, no model.

Replays a serving workload (Poisson arrivals, fixed prompt and output lengths, every step taking
``--step-ms``) through the engine's own ``Scheduler`` and ``BlockManager`` and, at every decode
step, looks at each running request's block table: the share of its 16-token-block boundaries
that run in order (block ``b`` followed by ``b + 1``) and the share of its 4-block windows (a
64-key attention tile) that are one ascending run. The attention benchmark times both extremes
(blocks scattered at random, blocks in order); this says where the engine sits between them.
A small ``--num-kv-blocks`` makes the free list wrap many times (a long-running server), a
smaller one forces preemptions.

Usage (CPU): python tools/block_layout.py [--num-prompts 2000] [--rate 10] [--num-kv-blocks 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.engine.bench import _poisson_arrivals  # noqa: E402
from fullgraph_backend.engine.block_manager import BlockManager  # noqa: E402
from fullgraph_backend.engine.params import SamplingParams  # noqa: E402
from fullgraph_backend.engine.scheduler import Scheduler  # noqa: E402
from fullgraph_backend.engine.sequence import Sequence  # noqa: E402

WINDOW = 4  # blocks of one 64-key tile at block size 16


def simulate(num_prompts: int, rate: float, input_len: int, output_len: int, num_kv_blocks: int, block_size: int,
             max_num_seqs: int, max_num_batched_tokens: int, step_ms: float, seed: int = 0) -> dict:
    """Block-table contiguity seen by the decode steps of one simulated serving run."""
    scheduler = Scheduler(BlockManager(num_kv_blocks, block_size, num_reserved=2), max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, max_model_len=input_len + output_len)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    arrivals = _poisson_arrivals(num_prompts, rate, seed)  # the serving benchmark's arrivals
    now, next_id = 0.0, 0
    boundaries = in_order = windows = whole = decode_steps = 0
    while next_id < num_prompts or scheduler.has_unfinished():
        while next_id < num_prompts and arrivals[next_id] <= now:
            scheduler.add(Sequence(next_id, [1] * input_len, params, arrivals[next_id]))
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
        now += step_ms / 1e3
        scheduler.update(batch, [0 if s else None for s in batch.samples], now, frozenset())
    return dict(decode_steps=decode_steps, boundaries_in_order=round(in_order / max(boundaries, 1), 4),
                tiles_one_run=round(whole / max(windows, 1), 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--num-kv-blocks", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--step-ms", type=float, default=2.2, help="simulated time of every step")
    args = parser.parse_args()
    result = simulate(args.num_prompts, args.rate, args.input_len, args.output_len, args.num_kv_blocks,
                      args.block_size, args.max_num_seqs, args.max_num_batched_tokens, args.step_ms)
    print(json.dumps({**vars(args), **result}))


if __name__ == "__main__":
    main()

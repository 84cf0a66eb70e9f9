"""Tensor-parallel decode: TPOT of one GPU against two, at -O4 and -O2, and the collectives' time per step.

Llama-3.1-8B shapes (random bf16 weights) decode greedily from ``--prompt-len`` random tokens at
each batch of ``--batches``. TPOT is ``bench_transformers.engine_tpot_rows``'s: two ``generate`` calls of
``--tokens`` and ``2 * --tokens`` new tokens, their difference over ``--tokens`` (prefill cancels
out), median of ``--repeats``. Each (level, tensor-parallel size) is one engine, built, timed and
deleted before the next: a process holds one tensor-parallel engine, and each engine sizes its KV
cache from the memory the last one freed.

The collectives of one decode step, timed alone: on the two GPUs, in two processes (NCCL), the
step's ``2 * layers + 1`` all-reduces of ``[batch, hidden]`` and the LM head's all-gather of
``[batch, vocab / 2]``, through the model's own functions (``fullgraph_backend.distributed.layers``),
captured in one CUDA graph as in the engine's step, median of single replays. It is the part of
TP=2's TPOT that one GPU does not pay; the weights' part halves.

The floor: the weights one GPU reads per step (all but the embedding table; half of them at TP=2)
over the measured copy bandwidth (``bench_decode.copy_bandwidth``).

Usage (2 GPUs): python tools/bench_tp.py --out docs/results [--batches 1,16] [--levels 4,2] [--sizes 1,2]
Writes OUT/bench_tp.json (after every row, so a failure keeps the rows before it) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_decode import copy_bandwidth  # noqa: E402  (tools/ is on the path when run as a script)
from bench_transformers import engine_tpot_rows  # noqa: E402
from fullgraph_backend.distributed import symmetric  # noqa: E402
from fullgraph_backend.distributed.layers import TensorParallel, all_gather_columns, all_reduce  # noqa: E402
from fullgraph_backend.models import build_model, get_config  # noqa: E402
from graph_timing import capture, replay_us  # noqa: E402
from plot_results import tp_all_reduce  # noqa: E402

MODEL = "llama-3.1-8b"
CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 512)  # the decode batches, and a prefill chunk


def collective_step_us(rank: int, port: int, batches: list[int], iters: int, out: mp.SimpleQueue) -> None:
    """One rank of the collectives' microbenchmark; rank 0 puts {(all-reduce, batch): us per step} on
    ``out``: NCCL's all-reduces, then one shot over symmetric memory (if it sets up)."""
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=device)
    group, c = dist.group.WORLD.group_name, get_config(MODEL)
    times, graphs = {}, []
    ways = {"nccl": TensorParallel(rank, 2, group)}
    if symmetric.set_up(group, device, torch.bfloat16) is None:
        ways["one-shot"] = TensorParallel(rank, 2, group, one_shot=True)
    for way, tp in ways.items():
        for batch in batches:
            hidden = torch.randn(batch, c.hidden_size, dtype=torch.bfloat16, device=device)
            logits = torch.randn(batch, c.vocab_size // 2, dtype=torch.bfloat16, device=device)

            def step():
                for _ in range(2 * c.num_layers + 1):
                    all_reduce(hidden, tp)
                all_gather_columns(logits, 2, group)

            graphs.append(capture(step))
            times[(way, batch)] = replay_us(graphs[-1], iters, "none")
    if rank == 0:
        out.put(times)
    graphs.clear()  # NCCL's destroy waits for the graphs that captured its collectives
    symmetric.release(group)
    dist.destroy_process_group()


def collective_rows(batches: list[int], iters: int) -> list[dict]:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=collective_step_us, args=(rank, port, batches, iters, out)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"the collectives' microbenchmark failed: exit codes {[p.exitcode for p in procs]}")
    return [{"collectives": "step", "all_reduce": way, "tp": 2, "batch": batch, "us": us}
            for (way, batch), us in out.get().items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--levels", default="4,2")
    parser.add_argument("--sizes", default="1,2", help="tensor-parallel sizes")
    parser.add_argument("--all-reduce", default="auto,nccl", help="the engine's all_reduce options, each for TP > 1")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64, help="TPOT from generates of this many and twice as many")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200, help="replays of the collectives' graph")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    os.makedirs(args.out, exist_ok=True)
    meta = build_model(MODEL, dtype=torch.bfloat16, device="meta")
    # what a decode step reads: every weight but the embedding table, of which it reads a row a token
    weights = sum(p.numel() * 2 for name, p in meta.named_parameters() if name != "embed_tokens.weight")
    result = {"kind": "tensor_parallel", "device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "nccl": str(torch.cuda.nccl.version()), "model": MODEL,
              "weights_gb": weights / 1e9, "copy_bandwidth_tbs": copy_bandwidth() / 1e12,
              "prompt_len": args.prompt_len, "tokens": args.tokens, "date": datetime.date.today().isoformat(),
              "command": "python3 tools/bench_tp.py " + " ".join(sys.argv[1:]), "rows": []}

    def record(rows: list[dict]) -> None:
        for row in rows:
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "bench_tp.json"), "w") as f:
            json.dump(result, f, indent=1)

    record(collective_rows(batches, args.iters))
    for level in (int(v) for v in args.levels.split(",")):
        for size in (int(v) for v in args.sizes.split(",")):
            for way in args.all_reduce.split(",") if size > 1 else ["-"]:
                options = {"all_reduce": way} if size > 1 else {}
                key = {"level": level, "tp": size, "all_reduce": way}
                try:
                    rows = engine_tpot_rows(batches, args.prompt_len, args.tokens, args.repeats, model=MODEL,
                                            optimization_level=level, tensor_parallel_size=size,
                                            max_num_seqs=max(batches), compile_options={"capture_sizes": CAPTURE_SIZES},
                                            **options)
                    record([{**key, **row} for row in rows])
                except Exception as error:  # noqa: BLE001 - one engine failing must not lose the others' rows
                    record([{**key, "batch": b, "error": f"{type(error).__name__}: {error}"[:500]} for b in batches])
    print_table(result)


def print_table(result: dict) -> None:
    """The TPOT table: per level and batch, TP=1, TP=2 with each all-reduce, their ratio to TP=1,
    the collectives alone and the floor."""
    rows, bandwidth = result["rows"], result["copy_bandwidth_tbs"] * 1e12
    collectives = {(tp_all_reduce(r), r["batch"]): r["us"] / 1e3 for r in rows if "collectives" in r}
    tpot = {(r["level"], r["tp"], tp_all_reduce(r), r["batch"]): r.get("tpot_ms") for r in rows if "level" in r}
    ways = sorted({way for _, tp, way, _ in tpot if tp > 1})
    print(f"\n{result['device']} x {result['gpus']}, torch {result['torch']}, NCCL {result['nccl']}, {result['model']} "
          f"shapes, bf16, prompt {result['prompt_len']}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; TPOT ms")
    print("| level | batch | TP=1 | " + " | ".join(f"TP=2 {w} | / TP=1 | collectives alone ({w})" for w in ways)
          + " | weights floor TP=1 / TP=2 |")
    print("|---|---|---|" + "---|---|---|" * len(ways) + "---|")
    floor = result["weights_gb"] * 1e9 / bandwidth * 1e3
    for level, batch in sorted({(lv, b) for lv, _, _, b in tpot}, key=lambda key: (-key[0], key[1])):
        one = tpot.get((level, 1, "-", batch))
        cells = []
        for way in ways:
            two = tpot.get((level, 2, way, batch))
            cells += [_ms(two), f"{two / one:.2f}" if one and two else "-", _ms(collectives.get((way, batch)))]
        print(f"| -O{level} | {batch} | {_ms(one)} | " + " | ".join(cells) + f" | {floor:.2f} / {floor / 2:.2f} |")


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "failed"


if __name__ == "__main__":
    main()

"""Where a full-graph decode step spends its time: kernels of one captured graph, and host overhead.

Compiles the reference decoder with ``backend="fullgraph"``, takes one decode step at ``--batch``
with ``--context`` tokens cached, then reports the wall time of a compiled call, of the bare
graph replay and the host time of each, and a torch.profiler table of the replay's kernels.

With PDL (the default on sm_90+) a kernel starts while the one before it drains and waits at its
``griddepcontrol.wait``; the profiler counts that wait in its duration, so the table's kernels sum
to more than the replay (1.76 against 1.33 ms at batch 1 on the H200, perf-notes 38) and a kernel
after an early-triggering one looks slow. For a table whose kernels add up, pass
``--options '{"pdl": false}'``; the replay's wall time is the step's time either way.

Usage (GPU): python tools/profile_decode.py [--batch 1] [--context 1000] [--model qwen2.5-1.5b]
       [--options '{"fuse_norm": true}']
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend import use_forward_context  # noqa: E402
from fullgraph_backend.backend import RecordingBackend  # noqa: E402
from fullgraph_backend.demo import block_tables  # noqa: E402
from fullgraph_backend.models import build_model, get_config  # noqa: E402


def median_ms(fn, sync_each: bool, n: int = 200) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync_each:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return round(statistics.median(times), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed")
    parser.add_argument("--options", default="{}", help="the backend's options as JSON")
    args = parser.parse_args()
    config = get_config(args.model)
    ctx = config.forward_context(dtype=torch.bfloat16, device="cuda", max_num_seqs=args.batch,
                                 max_num_tokens=max(args.batch, 2), max_model_len=args.context + 1)
    for cache in ctx.kv_caches:
        cache.normal_(0, 0.1)
    counter = RecordingBackend(json.loads(args.options))
    compiled = torch.compile(build_model(config, dtype=torch.bfloat16, device="cuda"), backend=counter)
    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([1] * args.batch, [args.context + 1] * args.batch, block_tables(ctx, args.batch))
        ids = torch.randint(0, config.vocab_size, (args.batch,), device="cuda")
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        compiled(ids, positions)
        runner = counter.runners[-1]
        key = runner._key(None if runner.sig.is_static else args.batch, ctx.batch_kind)
        call = runner.pieces[0].recordings[key].call
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
                  "batch": args.batch, "context": args.context, "key": [key[0], key[1].value],
                  "compiled call wall ms": median_ms(lambda: compiled(ids, positions), True),
                  "compiled call host ms": median_ms(lambda: compiled(ids, positions), False),
                  "replay wall ms": median_ms(call.replay, True),
                  "replay host ms": median_ms(call.replay, False)}
        print(json.dumps(report), flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call.replay()
            torch.cuda.synchronize()
    print("kernels of 10 replays:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()

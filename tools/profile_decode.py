"""Where a full-graph decode step spends its time: kernels of one captured graph, and host overhead.

Compiles the reference decoder with ``backend="fullgraph"``, takes one decode step at ``--batch``
with ``--context`` tokens cached, then reports the wall time of a compiled call, of the bare
graph replay and the host time of each, and a torch.profiler table of the replay's kernels.

With PDL (the default on sm_90+) a kernel starts while the one before it drains and waits at its
``griddepcontrol.wait``; the profiler counts that wait in its duration, so the table's kernels sum
to more than the replay (1.76 against 1.33 ms at batch 1 on the H200, perf-notes 38) and a kernel
after an early-triggering one looks slow. For a table whose kernels add up, pass
``--options '{"pdl": false}'``; the replay's wall time is the step's time either way.

So a second table attributes the step itself: each kernel is charged the time from the end of the
kernel before it to its own end (:func:`critical_path`). Under PDL a kernel's launch and its work
before the wait overlap the kernel before and are not charged; what is charged is what the chain
waited for. The charges of one replay add up to its span on the GPU. A third table lists the
kernels of ``--window`` (positions in the replay) one by one: one layer's projections apart.

Usage (GPU): python tools/profile_decode.py [--batch 1] [--context 1000] [--model qwen2.5-1.5b]
       [--options '{"fuse_norm": true}'] [--cublas o_proj] [--window 100:120] [--out profile.json]
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

from fullgraph_backend import gemv, use_forward_context  # noqa: E402
from fullgraph_backend.backend import RecordingBackend  # noqa: E402
from fullgraph_backend.demo import block_tables  # noqa: E402
from fullgraph_backend.models import build_model, get_config  # noqa: E402
from bench_gemv import SHAPES, model_shapes, sparing  # noqa: E402  (tools/, the script's own folder)


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


def _charges(kernels: list[tuple[str, float, float]], replays: int) -> list[tuple[int, str, float, float, float]]:
    """(position in its replay, name, duration, charge, gap) of every kernel of ``replays`` replays
    of one graph. A replay's kernels run as one dependent chain, so sorted by end each kernel's charge
    is its end minus the end of the kernel before it (a replay's first: its duration), and its gap the
    part of that before it started (a launch gap; 0 under PDL once it launched early)."""
    ordered = sorted(kernels, key=lambda kernel: kernel[2])
    if not ordered or len(ordered) % replays:
        raise ValueError(f"{len(ordered)} kernels do not split into {replays} replays of one graph")
    per_replay = len(ordered) // replays
    out = []
    for index, (name, start, end) in enumerate(ordered):
        before = ordered[index - 1][2] if index % per_replay else start
        out.append((index % per_replay, name, end - start, end - before, max(0.0, start - before)))
    return out


def _summed(charges, key, replays: int) -> list[dict]:
    """The charges grouped by ``key`` (of a charge tuple), in first-seen order, each summed field a
    replay's worth: name, calls, ``us`` (duration, waits included), ``critical_us``, ``gap_us``."""
    rows: dict = {}
    for charge in charges:
        _, name, duration, critical, gap = charge
        row = rows.setdefault(key(charge), {"name": name, "calls": 0, "us": 0.0, "critical_us": 0.0, "gap_us": 0.0})
        row["calls"] += 1
        row["us"] += duration
        row["critical_us"] += critical
        row["gap_us"] += gap
    for row in rows.values():
        for field in ("calls", "us", "critical_us", "gap_us"):
            row[field] = round(row[field] / replays, 3)
    return list(rows.values())


def critical_path(kernels: list[tuple[str, float, float]], replays: int) -> list[dict]:
    """Per kernel name, what a replay of one graph spent on it, averaged over ``replays`` replays:
    ``kernels`` are (name, start, end) in us, charged as :func:`_charges` says; largest charge first."""
    rows = _summed(_charges(kernels, replays), lambda charge: charge[1], replays)
    return sorted(rows, key=lambda row: -row["critical_us"])


def kernel_sequence(kernels: list[tuple[str, float, float]], replays: int) -> list[dict]:
    """A replay's kernels in order, each averaged over the ``replays`` (which run the same graph):
    what one layer's kernels cost, one by one."""
    return _summed(_charges(kernels, replays), lambda charge: charge[0], replays)


def device_kernels(prof) -> list[tuple[str, float, float]]:
    """(name, start, end) in us of every GPU kernel a torch.profiler run recorded."""
    return [(event.name, event.time_range.start, event.time_range.end) for event in prof.events()
            if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.end > event.time_range.start
            and not event.name.startswith(("Memcpy", "Memset"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed")
    parser.add_argument("--options", default="{}", help="the backend's options as JSON")
    parser.add_argument("--window", default="40:60", help="positions A:B of a replay's kernels listed one by one")
    parser.add_argument("--out", help="also write the report and the critical-path rows to this JSON file")
    parser.add_argument("--cublas", default="", help=f"projections ({', '.join(SHAPES)}; comma-separated) whose "
                        "2-16-row linears stay on cuBLAS, as tools/bench_decode.py's +cublas_OP modes")
    args = parser.parse_args()
    config = get_config(args.model)
    on_cublas = [op for op in args.cublas.split(",") if op]
    if set(on_cublas) - set(SHAPES):
        parser.error(f"--cublas: unknown projection(s) {sorted(set(on_cublas) - set(SHAPES))}; known: {list(SHAPES)}")
    shapes = model_shapes(config)
    gemv.uses_few_rows = sparing(gemv.uses_few_rows, {shapes[op][:2] for op in on_cublas})
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
                  "batch": args.batch, "cublas": on_cublas, "context": args.context,
                  "key": [key[0], key[1].value],
                  "compiled call wall ms": median_ms(lambda: compiled(ids, positions), True),
                  "compiled call host ms": median_ms(lambda: compiled(ids, positions), False),
                  "replay wall ms": median_ms(call.replay, True),
                  "replay host ms": median_ms(call.replay, False)}
        print(json.dumps(report), flush=True)
        replays = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                call.replay()
                torch.cuda.synchronize()  # so no replay's kernels overlap the next one's
    print(f"kernels of {replays} replays:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    kernels = device_kernels(prof)
    rows = critical_path(kernels, replays)
    sequence = kernel_sequence(kernels, replays)
    print("a replay's critical path (us): charge = end minus the end of the kernel before; gap = before its start")
    print(f"{'kernel':<64} {'calls':>6} {'duration':>9} {'charge':>9} {'gap':>7}")
    for row in rows[:args.rows]:
        print(f"{row['name'][:64]:<64} {row['calls']:>6g} {row['us']:>9.1f} {row['critical_us']:>9.1f} {row['gap_us']:>7.1f}")
    print(f"{'total':<64} {sum(r['calls'] for r in rows):>6g} {sum(r['us'] for r in rows):>9.1f} "
          f"{sum(r['critical_us'] for r in rows):>9.1f} {sum(r['gap_us'] for r in rows):>7.1f}")
    first, last = (int(bound) for bound in args.window.split(":"))
    print(f"kernels {first}-{last - 1} of a replay, one by one (us): duration, charge")
    for index in range(first, min(last, len(sequence))):
        row = sequence[index]
        print(f"{index:>4} {row['name'][:64]:<64} {row['us']:>8.2f} {row['critical_us']:>8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**report, "critical_path": rows, "sequence": sequence}, f, indent=1)


if __name__ == "__main__":
    main()

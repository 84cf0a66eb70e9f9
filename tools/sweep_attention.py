"""Sweep the triton split-KV decode kernel's launch parameters in one GPU run (< 4 minutes on an H100).

What it is for: the data behind ``triton_paged.launch_plan``'s choices (tile, warps, stages,
segments per shape), and the way to pick them for a device or shape not measured yet (the
current plans come from H100 runs: docs/perf-notes.md, sections 4, 6 and 13).

Shapes (bf16, head dim 128 or ``--head-dim``, paged cache with 16-token blocks, shuffled block tables,
q/k/v strided views of one fused QKV output as models pass them):
  32 q / 8 kv heads, context 4096 (graph bound 4096), batch 1 / 8 / 64;
  12 q / 2 kv heads (Qwen2.5-1.5B), context 1000 (graph bound 1001, as tools/bench_decode.py), batch 1 / 16 / 64;
  32 q / 8 kv heads, context 576 (bound 577), batch 1 / 16 / 64: Llama-3.2-1B with ``--head-dim 64``.
Per shape: the default config; stage 1, BLOCK_N x num_warps x num_stages at the default segment
count; stage 2, the segment counts (1 = no partials, no merge) with stage 1's best tiles; stage 3,
where the default gathers its tiles, smaller gathered tiles with as many more segments (one tile a
segment still) and, on a Hopper GPU, whole-block TMA tiles (the narrow plan's) at the default
segment count and twice it; plus the unified kernel (what mixed graphs run) for reference. Every
variant is checked once against the reference op (max abs error, and that the step's K/V landed in
their slots), then timed as the median of CUDA-graph replays (tools/graph_timing.py) after a 256 MiB
memset, after a 256 MiB read (clean cold L2) and back to back. Times include the fused K/V store.

Usage (GPU): python tools/sweep_attention.py [--out sweep_attention.json] [--iters 50] [--budget-s 200] [--jobs 8]
             [--shape 12q/2kv] [--batches 16,64]
             python tools/sweep_attention.py --smoke   # CPU (TRITON_INTERPRET=1): tiny shapes, no timing
Variants are first compiled into Triton's disk cache by --jobs spawned processes (compile time
dominates the run); variants past --budget-s of wall time are skipped (and counted), so the run
always finishes.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.attention import triton_paged  # noqa: E402
from fullgraph_backend.attention.reference import reference_attention  # noqa: E402
from fullgraph_backend.attention.triton_paged import launch_plan, paged_attention  # noqa: E402
from graph_timing import capture, replay_us  # noqa: E402  (tools/ is on the path when run as a script)
from fullgraph_backend.forward_context import ForwardContext  # noqa: E402
from fullgraph_backend.kv_cache import NULL_BLOCK  # noqa: E402

BLOCK_SIZE, DTYPE = 16, torch.bfloat16
# (label, q heads, kv heads, context, max_model_len, batches)
SHAPES = [("32q/8kv ctx4096", 32, 8, 4096, 4096, (1, 8, 64)),
          ("12q/2kv ctx1000", 12, 2, 1000, 1001, (1, 16, 64)),
          ("32q/8kv ctx576", 32, 8, 576, 577, (1, 16, 64))]  # Llama-3.2-1B (--head-dim 64), engine bench context
TILES = dict(BLOCK_N=(32, 64, 128), num_warps=(2, 4, 8), num_stages=(2, 3, 4))
SEGMENTS = (1, 2, 4, 8, 16, 32)
PAGE_WARPS, PAGE_STAGES = (2, 4), (3, 5)
SMALL_TILES = (32, 64)
SMOKE_SHAPES = [("4q/2kv ctx100", 4, 2, 100, 128, (1, 3))]
SMOKE_TILES = dict(BLOCK_N=(16, 32), num_warps=(4,), num_stages=(2,))
SMOKE_SEGMENTS = (1, 4)


class Shape:
    """One decode batch on the paged layout: metadata, a random cache, q/k/v of a fused projection."""

    def __init__(self, q_heads, kv_heads, context, max_len, batch, head_dim, device, seed=0, reference=True):
        self.q_heads, self.kv_heads, self.context, self.batch = q_heads, kv_heads, context, batch
        self.ctx = ForwardContext(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPE, device=device,
                                  max_num_seqs=batch, max_num_tokens=batch, max_model_len=max_len,
                                  block_size=BLOCK_SIZE, attention_impl="reference")
        self.cache = self.ctx.kv_caches[0]
        self.cache.normal_()
        free = list(range(NULL_BLOCK + 1, self.ctx.num_blocks))
        random.Random(seed).shuffle(free)
        tables = [[free.pop() for _ in range(-(-context // BLOCK_SIZE))] for _ in range(batch)]
        self.ctx.prepare([1] * batch, [context] * batch, tables)
        qkv = torch.randn(batch, (q_heads + 2 * kv_heads) * head_dim, device=device, dtype=DTYPE)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        self.q, self.k, self.v = (t.view(batch, -1, head_dim) for t in (q, k, v))
        m = self.ctx.metadata
        self.slots = m.slot_mapping[:batch].clone()
        self.args = (self.q, self.k, self.v, self.cache, m.query_start_loc, m.seq_lens, m.block_table,
                     m.slot_mapping, head_dim ** -0.5, 0)
        if reference:
            ref_cache = self.cache.clone()
            self.expected = reference_attention(self.q, self.k, self.v, ref_cache, *self.args[4:]).float()
            del ref_cache
        self.kv_bytes = 2 * batch * context * kv_heads * head_dim * torch.finfo(DTYPE).bits // 8

    def plan(self, config, split_kv=True):
        m = self.ctx.metadata
        return launch_plan(self.q, self.kv_heads, m.block_table, BLOCK_SIZE, m.seq_lens.shape[0], split_kv=split_kv,
                           _config=config)

    def check(self, fn) -> tuple[float, bool]:
        """Max abs error against the reference, and whether the step's K/V landed in their slots."""
        flat = self.cache.flatten(1, 2)
        flat[:, self.slots] = 0  # a variant that stored nothing would leave zeros
        out = fn()
        error = (out.float() - self.expected).abs().max().item()
        stored = torch.equal(flat[0, self.slots], self.k) and torch.equal(flat[1, self.slots], self.v)
        return error, stored


def time_graph(fn, iters: int) -> dict[str, float]:
    """Median microseconds of one CUDA-graph replay of ``fn()`` in three L2 states (graph_timing's
    flushes): ``us`` after a memset, as the issue's first targets were measured; ``us_clean_flush``
    after a read, closer to a model step; ``us_no_flush`` back to back."""
    graph = capture(fn)
    return {key: round(replay_us(graph, iters, flush), 2)
            for key, flush in (("us", "write"), ("us_clean_flush", "read"), ("us_no_flush", "none"))}


def config_name(config: dict | None) -> str:
    if not config:
        return "default"
    return " ".join(f"{k}={v}" for k, v in config.items())


def default_segments(q_heads: int, kv_heads: int, max_len: int, batch: int, device: str, head_dim: int) -> int:
    """The segment count paged_attention picks for a decode graph of ``batch`` (the shape-only rule)."""
    q = torch.empty(batch, q_heads, head_dim, dtype=DTYPE, device=device)
    table = torch.empty(batch, -(-max_len // BLOCK_SIZE), dtype=torch.int32, device=device)
    return launch_plan(q, kv_heads, table, BLOCK_SIZE, batch, split_kv=True)["segments"]


def _warm(job: tuple[str, int, list[tuple]]) -> int:
    """Worker (a spawned process): compile ``(q_heads, kv_heads, max_len, config)`` variants into Triton's
    on-disk cache by running each once on a one-token batch (same strides and specialisations as the
    sweep's shapes: the batch size is not part of any kernel's cache key). Returns how many ran."""
    device, head_dim, tasks = job
    done = 0
    for q_heads, kv_heads, max_len, config in tasks:
        try:
            shape = Shape(q_heads, kv_heads, 16, max_len, 1, head_dim, device, reference=False)
            paged_attention(*shape.args, split_kv=config is not None, _config=config)
            done += 1
        except Exception:  # the main process meets (and records) the same error
            pass
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def precompile(tasks: list[tuple], jobs: int, device: str, head_dim: int) -> str:
    """Compile ``tasks`` in ``jobs`` spawned processes; the sweep then loads them from the disk cache."""
    if jobs <= 0 or not tasks:
        return "off"
    import multiprocessing

    start = time.perf_counter()
    chunks = [tasks[i::jobs] for i in range(jobs)]
    try:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            done = sum(pool.map(_warm, [(device, head_dim, c) for c in chunks if c]))
    except Exception as error:  # fall back to compiling in the sweep itself
        return f"failed ({error!r:.200}); compiling serially"
    return f"{done}/{len(tasks)} variants in {time.perf_counter() - start:.1f} s with {jobs} processes"


class Sweep:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = "cpu" if self.smoke else "cuda"
        self.head_dim = 64 if self.smoke else args.head_dim
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.skipped = 0
        self.precompiled = "off"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run_variant(self, shape: Shape, label: str, stage: str, config: dict | None, split_kv=True) -> dict:
        plan = shape.plan(config, split_kv)
        row = dict(shape=label, batch=shape.batch, stage=stage, config=config_name(config),
                   kernel=plan["kernel"], segments=plan["segments"], BLOCK_N=plan["BLOCK_N"],
                   num_warps=plan["num_warps"], num_stages=plan["num_stages"], page_tiles=plan["page_tiles"])
        if self.elapsed() > self.args.budget_s:
            row["error"] = "skipped: budget"
            self.skipped += 1
            self.rows.append(row)
            return row

        def fn():
            return paged_attention(*shape.args, split_kv=split_kv, _config=config)

        try:
            t0 = time.perf_counter()
            row["max_abs_err"], row["stored"] = shape.check(fn)  # the first call compiles
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            if not self.smoke:
                row.update(time_graph(fn, self.args.iters))
                row["TB/s"] = round(shape.kv_bytes / row["us"] / 1e6, 3)
            row["ok"] = row["max_abs_err"] < 2e-2 and row["stored"]
        except Exception as error:  # e.g. out of shared memory for a large tile: record it and go on
            row["error"] = repr(error)[:300]
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def best(self, rows: list[dict]) -> dict | None:
        good = [r for r in rows if r.get("ok") and "us" in r]
        if self.smoke:
            good = [r for r in rows if r.get("ok")]
            return good[0] if good else None
        return min(good, key=lambda r: r["us"]) if good else None

    def tasks(self, shapes, tiles, segment_grid) -> list[tuple]:
        """``(q_heads, kv_heads, max_len, config)`` of every variant known before timing: the tile grid at
        each shape's default segment count, the segment grid at default tiles, the unified kernel (None)."""
        tasks = set()
        for _, q_heads, kv_heads, _, max_len, batches in shapes:
            for batch in batches:
                segments = default_segments(q_heads, kv_heads, max_len, batch, self.device, self.head_dim)
                for values in itertools.product(*tiles.values()):
                    tasks.add((q_heads, kv_heads, max_len, (*zip(tiles, values), ("segments", segments))))
            for segments in segment_grid:
                tasks.add((q_heads, kv_heads, max_len, (("segments", segments),)))
            tasks.add((q_heads, kv_heads, max_len, None))
        return [(qh, kvh, ml, None if c is None else dict(c)) for qh, kvh, ml, c in sorted(tasks, key=str)]

    def run(self):
        shapes = SMOKE_SHAPES if self.smoke else [
            (label, q_heads, kv_heads, context, max_len,
             tuple(b for b in batches if not self.args.batches or str(b) in self.args.batches.split(",")))
            for label, q_heads, kv_heads, context, max_len, batches in SHAPES if self.args.shape in label]
        tiles = SMOKE_TILES if self.smoke else TILES
        segment_grid = SMOKE_SEGMENTS if self.smoke else SEGMENTS
        summary = []
        self.precompiled = precompile(self.tasks(shapes, tiles, segment_grid), self.args.jobs, self.device,
                                      self.head_dim)
        print(json.dumps({"precompile": self.precompiled}), flush=True)
        for label, q_heads, kv_heads, context, max_len, batches in shapes:
            for batch in batches:
                shape = Shape(q_heads, kv_heads, context, max_len, batch, self.head_dim, self.device)
                default = self.run_variant(shape, label, "default", None)
                # stage 1: tiles at the default segment count
                stage1 = [default]
                for block_n, warps, stages in itertools.product(*tiles.values()):
                    config = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    if default["page_tiles"] and block_n != BLOCK_SIZE:  # a page tile is one cache block
                        config["page_tiles"] = False
                    stage1.append(self.run_variant(shape, label, "tiles", config))
                best_tiles = self.best(stage1)
                tile_config = {} if best_tiles is None or best_tiles is default else \
                    dict(BLOCK_N=best_tiles["BLOCK_N"], num_warps=best_tiles["num_warps"],
                         num_stages=best_tiles["num_stages"], page_tiles=best_tiles["page_tiles"])
                # stage 2: segment counts with the best tiles (the default count is stage 1's)
                stage2 = [best_tiles] if best_tiles else []
                for segments in segment_grid:
                    if segments == default["segments"]:
                        continue
                    stage2.append(self.run_variant(shape, label, "segments", dict(tile_config, segments=segments)))
                # stage 3, where the default gathers its tiles: smaller gathered tiles with as many more
                # segments, so each segment is still one tile; and whole-block TMA tiles as the narrow
                # plan reads them (Hopper only), at the default segment count and twice it
                stage3 = []
                if not default["page_tiles"]:
                    for block_n, warps in itertools.product(SMALL_TILES, (2, 4)):
                        segments = default["segments"] * default["BLOCK_N"] // block_n
                        if block_n < default["BLOCK_N"] and segments <= triton_paged.MAX_SEGMENTS:
                            config = dict(BLOCK_N=block_n, num_warps=warps, segments=segments)
                            stage3.append(self.run_variant(shape, label, "one-tile segments", config))
                if not default["page_tiles"] and not self.smoke and triton_paged._has_tma(shape.q.device):
                    for warps, stages, segments in itertools.product(PAGE_WARPS, PAGE_STAGES, (1, 2)):
                        config = dict(BLOCK_N=BLOCK_SIZE, num_warps=warps, num_stages=stages, page_tiles=True,
                                      segments=min(triton_paged.MAX_SEGMENTS, default["segments"] * segments))
                        stage3.append(self.run_variant(shape, label, "page tiles", config))
                self.run_variant(shape, label, "unified (mixed graphs)", None, split_kv=False)
                best = self.best([r for r in stage1 + stage2 + stage3 if r])
                summary.append(dict(shape=label, batch=batch, default=default, best=best))
                del shape
                if not self.smoke:
                    torch.cuda.empty_cache()
        return summary


def times(row: dict) -> str:
    if "us" not in row:
        return ""
    return f"{row['us']} / {row['us_clean_flush']} / {row['us_no_flush']}"


def print_report(header: dict, rows: list[dict], summary: list[dict], skipped: int) -> None:
    print()
    for key, value in header.items():
        print(f"{key}: {value}")
    print("\n| shape | batch | stage | config | kernel | seg | us (memset flush) | us (clean flush) | us (no flush) "
          "| TB/s | max abs err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = r.get("error")
        cells = [r["shape"], r["batch"], r["stage"], r["config"], r["kernel"], r["segments"],
                 r.get("us", err or ""), r.get("us_clean_flush", ""), r.get("us_no_flush", ""), r.get("TB/s", ""),
                 "" if err else f"{r['max_abs_err']:.1e}{'' if r['stored'] else ' NOT STORED'}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\nBest per shape by memset-flushed time (default = the shape-only rule in triton_paged):")
    print("| shape | batch | default | default us (memset / clean / none) | best config | best us (memset / clean / "
          "none) | TB/s | _config |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        d, b = s["default"], s["best"]
        if b is None:
            print(f"| {s['shape']} | {s['batch']} | - | - | no valid variant | | | | |")
            continue
        cfg = {k: b[k] for k in ("BLOCK_N", "num_warps", "num_stages", "segments") if b[k] is not None}
        print(f"| {s['shape']} | {s['batch']} | seg={d['segments']} BLOCK_N={d['BLOCK_N']} w={d['num_warps']} "
              f"s={d['num_stages']} | {times(d) or d.get('error', '')} | {b['kernel']}, {b['config']} | "
              f"{times(b)} | {b.get('TB/s', '')} | `{json.dumps(cfg)}` |")
    bad = [r for r in rows if "error" not in r and not r.get("ok")]
    errors = [r for r in rows if "error" in r and r["error"] != "skipped: budget"]
    print(f"\n{len(rows)} variants, {len(bad)} wrong, {len(errors)} failed to run, {skipped} skipped for the budget.")
    for r in bad:
        print(f"WRONG: {r['shape']} batch {r['batch']} {r['config']}: max abs err {r['max_abs_err']:.2e}, "
              f"stored {r['stored']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="sweep_attention.json", help="JSON results file")
    parser.add_argument("--iters", type=int, default=50, help="replays timed per variant and flush mode")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip variants after this much wall time")
    parser.add_argument("--jobs", type=int, default=8, help="processes compiling variants up front (0: none)")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, no timing")
    parser.add_argument("--shape", default="", help="only shapes whose label holds this text (e.g. 12q/2kv)")
    parser.add_argument("--batches", default="", help="only these batches of each shape (e.g. 16,64)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim of every shape (Llama-3.2-1B: 64)")
    args = parser.parse_args()
    torch.manual_seed(0)
    import triton

    header = {
        "device": "cpu (interpreter smoke run)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "timing": f"median of {args.iters} CUDA-graph replays each: after a 256 MiB memset (us), after a 256 MiB "
                  f"read (us_clean_flush), back to back (us_no_flush)",
        "defaults": f"MIN_SEGMENT_TOKENS={triton_paged.MIN_SEGMENT_TOKENS}, PROGRAMS_PER_SM="
                    f"{triton_paged.PROGRAMS_PER_SM}, NARROW_PROGRAMS_PER_SM={triton_paged.NARROW_PROGRAMS_PER_SM}, "
                    f"MAX_SEGMENTS={triton_paged.MAX_SEGMENTS}",
    }
    print(json.dumps(header), flush=True)
    sweep = Sweep(args)
    summary = sweep.run()
    header["wall_s"] = round(sweep.elapsed(), 1)
    header["precompile"] = sweep.precompiled
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**header, "rows": sweep.rows,
                   "best": [dict(shape=s["shape"], batch=s["batch"], best=s["best"]) for s in summary]}, f, indent=1)
    print_report(header, sweep.rows, summary, sweep.skipped)


if __name__ == "__main__":
    main()

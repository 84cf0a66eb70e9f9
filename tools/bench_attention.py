"""Attention kernel benchmark: decode, prefill and a mixed batch, each timed as CUDA-graph replays.

Shapes: 32 query heads, 8 KV heads, head dim 128, bf16, paged cache with 16-token blocks (shuffled
block tables). Modes, side by side in one process:
  decode (context 4096, batch 1/8/64): triton unified, triton split-KV (also on block tables whose
      blocks run in order, which separates the kernel from the layout), the reference op, PyTorch's
      bundled FlashAttention-2 (``aten._flash_attention_forward`` with ``seqused_k`` over a dense
      per-request cache) and FlexAttention (dense cache, static block mask, compiled);
  prefill (one request of 2048 / 8192 tokens): triton vs bundled FA2;
  mixed (64 decode rows at context 4096 + one 2048-token prefill): triton store + unified (two launches);
  launch: a graph of one one-element add, the cost of a replay that every row carries.
Times are medians over single replays, each after an L2 flush: by default a 256 MiB read (cold,
clean L2, as in a model, where the weight reads before attention evict the cache) and, for
comparison, a 256 MiB memset (cold, dirty L2); ``--flush`` picks. Effective TB/s counts the K/V
bytes a decode must read. The triton and reference rows include
storing the step's K/V (split-KV decode fuses it and the merge of its segments: one launch; the
unified path stores in its own launch first, two in all); FA2 and Flex only read.

Usage (GPU): python tools/bench_attention.py --out bench_attention.json [--iters 100]
             python tools/bench_attention.py --check   # triton vs reference; exit 1 on mismatch
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.attention.reference import reference_attention  # noqa: E402
from fullgraph_backend.attention.triton_paged import launch_plan, paged_attention  # noqa: E402
from fullgraph_backend.forward_context import ForwardContext  # noqa: E402
from fullgraph_backend.kv_cache import NULL_BLOCK  # noqa: E402
from graph_timing import FLUSHES, capture, replay_us  # noqa: E402  (tools/ is on the path when run as a script)

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM ** -0.5


class Paged:
    """One batch on the paged layout: metadata buffers, a random cache, q/k/v for its tokens."""

    def __init__(self, query_lens: list[int], seq_lens: list[int], seed: int = 0, scatter: bool = True) -> None:
        self.ctx = ForwardContext(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=DTYPE, device="cuda",
                                  max_num_seqs=len(query_lens), max_num_tokens=sum(query_lens),
                                  max_model_len=max(seq_lens), block_size=BLOCK_SIZE, attention_impl="reference")
        self.cache = self.ctx.kv_caches[0]
        self.cache.normal_()
        # scattered (default): any block anywhere, as a free list without a placement policy ends up
        # handing them out; otherwise each request's blocks in one ascending run, as our block
        # manager keeps them where it can and as a dense cache lays them out
        free = list(range(NULL_BLOCK + 1, self.ctx.num_blocks))
        if scatter:
            random.Random(seed).shuffle(free)
        else:
            free.reverse()  # taken from the end, so each request's blocks ascend
        tables = [[free.pop() for _ in range(-(-s // BLOCK_SIZE))] for s in seq_lens]
        self.ctx.prepare(query_lens, seq_lens, tables)
        tokens = sum(query_lens)
        self.q = torch.randn(tokens, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        self.v = torch.randn_like(self.k)

    def args(self, window: int = 0, cache: torch.Tensor | None = None) -> tuple:
        """The attention op's arguments, on ``cache`` (default: the batch's own cache)."""
        m = self.ctx.metadata
        return (self.q, self.k, self.v, self.cache if cache is None else cache, m.query_start_loc, m.seq_lens,
                m.block_table, m.slot_mapping, SCALE, window)


def decode_modes(batch: int, context: int):
    """(mode, fn, note) for one decode shape; every fn reads ``batch x context`` tokens of K/V."""
    paged = Paged([1] * batch, [context] * batch)
    plan = launch_plan(paged.q, KV_HEADS, paged.ctx.metadata.block_table, BLOCK_SIZE, batch, split_kv=True)
    yield "triton unified", lambda: paged_attention(*paged.args()), ""
    yield "triton split-KV", lambda: paged_attention(*paged.args(), split_kv=True), \
        f"{plan['segments']} segment(s) of {plan['num_warps']}-warp programs, {plan['BLOCK_N']}-key " \
        f"{'TMA block' if plan['page_tiles'] else 'gathered'} tiles, 1 launch"
    in_order = Paged([1] * batch, [context] * batch, scatter=False)
    yield "triton split-KV, pages in order", lambda: paged_attention(*in_order.args(), split_kv=True), \
        "same launch; each request's blocks in one ascending run (a dense cache's layout)"
    yield "reference", lambda: reference_attention(*paged.args()), ""

    # dense per-request slots for the bundled kernels: [batch * context, kv_heads, dim]
    dense_k = torch.randn(batch * context, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    dense_v = torch.randn_like(dense_k)
    q = paged.q
    cum_q = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    cum_k = cum_q * context
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    yield "FA2 (bundled)", lambda: torch.ops.aten._flash_attention_forward(
        q, dense_k, dense_v, cum_q, cum_k, 1, context, 0.0, False, False, scale=SCALE, seqused_k=seq_lens)[0], \
        "dense cache, max_q=1 (GQA swap)"

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex_q = q.view(batch, 1, Q_HEADS, HEAD_DIM).transpose(1, 2)
    flex_k = dense_k.view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
    flex_v = dense_v.view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)

    @functools.cache
    def flex_setup():  # on first call (the warmup), so a failure here is this mode's error alone
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < seq_lens[b], batch, None, 1, context,
                                 device="cuda")
        return mask, torch.compile(flex_attention, dynamic=False)

    def flex_call():
        mask, flex = flex_setup()
        return flex(flex_q, flex_k, flex_v, block_mask=mask, scale=SCALE, enable_gqa=True)

    yield "FlexAttention", flex_call, "dense cache, static block mask, compiled"


def prefill_modes(tokens: int):
    paged = Paged([tokens], [tokens])
    yield "triton unified", lambda: paged_attention(*paged.args()), ""
    cum = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    yield "FA2 (bundled)", lambda: torch.ops.aten._flash_attention_forward(
        paged.q, paged.k, paged.v, cum, cum, tokens, tokens, 0.0, True, False, scale=SCALE)[0], "contiguous K/V"


def mixed_modes(decode_rows: int, context: int, prefill: int):
    paged = Paged([1] * decode_rows + [prefill], [context] * decode_rows + [prefill])
    yield "triton unified", lambda: paged_attention(*paged.args()), "store + unified: two launches"


def launch_modes():
    x = torch.zeros(1, device="cuda")
    yield "one-element add", lambda: x.add_(1), "graph launch and event overhead of any row"


def run_benchmark(args) -> list[dict]:
    cases = [("launch", "empty graph", {}, launch_modes)]
    cases += [("decode", f"batch {b}, context {args.context}", dict(batch=b, context=args.context),
              lambda b=b: decode_modes(b, args.context)) for b in args.batches]
    cases += [("prefill", f"{t} tokens", dict(tokens=t), lambda t=t: prefill_modes(t)) for t in (2048, 8192)]
    cases.append(("mixed", f"64 decode x {args.context} + 2048 prefill", dict(decode_rows=64, prefill=2048),
                  lambda: mixed_modes(64, args.context, 2048)))
    rows = []
    for phase, shape, params, make in cases:
        kv_bytes = 2 * params.get("batch", 0) * params.get("context", 0) * KV_HEADS * HEAD_DIM * 2
        flops = 2 * params.get("tokens", 0) ** 2 * Q_HEADS * HEAD_DIM  # causal: half of 4 * T^2 * H * D
        try:
            modes = list(make())
        except Exception as error:  # setup failed: record it and go on
            rows.append(dict(phase=phase, shape=shape, mode="setup", error=repr(error)[:400]))
            print(json.dumps(rows[-1]), flush=True)
            continue
        for mode, fn, note in modes:
            row = dict(phase=phase, shape=shape, mode=mode, note=note)
            try:
                graph = capture(fn)
                for flush in reversed(args.flush):  # the first mode last: its time is the row's "us"
                    us = replay_us(graph, args.iters, flush)
                    row[f"us_{flush}_flush"] = round(us, 2)
                row["us"] = round(us, 2)
                if kv_bytes:
                    row["TB/s"] = round(kv_bytes / us / 1e6, 3)
                if flops:
                    row["TFLOP/s"] = round(flops / us / 1e6, 1)
            except Exception as error:  # one broken mode must not hide the others
                row["error"] = repr(error)[:400]
            rows.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return rows


def run_check() -> bool:
    """Triton (unified and split-KV) against the reference op at a few shapes; True when all match."""
    cases = [([1] * 8, [4096] * 8, 0), ([1], [1000], 0), ([1] * 5, [1, 17, 300, 2048, 4000], 256),
             ([300, 1, 1, 64], [300, 2000, 17, 1500], 0), ([7, 1, 120], [700, 33, 120], 64)]
    ok = True
    for query_lens, seq_lens, window in cases:
        paged = Paged(query_lens, seq_lens)
        expected_cache = paged.cache.clone()
        expected = reference_attention(*paged.args(window, expected_cache))
        variants = [(False, None), (True, None), (True, 1), (True, 8)] if all(q == 1 for q in query_lens) \
            else [(False, None)]
        for split, segments in variants:
            cache = paged.cache.clone()
            out = paged_attention(*paged.args(window, cache), split_kv=split, num_segments=segments)
            error = (out.float() - expected.float()).abs().max().item()
            same_cache = torch.equal(cache[:, NULL_BLOCK + 1:], expected_cache[:, NULL_BLOCK + 1:])
            good = error < 2e-2 and same_cache
            ok &= good
            print(f"{'ok ' if good else 'BAD'} query_lens={query_lens[:6]} seq_lens={seq_lens[:6]} window={window} "
                  f"split_kv={split} segments={segments or 'default'}: max abs error {error:.2e}, "
                  f"cache {'equal' if same_cache else 'DIFFERS'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_attention.json", help="JSON results file")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--flush", default="read,write",
                        help=f"L2 flushes to time each mode after, comma list of {FLUSHES}; "
                             f"the first gives us and TB/s")
    parser.add_argument("--check", action="store_true", help="only check triton against the reference")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.flush = args.flush.split(",")
    if not args.flush or set(args.flush) - set(FLUSHES):
        parser.error(f"--flush takes a comma list of {FLUSHES}, got {','.join(args.flush)!r}")
    torch.manual_seed(0)
    if args.check:
        sys.exit(0 if run_check() else 1)

    import triton

    header = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "shapes": f"q_heads {Q_HEADS}, kv_heads {KV_HEADS}, head_dim {HEAD_DIM}, {DTYPE}, block {BLOCK_SIZE}",
        "timing": f"median of {args.iters} CUDA-graph replays after each L2 flush of {args.flush} "
                  f"(us and TB/s: {args.flush[0]})",
    }
    print(json.dumps(header), flush=True)
    rows = run_benchmark(args)
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    print()
    for key in ("device", "torch", "triton", "date", "command", "shapes", "timing"):
        print(f"{key}: {header[key]}")
    others = [f"us ({f} flush)" for f in args.flush[1:]]
    print("| phase | shape | mode | us | TB/s | TFLOP/s | " + " | ".join(others + ["note"]) + " |")
    print("|---|---|---|---|---|---|" + "---|" * (len(others) + 1))
    for r in rows:
        cells = [r["phase"], r["shape"], r["mode"], r.get("us", "error"), r.get("TB/s", ""), r.get("TFLOP/s", ""),
                 *(r.get(f"us_{f}_flush", "") for f in args.flush[1:]), r.get("error", r.get("note", ""))]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()

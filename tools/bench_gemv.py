"""One-row linears: cuBLAS (``F.linear``) against our Triton GEMV, per projection of a decoder.

Qwen2.5-1.5B's projections (qkv with bias, o_proj, gate_up, down, the LM head) at one row, bf16. Each op is timed as a CUDA-graph replay of one call per layer over distinct weight copies
(28, as in the model; 3 for the LM head), after an L2-clearing read, and reported per call, with
the effective TB/s of the weight read. The rows justify ``fullgraph_backend.gemv``'s rule (one
row; K up to LONG_K, and past it with PDL). ``gemv_pdl_us``: the same graph with every GEMV launched with programmatic
dependent launch (sm_90+; docs/perf-notes.md, section 18). ``norm_gemv_us``: for the projections
after an RMSNorm (qkv, gate_up, the LM head), the GEMV with the residual add + RMSNorm in its
prologue, as the ``fuse_norm`` pass runs it (section 32): its cost over ``gemv_us``. The down rows
after SiLU-mul time cuBLAS against the plain GEMV and the ``fuse_silu`` op's GEMV, each per tiling
(sections 36 and 37); the K = 1536 projections' GEMV is timed per tiling too. A last row times a decode step's
chain of projections in one graph, each reading the one before it (28 x qkv, o_proj, gate_up on the
GEMV, down on cuBLAS, then the LM head), without and with PDL.

``--few-rows`` times the same projections at 2 to 64 rows instead: cuBLAS against the few-row
kernel (``fullgraph_backend.few_rows``, with PDL) per tiling and split count, the rows behind its
``MAX_ROWS`` and ``default_tiles`` (docs/perf-notes.md, section 41); ``--model`` takes another
decoder's projections (e.g. llama-3.2-1b).

Usage (GPU): python tools/bench_gemv.py --out bench_gemv.json [--few-rows --rows 2,8,16,32,64]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend import pdl  # noqa: E402
from fullgraph_backend.few_rows import FewRowTiles, default_tiles, few_row_linear, split_for  # noqa: E402
from fullgraph_backend.gemv import LONG_K_TILES, TILES, Tiles, gemv, rms_norm_gemv, silu_mul_gemv, silu_mul_rows  # noqa: E402
from fullgraph_backend.models import get_config  # noqa: E402
from graph_timing import capture, replay_us  # noqa: E402  (tools/ is on the path when run as a script)

HIDDEN, INTERMEDIATE, QKV, VOCAB, LAYERS = 1536, 8960, 2048, 151936, 28


def model_shapes(config) -> dict[str, tuple[int, int, bool, int]]:
    """A decoder's projections, ``name: (N, K, bias, copies)``: one weight per layer (3 for the LM head)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q_width = config.num_heads * config.head_dim
    return {"qkv": (q_width + 2 * config.num_kv_heads * config.head_dim, hidden, config.qkv_bias, layers),
            "o_proj": (hidden, q_width, False, layers), "gate_up": (2 * inter, hidden, False, layers),
            "down": (hidden, inter, False, layers), "lm_head": (config.vocab_size, hidden, False, 3)}


SHAPES = model_shapes(get_config("qwen2.5-1.5b"))  # --few-rows times --model's instead
AFTER_NORM = ("qkv", "gate_up", "lm_head")


def sparing(rule, on_cublas: set[tuple[int, int]]):
    """``rule`` (``gemv.uses_few_rows``, which the op asks at warm-up and capture) refusing weights of
    the ``(N, K)`` shapes in ``on_cublas`` (:func:`model_shapes`' first two): those linears stay on
    cuBLAS (bench_decode's ``+cublas_OP`` modes, profile_decode's ``--cublas``)."""
    if not on_cublas:
        return rule
    return lambda x, weight, bias=None: tuple(weight.shape) not in on_cublas and rule(x, weight, bias)


def norm_gemv(k: int):
    """``fn(x, weight, bias)``: the GEMV of ``rms_norm(x + residual) * norm_weight`` (fixed residual
    and norm weight, allocated here, outside the captured graph)."""
    norm_weight = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    return lambda x, weight, bias=None: rms_norm_gemv(x, norm_weight, 1e-6, weight, bias, residual)[0]


def time_op(fn, n: int, k: int, bias: bool, copies: int, iters: int, rows: int = 1) -> tuple[float, float]:
    """(microseconds per call, max abs difference from F.linear) over ``copies`` cold weights."""
    weights = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5,
                torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None) for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    error = (fn(x, *weights[0]).float() - F.linear(x, *weights[0]).float()).abs().max().item()
    graph = capture(lambda: [fn(x, w, b) for w, b in weights])
    return replay_us(graph, iters, "read") / copies, error


# tilings of the down projection's GEMVs (K = 8960: long rows, few outputs), plain and with SiLU-mul in the prologue
DOWN_VARIANTS = (LONG_K_TILES, Tiles(2, 512, 4, 3), Tiles(4, 512, 4, 3), Tiles(4, 1024, 8, 3), Tiles(8, 512, 8, 3),
                 Tiles(4, 256, 4, 4), Tiles(4, 1024, 4, 2), Tiles(1, 1024, 4, 4))


def time_down(iters: int) -> list[dict]:
    """Down after SiLU-mul, one row, per layer over cold weights, with PDL as in a step: cuBLAS on the
    SiLU-mul'd row (the default step: Inductor's SiLU-mul kernel, then this), our SiLU-mul kernel then
    cuBLAS (the ``fuse_silu`` op's path for more rows); the plain GEMV on that row per tiling (the
    default one-row down since session 16), and the GEMV with SiLU-mul in its prologue per tiling
    (``fuse_silu`` at one row)."""
    n, k, _, copies = SHAPES["down"]
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    row = silu_mul_rows(gate, up)  # made once, outside the graphs: the variants that start from it time the linear alone
    variants = {"cublas (SiLU-mul done)": lambda w: F.linear(row, w),
                "silu_mul + cublas": lambda w: F.linear(silu_mul_rows(gate, up), w)}
    variants.update({f"gemv {tuple(t)} (SiLU-mul done)": functools.partial(lambda w, t: gemv(row, w, tiles=t, pdl=True),
                                                                           t=t) for t in DOWN_VARIANTS})
    variants.update({f"gated gemv {tuple(t)}": functools.partial(lambda w, t: silu_mul_gemv(gate, up, w, tiles=t,
                                                                                           pdl=True), t=t)
                     for t in DOWN_VARIANTS})
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
    reference = F.linear(F.silu(gate) * up, weights[0]).float()
    rows = []
    for name, fn in variants.items():
        error = (fn(weights[0]).float() - reference).abs().max().item()
        us = replay_us(capture(lambda: [fn(w) for w in weights]), iters, "read") / copies
        rows.append(variant_row("down after SiLU-mul", name, n, k, us, error))
    return rows


# tilings of the K = 1536 projections' GEMV (TILES first): qkv and o_proj read 6.3 and 4.7 MB at
# 1.6-1.9 TB/s with TILES (latency, three dependent 512-wide slices a program), gate_up 55 MB at 3.7
SHORT_VARIANTS = (TILES, Tiles(4, 2048, 4, 1), Tiles(2, 2048, 4, 1), Tiles(8, 2048, 8, 1), Tiles(4, 1024, 4, 2),
                  Tiles(2, 512, 4, 3), Tiles(8, 512, 4, 3), Tiles(4, 256, 4, 4))


def time_short_tilings(iters: int) -> list[dict]:
    """The plain GEMV with PDL per tiling of :data:`SHORT_VARIANTS`, on the K = 1536 projections."""
    rows = []
    for name in ("qkv", "o_proj", "gate_up"):
        n, k, bias, copies = SHAPES[name]
        for tiles in SHORT_VARIANTS:
            us, error = time_op(functools.partial(gemv, pdl=True, tiles=tiles), n, k, bias, copies, iters)
            rows.append(variant_row(name, f"gemv {tuple(tiles)}", n, k, us, error))
    return rows


def variant_row(op: str, variant: str, n: int, k: int, us: float, error: float) -> dict:
    """One row of the tiling tables (printed as it is made): time per call and the TB/s of the
    ``[n, k]`` bf16 weight read."""
    row = dict(op=op, variant=variant, N=n, K=k, us=round(us, 2), TBs=round(n * k * 2 / 1e6 / us, 2),
               max_abs_diff=error)
    print(json.dumps(row), flush=True)
    return row


def time_chain(iters: int) -> dict:
    """One graph per setting of a decode step's projections at one row, each input the output of
    the one before (down on cuBLAS, as ``uses_gemv`` rules): microseconds without and with PDL."""
    def weight(name):
        n, k, bias, _ = SHAPES[name]
        return (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5,
                torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None)

    layers = [{name: weight(name) for name in ("qkv", "o_proj", "gate_up", "down")} for _ in range(LAYERS)]
    head = weight("lm_head")[0]
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def step(use_pdl: bool) -> torch.Tensor:
        h = x
        for w in layers:
            qkv = gemv(h, *w["qkv"], pdl=use_pdl)
            o = gemv(qkv[:, :HIDDEN], *w["o_proj"], pdl=use_pdl)
            gate_up = gemv(o, *w["gate_up"], pdl=use_pdl)
            h = F.linear(gate_up[:, :INTERMEDIATE], *w["down"])
        return gemv(h, head, pdl=use_pdl)

    times, outs = {}, {}
    for use_pdl in (False, True):
        outs[use_pdl] = step(use_pdl)
        times[use_pdl] = replay_us(capture(lambda: step(use_pdl)), iters, "read")
    launches = 3 * LAYERS + 1
    return dict(op="layer chain", N=launches, K=HIDDEN, gemv_us=round(times[False], 1), gemv_pdl_us=round(times[True], 1),
                pdl_saved_us_per_gemv=round((times[False] - times[True]) / launches, 3),
                same_bits=bool(torch.equal(outs[False], outs[True])))


# few-row tilings (split 0: chosen from the SM count), after each projection's default (few_rows.default_tiles)
FEW_ROW_VARIANTS = (FewRowTiles(32, 256, 4, 4), FewRowTiles(16, 256, 4, 4), FewRowTiles(32, 128, 4, 4),
                    FewRowTiles(32, 512, 4, 3), FewRowTiles(64, 128, 4, 4), FewRowTiles(64, 256, 4, 3),
                    FewRowTiles(64, 256, 8, 3), FewRowTiles(128, 128, 4, 3), FewRowTiles(128, 128, 8, 3),
                    FewRowTiles(128, 64, 4, 5), FewRowTiles(32, 256, 4, 4, 1), FewRowTiles(64, 128, 4, 4, 1),
                    FewRowTiles(64, 128, 4, 4, 4), FewRowTiles(16, 512, 4, 3, 1),
                    # fewer stages, so more programs fit an SM at once (gate_up's 280 column tiles of 64 rows
                    # take two waves at 4 stages, two programs an SM), and more K ranges for the down projection
                    FewRowTiles(64, 128, 4, 3), FewRowTiles(64, 128, 4, 2), FewRowTiles(32, 128, 4, 3),
                    FewRowTiles(32, 128, 8, 4), FewRowTiles(64, 64, 4, 6), FewRowTiles(128, 64, 4, 3),
                    FewRowTiles(32, 128, 4, 4, 12), FewRowTiles(64, 128, 4, 3, 8), FewRowTiles(16, 128, 4, 4),
                    # narrow column tiles in one K range: more programs for qkv and o_proj
                    FewRowTiles(16, 256, 4, 4, 1), FewRowTiles(16, 128, 4, 4, 1), FewRowTiles(32, 128, 4, 4, 1),
                    FewRowTiles(16, 256, 4, 3, 1),
                    # the wide default in one K range (Llama-3.2-1B's gate_up: 256 column tiles, split 2 by the rule)
                    FewRowTiles(64, 128, 4, 3, 1))


def time_few_rows(rows_list: list[int], iters: int, log, ops: list[str], shapes: dict) -> list[dict]:
    """Each projection at each row count: cuBLAS, then the few-row kernel with PDL per tiling of
    :data:`FEW_ROW_VARIANTS` (the split count each ran with in the row; a tiling that does not
    compile, e.g. past the shared memory, is a row with its error). Rows go to ``log`` as made.
    ``ops``: the projections of ``shapes`` (:func:`model_shapes`) timed."""
    out = []

    def add(row):
        out.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()

    for name in ops:
        n, k, bias, copies = shapes[name]
        for rows in rows_list:
            us, _ = time_op(F.linear, n, k, bias, copies, iters, rows)
            add(variant_row(f"{name} x{rows}", "cublas", n, k, us, 0.0))
            for tiles in (default_tiles(n, k), *FEW_ROW_VARIANTS):
                fn = functools.partial(few_row_linear, pdl=True, tiles=tiles)
                label = f"few-row {tuple(tiles[:4])} split {split_for(n, k, tiles, torch.device('cuda'))}"
                try:
                    us, error = time_op(fn, n, k, bias, copies, iters, rows)
                except Exception as e:  # noqa: BLE001  (a tiling past the device's limits: its row says so)
                    add(dict(op=f"{name} x{rows}", variant=label, error=f"{type(e).__name__}: {str(e)[:120]}"))
                    continue
                add(variant_row(f"{name} x{rows}", label, n, k, us, error))
            torch.cuda.empty_cache()
    return out


def print_few_rows(rows: list[dict]) -> None:
    """Per projection and row count: cuBLAS, the default tiling (``few_rows.default_tiles``) and the
    fastest, with their ratio."""
    print("\n| op x rows | cuBLAS us (TB/s) | default us | fastest | us (TB/s) | cuBLAS / fastest | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for op in dict.fromkeys(r["op"] for r in rows):
        group = [r for r in rows if r["op"] == op and "us" in r]
        cublas, ours = group[0], group[1:]
        best = min(ours, key=lambda r: r["us"])
        print(f"| {op} | {cublas['us']} ({cublas['TBs']}) | {ours[0]['us']} | {best['variant']} | {best['us']} "
              f"({best['TBs']}) | {cublas['us'] / best['us']:.3f} | {best['max_abs_diff']:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_gemv.json")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--few-rows", action="store_true", help="time 2+ rows: cuBLAS against the few-row kernel")
    parser.add_argument("--rows", default="2,8,16,32,64", help="row counts of --few-rows")
    parser.add_argument("--ops", default=",".join(SHAPES), help="projections of --few-rows, comma-separated")
    parser.add_argument("--model", default="qwen2.5-1.5b", help="whose projections --few-rows times (named config)")
    args = parser.parse_args()
    unknown = set(args.ops.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"--ops: unknown projection(s) {sorted(unknown)}; known: {', '.join(SHAPES)}")
    import triton

    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(),
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "timing": f"median of {args.iters} CUDA-graph replays after a 256 MiB L2-clearing read, per call"}
    print(json.dumps(header), flush=True)
    if args.few_rows:
        header["model"] = args.model
        with open(args.out + "l", "w") as log:  # one row a line as they come: a killed run keeps its rows
            rows = time_few_rows([int(r) for r in args.rows.split(",")], args.iters, log, args.ops.split(","),
                                 model_shapes(get_config(args.model)))
        with open(args.out, "w") as f:
            json.dump({**header, "few_rows": rows}, f, indent=1)
        print_few_rows(rows)
        return
    rows = []
    for name, (n, k, bias, copies) in SHAPES.items():
        mb = n * k * 2 / 1e6  # megabytes over microseconds is TB/s
        cublas_us, _ = time_op(F.linear, n, k, bias, copies, args.iters)
        gemv_us, error = time_op(gemv, n, k, bias, copies, args.iters)
        gemv_pdl_us, _ = time_op(functools.partial(gemv, pdl=True), n, k, bias, copies, args.iters)
        norm_us = time_op(norm_gemv(k), n, k, bias, copies, args.iters)[0] if name in AFTER_NORM else None
        rows.append(dict(op=name, N=n, K=k, cublas_us=round(cublas_us, 2), cublas_TBs=round(mb / cublas_us, 2),
                         gemv_us=round(gemv_us, 2), gemv_TBs=round(mb / gemv_us, 2),
                         speedup=round(cublas_us / gemv_us, 3), max_abs_diff=error, gemv_pdl_us=round(gemv_pdl_us, 2),
                         norm_gemv_us=None if norm_us is None else round(norm_us, 2)))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    header["pdl"] = pdl.supported(torch.device("cuda"))  # False: the pdl columns time plain launches
    down = time_down(args.iters)
    short = time_short_tilings(args.iters)
    chain = time_chain(args.iters)
    print(json.dumps(chain), flush=True)
    with open(args.out, "w") as f:
        json.dump({**header, "rows": rows, "down": down, "short_tilings": short, "chain": chain}, f, indent=1)
    print("\n| op (one row) | N x K | cuBLAS us (TB/s) | GEMV us (TB/s) | cuBLAS / GEMV | GEMV with PDL us "
          "| GEMV with the norm us |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['N']} x {r['K']} | {r['cublas_us']} ({r['cublas_TBs']}) | {r['gemv_us']} "
              f"({r['gemv_TBs']}) | {r['speedup']} | {r['gemv_pdl_us']} | {r['norm_gemv_us'] or '-'} |")
    print("\n| one row | tiling | us (TB/s) | max abs diff |\n|---|---|---|---|")
    for r in down + short:
        print(f"| {r['op']} | {r['variant']} | {r['us']} ({r['TBs']}) | {r['max_abs_diff']:.3g} |")
    print(f"\nlayer chain ({chain['N']} GEMVs, {LAYERS} cuBLAS downs, one graph): {chain['gemv_us']} us, with PDL "
          f"{chain['gemv_pdl_us']} us ({chain['pdl_saved_us_per_gemv']} us a GEMV launch; same bits: {chain['same_bits']})")


if __name__ == "__main__":
    main()

"""Decode-step benchmark: one model, several execution modes, side by side in one process.

A reference decoder (random weights) with ``--context`` tokens already cached per request takes
one decode step per call. Modes (``mode`` or ``mode:attention_impl``):
  eager            plain PyTorch, attention through the same impl op
  none             backend="fullgraph", Inductor, no CUDA graphs
  piecewise        backend="fullgraph", graphs between attention calls, attention eager
  full             backend="fullgraph", one CUDA graph per padded size, default options
  reduce-overhead  torch.compile(mode="reduce-overhead") on the same model (cudagraph trees)
Suffixes change one thing about a mode (``full+nogemv``, ``full+combo+tuned``):
  +tuned       Inductor's coordinate-descent tuning, as gpt-fast does
  +cublaslt    cuBLASLt as PyTorch's preferred BLAS library for that mode's matmuls
  +nogemv      the backend's ``gemv=False``: one-row linears stay on cuBLAS
  +nofewrows   linears of 2 to 16 rows on cuBLAS (``few_rows.MAX_ROWS`` = 1), as before session 19
  +widestages4 the few-row kernel's wide tiling (gate_up, the LM head) with 4 stages, as in session 19
  +alttiles    the few-row tilings (and row limit) that ``--alt-tiles`` gives, for an A/B in one run
  +normfuse    the backend's ``fuse_norm=True``: RMSNorms in the GEMV's prologue, not Inductor's kernels
  +nopdl       the backend's ``pdl=False``: no kernel launched with programmatic dependent launch
  +silufuse    the backend's ``fuse_silu=True``: SiLU-mul in the down projection's GEMV prologue
  +nosiluepi   the backend's ``fuse_silu_epilogue=False``: Inductor's SiLU-mul kernel after gate_up, as before
               session 27 (``+silufuse`` turns it off too)
  +cublasdown  one-row linears past ``gemv.LONG_K`` (the down projection) on cuBLAS's split-K
               (``gemv.MAX_K`` lowered), as before session 16 put them on the GEMV
  +segmentsdown  split-KV segments as before session 21: the bound's 128-token chunks rounded down to a
               power of two, not up (two chunks in some segments where the count is not a power of two)
  +noshorttiles  one-row GEMVs of N up to 4096 whose row fits one 2048-wide slice (qkv, o_proj) with
               ``gemv.TILES``, as before session 20 (``gemv.SHORT_N`` = 0), not ``gemv.SHORT_TILES``
  +combo       Inductor's combo kernels (independent small kernels launched as one; the backend
               turns them on with PDL, so this is for reduce-overhead)
  +nocombo     no combo kernels (``inductor_config={"combo_kernels": False}``)
  +whole       the backend's ``regional_compile=False``: the graph compiled whole, not layer by layer
  +cublas_OP   that projection's linears of 2 to 16 rows on cuBLAS, the others on the few-row kernel
               (OP: qkv, o_proj, gate_up, down or lm_head, by weight shape), to find which one a
               batch's step loses on (``full+cublas_o_proj+cublas_qkv``)
(``full+nopdl`` is ``full`` as it was before session 13, ``full+nocombo`` before session 14. Then
``+pdl`` launched only our kernels with PDL and ``+inductorpdl`` only Inductor's; ``full`` now
launches both that way. Session 14 removed ``+prefetch3`` and ``+kvprefetch``, which measured
nothing: perf-notes section 36.)
The HBM floor is every weight read once (the tied embedding once, as the LM head) plus the KV
cache actually used, over the measured device-to-device copy bandwidth.

Each mode runs in a process of its own (``tools/isolate.py``: a mode measured second in a process
has read slower); ``--one-process`` keeps them in one.

Usage (GPU): python tools/bench_decode.py --out OUT_DIR [--batches 1,16,64] [--context 1000]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend import few_rows, gemv, use_forward_context  # noqa: E402
from fullgraph_backend.attention import triton_paged  # noqa: E402
from fullgraph_backend.attention.registry import resolve_impl  # noqa: E402
from fullgraph_backend.models import build_model, get_config  # noqa: E402
from bench_gemv import SHAPES, model_shapes, sparing  # noqa: E402
from isolate import add_arguments, run_modes, runs_apart  # noqa: E402
from plot_results import plot_decode  # noqa: E402  (tools/ is on the path when run as a script)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 10 / 1e3
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / seconds


def time_calls(fn, iters: int) -> tuple[float, float]:
    """(median device ms per call over back-to-back calls, median wall ms of a synchronised call)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rounds = []
    for _ in range(5):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / iters)
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(rounds), statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--modes", default="eager,none,piecewise,full,reduce-overhead")
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=".")
    add_arguments(parser)
    parser.add_argument("--long-k-tiles", help="BLOCK_N,BLOCK_K,WARPS,STAGES of the plain GEMVs past gemv.LONG_K "
                        "(the down projection) instead of gemv.LONG_K_TILES (+silufuse keeps gemv.SILU_MUL_TILES)")
    parser.add_argument("--alt-tiles", type=json.loads, default={},
                        help='JSON for the modes with +alttiles: few_rows\' tiling per weight class, {"narrow" | '
                        '"wide" | "long_k": [BLOCK_N, BLOCK_K, WARPS, STAGES, SPLIT_K]}, and "max_rows" '
                        '(few_rows.MAX_ROWS); what it leaves out stays the default')
    args = parser.parse_args()
    unknown = set(args.alt_tiles) - {*ALT_TILES, "max_rows"}
    if unknown:
        parser.error(f"--alt-tiles: unknown key(s) {sorted(unknown)}; known: {[*ALT_TILES, 'max_rows']}")
    if args.long_k_tiles:  # read by the op's launches, i.e. at warm-up and capture
        gemv.LONG_K_TILES = gemv.Tiles(*(int(v) for v in args.long_k_tiles.split(",")))

    os.makedirs(args.out, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    for spec in modes:
        unknown = {flag for flag in _parse_mode(spec)[2] if flag not in FLAGS + CUBLAS_FLAGS}
        if unknown:
            parser.error(f"unknown mode suffix(es) {sorted(unknown)} in {spec!r}; known: {list(FLAGS)} and "
                         f"cublas_OP for OP in {list(SHAPES)}")
    if runs_apart(args, modes):
        header, rows = run_modes(__file__, sys.argv[1:], modes, "bench_decode.json", batches, args.rounds,
                                 args.mode_timeout)
        header["command"] = " ".join([os.path.basename(sys.executable), *sys.argv]) + "  (one process per mode)"
        _write(args.out, header, rows, batches)
        return
    torch.manual_seed(0)
    config = get_config(args.model)
    dtype = torch.bfloat16
    header = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": getattr(__import__("triton"), "__version__", "?"), "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "model": args.model,
        "context": args.context, "dtype": str(dtype),
    }
    bandwidth = copy_bandwidth()
    header["copy_bandwidth_TBs"] = round(bandwidth / 1e12, 3)
    header["long_k_tiles"] = list(gemv.LONG_K_TILES)
    if args.alt_tiles:
        header["alt_tiles"] = args.alt_tiles
    max_len = args.context + 1
    ctx = config.forward_context(dtype=dtype, device="cuda", max_num_seqs=max(batches), max_num_tokens=max(batches),
                                 max_model_len=max_len, attention_impl=args.attention_impl)
    header["attention_impl"] = resolve_impl(ctx.attention_impl, ctx.device).name
    for cache in ctx.kv_caches:
        cache.normal_(0, 0.1)
    model = build_model(config, seed=0, dtype=dtype, device="cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    per_seq = ctx.max_blocks_per_seq
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(max(batches))]
    kv_token_bytes = 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8
    print(json.dumps(header), flush=True)

    rows = []
    default_blas, default_max_k, default_short_n = torch.backends.cuda.preferred_blas_library(), gemv.MAX_K, gemv.SHORT_N
    default_max_rows, default_segments = few_rows.MAX_ROWS, triton_paged.decode_segments
    default_uses_few_rows, shapes = gemv.uses_few_rows, model_shapes(config)
    default_classes = {name: getattr(few_rows, attr) for name, attr in ALT_TILES.items()}
    for spec in modes:
        mode, impl, flags = _parse_mode(spec)
        alt = args.alt_tiles if "alttiles" in flags else {}
        for name, attr in ALT_TILES.items():
            setattr(few_rows, attr, few_rows.FewRowTiles(*alt[name]) if name in alt else default_classes[name])
        torch.backends.cuda.preferred_blas_library("cublaslt" if "cublaslt" in flags else default_blas)
        gemv.MAX_K = gemv.LONG_K if "cublasdown" in flags else default_max_k  # read at warm-up and capture
        gemv.SHORT_N = 0 if "noshorttiles" in flags else default_short_n
        few_rows.MAX_ROWS = 1 if "nofewrows" in flags else alt.get("max_rows", default_max_rows)
        segments_down = "segmentsdown" in flags
        on_cublas = {shapes[f.removeprefix("cublas_")][:2] for f in flags if f in CUBLAS_FLAGS}
        gemv.uses_few_rows = sparing(default_uses_few_rows, on_cublas)
        triton_paged.decode_segments = _segments_down(default_segments) if segments_down else default_segments
        if "widestages4" in flags:
            few_rows.WIDE_TILES = default_classes["wide"]._replace(num_stages=4)
        torch._dynamo.reset()
        if impl:
            ctx.attention_impl = impl
        fn = _compiled(model, mode, set(flags), impl or "auto")
        t0 = time.perf_counter()
        for batch in sorted(batches, reverse=True):  # largest first: the first call compiles symbolically
            with use_forward_context(ctx), torch.inference_mode():
                positions = ctx.prepare([1] * batch, [args.context + 1] * batch, tables[:batch])
                ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")
                if batch > 1:
                    torch._dynamo.mark_dynamic(ids, 0)
                    torch._dynamo.mark_dynamic(positions, 0)
                row = {"mode": spec, "batch": batch}
                try:
                    fn(ids, positions)
                    torch.cuda.synchronize()
                    row["setup_s"] = round(time.perf_counter() - t0, 1)
                    gpu_ms, wall_ms = time_calls(lambda: fn(ids, positions), args.iters)
                    floor = (weight_bytes + batch * (args.context + 1) * kv_token_bytes) / bandwidth * 1e3
                    row.update(gpu_ms=round(gpu_ms, 4), wall_ms=round(wall_ms, 4), floor_ms=round(floor, 4),
                               x_floor=round(gpu_ms / floor, 2))
                except Exception as error:  # record and go on: one broken mode must not hide the others
                    row["error"] = repr(error)[:400]
            t0 = time.perf_counter()
            rows.append(row)
            print(json.dumps(row), flush=True)
        ctx.attention_impl = header["attention_impl"]
    _write(args.out, {**header, "weight_GB": weight_bytes / 1e9}, rows, batches)


def _write(out: str, header: dict, rows: list[dict], batches: list[int]) -> None:
    """``bench_decode.json``, the table on stdout and the plot."""
    with open(os.path.join(out, "bench_decode.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    _print_table(header, rows, batches)
    plot_decode({**header, "rows": rows}, os.path.join(out, "bench_decode.png"))


def _parse_mode(spec: str) -> tuple[str, str, list[str]]:
    """``mode+flag+...:impl`` as ``(mode, impl, flags)``."""
    mode, _, impl = spec.partition(":")
    mode, *flags = mode.split("+")
    return mode, impl, flags


FLAGS = ("tuned", "cublaslt", "nogemv", "nofewrows", "widestages4", "alttiles", "normfuse", "silufuse", "nosiluepi",
         "cublasdown", "segmentsdown", "noshorttiles", "nopdl", "combo", "nocombo", "whole")
# --alt-tiles' keys: few_rows' tiling constants by weight class (few_rows.default_tiles)
ALT_TILES = {"narrow": "NARROW_TILES", "wide": "WIDE_TILES", "long_k": "LONG_K_TILES"}


CUBLAS_FLAGS = tuple(f"cublas_{op}" for op in SHAPES)  # bench_gemv.model_shapes' projection names


def _segments_down(rule):
    """``rule`` (``triton_paged.decode_segments``) with the bound's chunks rounded down to a power of
    two, as before session 21: where the rule gives more segments than chunks, half as many."""
    def segments(num_reqs, num_kv_heads, max_kv_len, device, min_segment_tokens=triton_paged.MIN_SEGMENT_TOKENS,
                 programs_per_sm=triton_paged.PROGRAMS_PER_SM):
        count = rule(num_reqs, num_kv_heads, max_kv_len, device, min_segment_tokens, programs_per_sm)
        return count // 2 if count > -(-max_kv_len // min_segment_tokens) else count
    return segments


def _compiled(model, mode: str, flags: set[str], impl: str):
    inductor_config = {"coordinate_descent_tuning": True} if "tuned" in flags else {}
    if "combo" in flags or "nocombo" in flags:
        inductor_config["combo_kernels"] = "combo" in flags
    if mode == "eager":
        return model
    if mode == "reduce-overhead":
        if inductor_config:  # mode= and options= are exclusive; reduce-overhead is triton.cudagraphs=True
            return torch.compile(model, options={"triton.cudagraphs": True, **inductor_config})
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, backend="fullgraph", options={"cudagraph_mode": mode, "attention_impl": impl,
                                                             "inductor_config": inductor_config,
                                                             "gemv": "nogemv" not in flags, "pdl": "nopdl" not in flags,
                                                             "fuse_norm": "normfuse" in flags,
                                                             "fuse_silu": "silufuse" in flags,
                                                             "fuse_silu_epilogue":
                                                                 not flags & {"nosiluepi", "silufuse"},
                                                             "regional_compile": "whole" not in flags})


def _print_table(header: dict, rows: list[dict], batches: list[int]) -> None:
    print(f"\n{header['device']}, torch {header['torch']}, triton {header['triton']}, {header['date']}")
    print(f"{header['model']}, {header['dtype']}, context {header['context']}, attention {header['attention_impl']}, "
          f"copy bandwidth {header['copy_bandwidth_TBs']} TB/s")
    print(f"command: {header['command']}")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    print("| mode | " + " | ".join(f"batch {b} (ms, x floor)" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for mode in modes:
        cells = []
        for b in batches:
            r = next((r for r in rows if r["mode"] == mode and r["batch"] == b), {})
            cells.append(f"{r['gpu_ms']:.2f} ({r['x_floor']}x)" if "gpu_ms" in r else "error")
        print(f"| {mode} | " + " | ".join(cells) + " |")
    floors = [next((r["floor_ms"] for r in rows if r["batch"] == b and "floor_ms" in r), None) for b in batches]
    print("| HBM floor | " + " | ".join(f"{f:.2f}" if f else "-" for f in floors) + " |")


if __name__ == "__main__":
    main()

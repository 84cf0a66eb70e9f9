"""The serving benchmark of issue 4: -O2, -O3 and -O4 side by side in one process on the GPU.

The workload of vLLM's full-graph change: random prompts of 1000 tokens, 100 output tokens,
EOS ignored, Poisson arrivals at 1 and 10 requests/s, Qwen2.5-1.5B shapes (random bf16
weights). Each level builds its engine once (startup: compile, capture, graphs, graph memory),
then serves each rate; the levels run in the order given, so Inductor's cache serves the second
compile of a graph (-O3 reuses -O2's pieces and -O4 reuses -O3's whole graph).

Time: about 100 s per level at 1 req/s with 100 prompts, plus startup; under 9 minutes on an
H100 for the defaults. ``--num-prompts 50`` halves the serving part.

Usage (GPU): python tools/bench_serving.py --out docs/results [--num-prompts 100] [--rates 1,10]
             [--levels 2,3,4] [--capture-sizes 1,2,4,...]
Writes OUT/bench_serving.json and OUT/bench_serving.png and prints one table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fullgraph_backend.engine import LLM  # noqa: E402
from fullgraph_backend.engine.bench import bench_serve, print_serve_result  # noqa: E402
from plot_results import plot_serving  # noqa: E402  (tools/ is on the path when run as a script)

# decode steps carry up to ~20 requests at 10 req/s (8-steps to 64); mixed steps carry a prefill
# chunk that fills the 512-token budget, so they pad to 512
CAPTURE_SIZES = "1,2,4,8,16,24,32,40,48,56,64,128,256,384,512"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--levels", default="2,3,4")
    parser.add_argument("--rates", default="1,10", help="requests per second, comma list")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--capture-sizes", default=CAPTURE_SIZES, help="comma list, or 'default' (51 sizes)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    began = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    options = {} if args.capture_sizes == "default" else {
        "capture_sizes": tuple(int(s) for s in args.capture_sizes.split(","))}
    rates = [float(r) for r in args.rates.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"kind": "serving", "device": device, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "model": args.model, "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens, "capture_sizes": args.capture_sizes,
              "levels": {}}
    for level in (int(x) for x in args.levels.split(",")):
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        llm = LLM(args.model, optimization_level=level, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.input_len + args.output_len + 16, compile_options=options or None,
                  gpu_memory_utilization=args.gpu_memory_utilization, seed=0)
        print(f"startup: {llm.startup}", flush=True)
        entry = {"startup": vars(llm.startup), "rates": {}}
        for rate in rates:
            serve = bench_serve(llm, num_prompts=args.num_prompts, request_rate=rate, input_len=args.input_len,
                                output_len=args.output_len, ignore_eos=True, seed=0)
            metrics = serve.metrics()
            print(f"-O{level}, {rate} req/s")
            print_serve_result(metrics)
            entry["rates"][str(rate)] = metrics
        result["levels"][str(level)] = entry
        del llm
        result["total_s"] = round(time.perf_counter() - began, 1)
        with open(os.path.join(args.out, "bench_serving.json"), "w") as f:  # after every level: a cut run keeps some
            json.dump(result, f, indent=1)
    plot_serving(result, os.path.join(args.out, "bench_serving.png"))
    print(f"\n{result['device']}, torch {result['torch']}, {result['date']}, {args.model}, {args.num_prompts} prompts, "
          f"{args.input_len} in / {args.output_len} out, total {result['total_s']} s\ncommand: {result['command']}")
    print("| level | startup s (compile + capture) | graphs | graph MiB | rate | median TPOT ms | P99 TPOT ms | "
          "median TTFT ms | median ITL ms |\n|---|---|---|---|---|---|---|---|---|")
    for level, entry in result["levels"].items():
        s = entry["startup"]
        for rate, m in entry["rates"].items():
            print(f"| -O{level} | {s['compile_s']:.1f} + {s['capture_s']:.1f} | {s['num_graphs']} | "
                  f"{s['graph_mib']:.0f} | {rate} | {m['median_tpot_ms']:.2f} | {m['p99_tpot_ms']:.2f} | "
                  f"{m['median_ttft_ms']:.1f} | {m['median_itl_ms']:.2f} |")


if __name__ == "__main__":
    main()

"""A generic model called with a new batch size almost every call, in four modes side by side.

The workload where one graph per distinct size costs most (a server of a generic model whose
batch changes every call): 6 transformer blocks (d=512, 8 heads, per-sample SDPA over 16
positions), fp16, 300 calls with batch sizes drawn from 1..256. Modes:
eager, Inductor (dynamic=True), Inductor mode="reduce-overhead" (records one graph per distinct
size) and backend="fullgraph" (pads to the capture sizes: one graph per size class). Reports the
total time of all calls (compile and capture included) and the steady median of the last 100.

Usage (GPU): python tools/bench_dynamic_batch.py --out OUT_DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from plot_results import plot_dynamic  # tools/ is on the path when run as a script


class Block(torch.nn.Module):
    def __init__(self, d: int = 512, heads: int = 8) -> None:
        super().__init__()
        self.heads, self.ln1, self.ln2 = heads, torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block() for _ in range(6)]).cuda().half().eval()


def run(fn, sizes: list[int], mark: bool) -> dict:
    """Call ``fn`` once per size with fresh inputs; total seconds and steady median ms."""
    xs = [torch.randn(b, 16, 512, device="cuda", dtype=torch.half) for b in sizes]
    if mark:
        for x in xs:
            torch._dynamo.mark_dynamic(x, 0)
    times = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for x in xs:
            t0 = time.perf_counter()
            fn(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    steady = sorted(times[-100:])[len(times[-100:]) // 2] * 1e3
    return {"total_s": round(time.perf_counter() - start, 2), "steady_median_ms": round(steady, 3)}


def check(fn, model, sizes: list[int]) -> float:
    """Largest relative error of ``fn`` against eager over the given sizes, fresh inputs each."""
    worst = 0.0
    with torch.inference_mode():
        for b in sizes:
            x = torch.randn(b, 16, 512, device="cuda", dtype=torch.half)
            torch._dynamo.mark_dynamic(x, 0)
            ref = model(x).float()
            got = fn(x).float()
            worst = max(worst, ((got - ref).norm() / ref.norm()).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--max-bs", type=int, default=256)
    parser.add_argument("--modes", default="eager,inductor,reduce-overhead,fullgraph")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    random.seed(0)
    sizes = [random.randint(1, args.max_bs) for _ in range(args.calls)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "calls": args.calls, "distinct_sizes": len(set(sizes)), "modes": {}}
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        model = build()
        if mode == "eager":
            fn, mark = model, False
        elif mode == "inductor":
            fn, mark = torch.compile(model, dynamic=True), False
        elif mode == "reduce-overhead":
            torch._dynamo.config.cache_size_limit = 1024
            fn, mark = torch.compile(model, mode="reduce-overhead", dynamic=True), False
        else:
            fn, mark = torch.compile(model, backend="fullgraph"), True
        try:
            entry = run(fn, sizes, mark)
            if mode == "fullgraph":
                entry["max_rel_error_vs_eager"] = check(fn, model, [1, 3, 77, 200, 256, 5])
        except Exception as error:  # one broken mode must not hide the others
            entry = {"error": repr(error)[:400]}
        result["modes"][mode] = entry
        print(json.dumps({mode: entry}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_dynamic_batch.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_dynamic(result, os.path.join(args.out, "bench_dynamic_batch.png"))
    print(f"\n{result['device']}, torch {result['torch']}, {result['date']}, {result['calls']} calls, "
          f"{result['distinct_sizes']} distinct sizes\ncommand: {result['command']}")
    print("| mode | total s (incl. compile/capture) | steady median ms (last 100) |\n|---|---|---|")
    for mode, entry in result["modes"].items():
        print(f"| {mode} | {entry.get('total_s', 'error')} | {entry.get('steady_median_ms', entry.get('error'))} |")


if __name__ == "__main__":
    main()

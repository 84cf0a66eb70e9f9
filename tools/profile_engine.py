"""Where an engine step spends its time on the host: schedule, metadata, the compiled call, sampling.

Runs ``--batch`` requests of ``--input-len`` prompt tokens through the engine at ``-O``, then
times ``--steps`` decode steps phase by phase (host clocks; the GPU is waited on only where the
engine itself waits: reading the sampled tokens back). ``--profile`` adds a cProfile of those steps.
``--narrow`` keeps the model's layer count but shrinks its widths, so the host path (Dynamo's
guards scale with the parameter count) can be studied on a CPU.

Usage: python tools/profile_engine.py [--model qwen2.5-1.5b] [-O 4] [--batch 1] [--steps 200]
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import json
import os
import pstats
import statistics
import sys
import time
from functools import wraps

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.engine import LLM, SamplingParams  # noqa: E402
from fullgraph_backend.engine.bench import random_prompts  # noqa: E402
from fullgraph_backend.models import CONFIGS, get_config  # noqa: E402


def narrow(model: str) -> str:
    """Register ``<model>-narrow``: ``model``'s layer count and structure (tied head, biases, RoPE) with
    tiny widths, so what scales with the layers (host paths, compile time) can be studied on a CPU."""
    name = f"{model}-narrow"
    CONFIGS[name] = get_config(model).replace(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                                              head_dim=16, vocab_size=512, name=name)
    return name


def timed(times: dict, name: str, fn):
    """``fn`` that adds its host time to ``times[name]``."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - start)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("-O", dest="level", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--narrow", action="store_true", help="same layer count, tiny widths (host study on CPU)")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed steps")
    parser.add_argument("--kernels", type=int, default=0, help="then profile this many steps: GPU kernels per step")
    parser.add_argument("--options", default="{}", help="engine options as JSON, e.g. '{\"async_scheduling\": false}'")
    args = parser.parse_args()
    model = narrow(args.model) if args.narrow else args.model
    llm = LLM(model, optimization_level=args.level, max_num_seqs=max(args.batch, 8),
              max_model_len=args.input_len + args.steps + 64, seed=0, **json.loads(args.options))
    prompts = random_prompts(args.batch, args.input_len, llm.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 20, ignore_eos=True)
    for prompt in prompts:
        llm.add_request(prompt, params)
    while any(s.num_uncomputed > 1 for s in llm.scheduler.running + list(llm.scheduler.waiting)):
        llm.step()  # prefills
    for _ in range(10):
        llm.step()  # warm
    times: dict[str, list[float]] = collections.defaultdict(list)
    sched, runner = llm.scheduler, llm.runner
    sched.schedule = timed(times, "schedule", sched.schedule)
    sched.update = timed(times, "update", sched.update)
    runner.ctx.prepare = timed(times, "prepare (metadata)", runner.ctx.prepare)
    runner.model = timed(times, "compiled call (to launch)", runner.model)
    runner.sampler.__class__.__call__ = timed(times, "sample (launch)", runner.sampler.__class__.__call__)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    wall = (time.perf_counter() - start) / args.steps
    if profiler:
        profiler.disable()
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "model": model, "level": args.level, "batch": args.batch,
              "step ms": round(wall * 1e3, 4),
              "phases (median ms)": {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}}
    print(json.dumps(report, indent=1))
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    if args.kernels:
        print_kernels(llm, args.kernels)


def print_kernels(llm: LLM, steps: int) -> None:
    """The GPU kernels of ``steps`` engine steps (torch.profiler), per step: count and device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in kernels) / steps
    print(f"{sum(e.count for e in kernels) / steps:.0f} kernels, {total:.0f} us of GPU time per step")
    for e in kernels[:30]:
        print(f"{e.count / steps:6.1f}/step {e.self_device_time_total / steps:8.1f} us  {e.key[:110]}")


if __name__ == "__main__":
    main()

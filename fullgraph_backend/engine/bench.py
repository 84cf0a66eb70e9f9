"""The engine benchmarks behind ``fullgraph bench latency`` and ``fullgraph bench serve``.

- :func:`bench_latency`: one batch of random prompts through ``generate``, timed whole, several
  times after warm-up (vLLM's ``benchmark_latency``).
- :func:`bench_serve`: an in-process load generator. Requests of random tokens arrive by a
  Poisson process at ``request_rate`` per second (``inf``: all at once) and are added to the
  engine between its steps; each token's time is taken when its step ends. The metrics and the
  printed block follow vLLM's ``benchmark_serving`` (TTFT from arrival, TPOT excluding the first
  token, ITL between consecutive tokens).
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch

from fullgraph_backend.engine.llm import LLM
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.sequence import RequestOutput


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """``num`` prompts of ``length`` uniformly random token ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num, length), generator=generator).tolist()


# ---- latency -------------------------------------------------------------------------------------
@dataclass
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    latencies_s: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q))

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "input_len": self.input_len, "output_len": self.output_len,
                "avg_latency": float(np.mean(self.latencies_s)), "latencies": self.latencies_s,
                "percentiles": {str(q): self.percentile(q) for q in (10, 25, 50, 75, 90, 99)}}


def bench_latency(llm: LLM, *, batch_size: int, input_len: int, output_len: int, num_iters: int = 10,
                  num_iters_warmup: int = 2, seed: int = 0) -> LatencyResult:
    """Time ``generate`` on ``batch_size`` prompts of ``input_len`` tokens, ``output_len`` out each."""
    prompts = random_prompts(batch_size, input_len, llm.model_config.vocab_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for _ in range(num_iters_warmup):
        llm.generate(prompts, params)
    latencies = []
    for _ in range(num_iters):
        start = time.perf_counter()
        llm.generate(prompts, params)
        latencies.append(time.perf_counter() - start)
    return LatencyResult(batch_size, input_len, output_len, latencies)


def print_latency(result: LatencyResult, file: TextIO | None = None) -> None:
    out = file or sys.stdout
    print(f"Avg latency: {np.mean(result.latencies_s):.4f} seconds", file=out)
    for q in (10, 25, 50, 75, 90, 99):
        print(f"{q}% percentile latency: {result.percentile(q):.4f} seconds", file=out)


# ---- serving -------------------------------------------------------------------------------------
@dataclass
class ServeResult:
    request_rate: float
    duration_s: float
    outputs: list[RequestOutput]  # by request id

    def metrics(self) -> dict:
        """vLLM's metric names; times in ms."""
        outs = self.outputs
        ttft = [o.ttft * 1e3 for o in outs]
        tpot = [o.tpot * 1e3 for o in outs if o.tpot is not None]
        itl = [gap * 1e3 for o in outs for gap in o.itl]
        input_tokens = sum(len(o.prompt_token_ids) for o in outs)
        output_tokens = sum(len(o.token_ids) for o in outs)
        m = {"completed": len(outs), "request_rate": self.request_rate, "duration": self.duration_s,
             "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
             "request_throughput": len(outs) / self.duration_s,
             "output_throughput": output_tokens / self.duration_s,
             "total_token_throughput": (input_tokens + output_tokens) / self.duration_s,
             "num_preemptions": sum(o.num_preemptions for o in outs)}
        for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
            values = values or [0.0]
            m[f"mean_{name}_ms"] = float(np.mean(values))
            m[f"median_{name}_ms"] = float(np.median(values))
            m[f"p99_{name}_ms"] = float(np.percentile(values, 99))
        return m


def bench_serve(llm: LLM, *, num_prompts: int, request_rate: float, input_len: int, output_len: int,
                ignore_eos: bool = True, seed: int = 0, progress: bool = True) -> ServeResult:
    """Feed ``num_prompts`` random requests at Poisson arrivals; run the engine until all finish."""
    from rich.progress import Progress

    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0 (inf: all at once), got {request_rate}")
    prompts = random_prompts(num_prompts, input_len, llm.model_config.vocab_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=ignore_eos)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2))  # one test request, untimed
    arrivals = _poisson_arrivals(num_prompts, request_rate, seed)
    outputs: list[RequestOutput] = []
    start = time.perf_counter()
    sent = 0
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"serving {num_prompts} requests at {request_rate} req/s", total=num_prompts)
        while len(outputs) < num_prompts:
            now = time.perf_counter()
            while sent < num_prompts and start + arrivals[sent] <= now:
                llm.add_request(prompts[sent], params, arrival_time=start + arrivals[sent])
                sent += 1
            if llm.has_unfinished():
                done = llm.step()
                outputs += done
                bar.advance(task, len(done))
            else:
                time.sleep(max(0.0, start + arrivals[sent] - time.perf_counter()))
    duration = time.perf_counter() - start
    return ServeResult(request_rate, duration, sorted(outputs, key=lambda o: o.request_id))


def _poisson_arrivals(num: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets in seconds: the first at 0, then exponential gaps of mean ``1 / rate``."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(num):
        times.append(t)
        t += 0.0 if rate == float("inf") else rng.expovariate(rate)
    return times


def print_serve_result(metrics: dict, file: TextIO | None = None) -> None:
    """The ``Serving Benchmark Result`` block, in vLLM's layout."""
    out = file or sys.stdout

    def row(label: str, value, fmt: str = ".2f") -> None:
        print(f"{label:<40} {value:<10{fmt}}", file=out)

    def section(title: str, name: str, label: str) -> None:
        print(f"{title:-^50}", file=out)
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {label} (ms):", metrics[f"{stat}_{name}_ms"])

    print(f"{' Serving Benchmark Result ':=^50}", file=out)
    row("Successful requests:", metrics["completed"], "")
    row("Request rate configured (RPS):", metrics["request_rate"])
    row("Benchmark duration (s):", metrics["duration"])
    row("Total input tokens:", metrics["total_input_tokens"], "")
    row("Total generated tokens:", metrics["total_output_tokens"], "")
    row("Request throughput (req/s):", metrics["request_throughput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Total Token throughput (tok/s):", metrics["total_token_throughput"])
    section("Time to First Token", "ttft", "TTFT")
    section("Time per Output Token (excl. 1st token)", "tpot", "TPOT")
    section("Inter-token Latency", "itl", "ITL")
    print("=" * 50, file=out)

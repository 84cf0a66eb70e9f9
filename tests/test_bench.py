"""The engine benchmarks: metrics from known timings, Poisson arrivals, and both CLI commands on tiny."""
from __future__ import annotations

import json

import pytest

from fullgraph_backend.cli import main
from fullgraph_backend.engine.bench import ServeResult, _poisson_arrivals, print_serve_result
from fullgraph_backend.engine.sequence import RequestOutput


def test_serve_metrics_follow_vllm_definitions(capsys):
    a = RequestOutput(0, [1] * 10, [5, 6, 7], "length", arrival_time=0.0, token_times=[0.1, 0.3, 0.4])
    b = RequestOutput(1, [1] * 20, [5], "length", arrival_time=1.0, token_times=[1.5])
    m = ServeResult(2.0, duration_s=2.0, outputs=[a, b]).metrics()
    assert m["completed"] == 2 and m["total_input_tokens"] == 30 and m["total_output_tokens"] == 4
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 2.0 and m["total_token_throughput"] == 17.0
    assert m["mean_ttft_ms"] == pytest.approx(300.0) and m["median_ttft_ms"] == pytest.approx(300.0)
    assert m["mean_tpot_ms"] == pytest.approx(150.0)  # (0.4 - 0.1) / 2; b has one token: no TPOT
    assert m["mean_itl_ms"] == pytest.approx(150.0) and m["p99_itl_ms"] == pytest.approx(199.0)
    print_serve_result(m)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "=" * 12 + " Serving Benchmark Result " + "=" * 12
    assert out[1].startswith("Successful requests:" + " " * 21 + "2")
    assert "Mean TTFT (ms):" in out[10] and out[-1] == "=" * 50


def test_poisson_arrivals():
    times = _poisson_arrivals(2000, 10.0, seed=0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    assert _poisson_arrivals(5, float("inf"), 0) == [0.0] * 5


def test_bench_latency_cli(capsys, tmp_path):
    code = main(["bench", "latency", "--batch-size", "3", "--input-len", "8", "--output-len", "4", "-O4",
                 "--compiler", "eager", "--num-iters", "2", "--num-iters-warmup", "1", "--max-num-seqs", "4",
                 "--max-num-batched-tokens", "32", "--output-json", str(tmp_path / "l.json")])
    out = capsys.readouterr().out
    assert code == 0 and "Avg latency:" in out and "99% percentile latency:" in out
    assert "startup: -O4 (full)" in out and "graphs" in out
    result = json.loads((tmp_path / "l.json").read_text())
    assert len(result["latencies"]) == 2 and result["startup"]["num_graphs"] > 0


def test_bench_serve_cli(capsys):
    code = main(["bench", "serve", "--request-rate", "200", "--num-prompts", "5", "--random-input-len", "20",
                 "--random-output-len", "4", "--ignore-eos", "--optimization-level", "3", "--compiler", "eager",
                 "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "Serving Benchmark Result" in out
    assert "Successful requests:                     5" in out
    assert "Total generated tokens:                  20" in out
    for line in ("Median TTFT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):", "full_and_piecewise"):
        assert line in out


def test_bench_rejects_a_bad_level(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "latency", "-O7"])

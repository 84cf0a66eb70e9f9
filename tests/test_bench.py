"""The engine benchmarks: metrics from known timings, Poisson arrivals, and both CLI commands on tiny."""
from __future__ import annotations

import json
import re

import pytest

from fullgraph_backend.cli import COUNT, FRACTION, POSITIVE, RATE, SEED, SIZES, main
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


@pytest.mark.parametrize("argv, flag, message", [
    (["latency", "--num-iters", "0"], "--num-iters", "an int >= 1, got '0'"),
    (["latency", "--batch-size", "0"], "--batch-size", "an int >= 1"),
    (["latency", "--batch-size", "-3"], "--batch-size", "an int >= 1"),
    (["latency", "--input-len", "0"], "--input-len", "an int >= 1"),
    (["latency", "--output-len", "2.5"], "--output-len", "an int >= 1, got '2.5'"),
    (["latency", "--num-iters-warmup", "-1"], "--num-iters-warmup", "an int >= 0"),
    (["serve", "--request-rate", "0"], "--request-rate", "a number > 0"),
    (["serve", "--request-rate", "nan"], "--request-rate", "a number > 0"),
    (["serve", "--request-rate=-inf"], "--request-rate", "a number > 0"),
    (["serve", "--num-prompts", "0"], "--num-prompts", "an int >= 1"),
    (["serve", "--random-input-len", "0"], "--random-input-len", "an int >= 1"),
    (["serve", "--random-output-len", "x"], "--random-output-len", "an int >= 1, got 'x'"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs", "an int >= 1"),
    (["latency", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens", "an int >= 1"),
    (["latency", "--max-model-len", "0"], "--max-model-len", "an int >= 1"),
    (["latency", "--num-kv-blocks", "0"], "--num-kv-blocks", "an int >= 1"),
    (["latency", "--gpu-memory-utilization", "0"], "--gpu-memory-utilization", r"a number in \(0, 1\]"),
    (["latency", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization", r"a number in \(0, 1\]"),
    (["latency", "--capture-sizes", "4,0,8"], "--capture-sizes", "a comma list of ints >= 1, got '4,0,8'"),
    (["latency", "--capture-sizes", "4,,8"], "--capture-sizes", "a comma list of ints >= 1"),
    (["serve", "--seed", "-1"], "--seed", r"an int in \[0, 2\*\*64 - 1\]"),
    (["serve", "--seed", str(2**64)], "--seed", r"an int in \[0, 2\*\*64 - 1\]"),
])
def test_bad_numbers_are_usage_errors_naming_the_flag(argv, flag, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(rf"argument {flag}: must be {message}", err), err


@pytest.mark.parametrize("parse, text, value", [
    (COUNT, "0", 0), (POSITIVE, "1", 1), (RATE, "inf", float("inf")), (RATE, "1e-3", 1e-3),
    (FRACTION, "1", 1.0), (SIZES, "1, 8,16", (1, 8, 16)), (SEED, str(2**64 - 1), 2**64 - 1), (SEED, "0", 0),
])
def test_edge_values_are_accepted(parse, text, value):
    assert parse(text) == value

"""tools/profile_decode.py: the critical-path attribution of a replay's kernels."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from profile_decode import critical_path, kernel_sequence  # noqa: E402


def test_each_kernel_is_charged_from_the_end_before_it():
    # One replay: "a" 0-10; "b" launched early (PDL) at 5, ends 14; "a" again starts after a gap, 16-20.
    rows = {row["name"]: row for row in critical_path([("a", 0, 10), ("b", 5, 14), ("a", 16, 20)], replays=1)}
    assert rows["a"] == {"name": "a", "calls": 2, "us": 14.0, "critical_us": 16.0, "gap_us": 2.0}
    assert rows["b"] == {"name": "b", "calls": 1, "us": 9.0, "critical_us": 4.0, "gap_us": 0.0}
    assert sum(row["critical_us"] for row in rows.values()) == 20.0  # the replay's span


def test_replays_are_charged_apart_and_averaged():
    # Two replays 100 us apart: the second's first kernel is not charged the idle time between them.
    kernels = [("a", 0, 10), ("b", 10, 12), ("a", 100, 110), ("b", 111, 113)]
    rows = {row["name"]: row for row in critical_path(kernels, replays=2)}
    assert rows["a"]["critical_us"] == 10.0 and rows["a"]["calls"] == 1
    assert rows["b"]["critical_us"] == 2.5 and rows["b"]["gap_us"] == 0.5
    assert [row["name"] for row in critical_path(kernels, replays=2)] == ["a", "b"]  # largest charge first


def test_a_kernel_count_that_does_not_split_into_replays_is_refused():
    with pytest.raises(ValueError, match="3 kernels do not split into 2 replays"):
        critical_path([("a", 0, 1), ("b", 1, 2), ("a", 3, 4)], replays=2)


def test_the_sequence_averages_each_kernel_of_the_replay_in_order():
    kernels = [("a", 0, 10), ("b", 5, 14), ("a", 100, 108), ("b", 104, 114)]
    assert kernel_sequence(kernels, replays=2) == [
        {"name": "a", "calls": 1, "us": 9.0, "critical_us": 9.0, "gap_us": 0.0},
        {"name": "b", "calls": 1, "us": 9.5, "critical_us": 5.0, "gap_us": 0.0}]


def test_cublas_names_projections_before_anything_runs(monkeypatch, capsys):
    """``--cublas`` takes bench_gemv's projection names (as bench_decode's ``+cublas_OP``); another is a
    usage error, raised before the model is built."""
    import profile_decode

    monkeypatch.setattr(sys, "argv", ["profile_decode.py", "--cublas", "o_proj,mlp"])
    with pytest.raises(SystemExit):
        profile_decode.main()
    assert "unknown projection(s) ['mlp']" in capsys.readouterr().err

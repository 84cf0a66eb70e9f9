"""tools/plot_results.py: the ratios the decode-history plot draws (the drawing needs matplotlib, which
the test install leaves out)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from plot_results import decode_history  # noqa: E402


def _row(mode, batch, gpu_ms, floor_ms=0.5):
    return {"mode": mode, "batch": batch, "gpu_ms": gpu_ms, "floor_ms": floor_ms}


def test_decode_history_pairs_each_full_step_with_its_own_runs_floor_and_reduce_overhead():
    first = {"rows": [_row("full", 16, 1.5), _row("reduce-overhead", 16, 1.8), _row("full", 1, 1.0),
                      _row("reduce-overhead", 1, 1.2, floor_ms=9.0), _row("full+nogemv", 1, 3.0)]}
    second = {"rows": [_row("full", 1, 0.8, floor_ms=0.4), _row("reduce-overhead", 16, 2.0),
                       {"mode": "full", "batch": 16, "error": "RuntimeError()"}]}
    history = decode_history([("a", first), ("b", second)])
    assert list(history) == [1, 16]  # batches in order, whatever order the rows came in
    (a1, b1), (a16,) = history[1], history[16]
    assert a1 == ("a", 2.0, pytest.approx(1.2)) and b1 == ("b", 2.0, None)  # no reduce-overhead row at 1 in b
    assert a16 == ("a", 3.0, pytest.approx(1.2))  # b's batch-16 full row failed: no point, not a zero

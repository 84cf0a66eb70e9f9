"""Host cost of calling an attention impl op, by how the op is registered (CPU is enough).

A no-op with the impl schema of ``fullgraph_backend.attention.registry`` (one mutated argument),
registered three ways: ``torch.library.custom_op`` (how the impl ops were registered until
2026-11-27), ``torch.library.Library.impl`` (how ``fullgraph_backend/library.py`` defines them now),
and the plain function. The piecewise levels pay this once per
layer between graph pieces. Prints the median microseconds of 2000 calls under inference mode.

Usage: python tools/bench_op_dispatch.py
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.attention.registry import IMPL_SCHEMA  # noqa: E402


def noop(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, scale, sliding_window):
    return torch.empty_like(q)


def median_us(fn, args, calls: int = 2000) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    custom = torch.library.custom_op("dispatch_probe::custom", noop, mutates_args=("kv_cache",), schema=IMPL_SCHEMA)
    lib = torch.library.Library("dispatch_probe", "FRAGMENT")
    lib.define("plain" + IMPL_SCHEMA)
    lib.impl("plain", noop, "CPU")
    ints = torch.zeros(3, dtype=torch.int32)
    args = (*(torch.zeros(2, 12, 128) for _ in range(3)), torch.zeros(2, 10, 16, 2, 128), ints, ints, ints,
            torch.zeros(2, dtype=torch.int64), 0.1, 0)
    with torch.inference_mode():
        print(json.dumps({"torch": torch.__version__, "custom_op us": median_us(custom, args),
                          "Library.impl us": median_us(torch.ops.dispatch_probe.plain.default, args),
                          "plain function us": median_us(noop, args)}))


if __name__ == "__main__":
    main()

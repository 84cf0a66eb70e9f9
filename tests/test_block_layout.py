"""engine/block_layout.py: the engine's scheduler and block manager on a simulated serving run."""
from __future__ import annotations

import os
import subprocess
import sys

from fullgraph_backend.engine.block_layout import Workload, simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_fresh_cache_gives_runs_of_blocks():
    layout = simulate(Workload(num_prompts=120, num_kv_blocks=100_000))
    assert layout.decode_steps > 1000
    assert layout.boundaries_in_order > 0.9 and layout.tiles_one_run > 0.85


def test_long_decodes_keep_their_blocks_in_order():
    # every 16 tokens each of many running requests grows by a block: it finds the one after its
    # last still free, on a cache small enough that the free list wraps
    layout = simulate(Workload(num_prompts=120, rate=50.0, input_len=32, output_len=600, num_kv_blocks=4096))
    assert layout.boundaries_in_order > 0.9 and layout.tiles_one_run > 0.85


def test_the_tool_prints_the_workload_and_its_layout():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "block_layout.py"), "--num-prompts", "8",
                          "--rate", "100"], capture_output=True, text=True, check=True).stdout
    assert '"num_prompts": 8' in out and '"rate": 100.0' in out and '"boundaries_in_order"' in out

"""tools/block_layout.py: the engine's scheduler and block manager on a simulated serving run."""
from __future__ import annotations

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "block_layout.py")
_spec = importlib.util.spec_from_file_location("block_layout", _PATH)
block_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(block_layout)


def _run(**overrides):
    args = dict(num_prompts=120, rate=10.0, input_len=1000, output_len=100, num_kv_blocks=100_000, block_size=16,
                max_num_seqs=64, max_num_batched_tokens=512, step_ms=2.2)
    return block_layout.simulate(**{**args, **overrides})


def test_a_fresh_cache_gives_runs_of_blocks():
    result = _run()
    assert result["decode_steps"] > 1000
    assert result["boundaries_in_order"] > 0.9 and result["tiles_one_run"] > 0.85


def test_long_decodes_keep_their_blocks_in_order():
    # every 16 tokens each of many running requests grows by a block: it finds the one after its
    # last still free, on a cache small enough that the free list wraps
    result = _run(input_len=32, output_len=600, rate=50.0, num_kv_blocks=4096)
    assert result["boundaries_in_order"] > 0.9 and result["tiles_one_run"] > 0.85

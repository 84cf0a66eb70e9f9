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


def test_a_fresh_cache_gives_prompts_runs_of_blocks():
    # a prompt's blocks come off a never-wrapped free list together; only decode growth interleaves
    result = _run()
    assert result["decode_steps"] > 1000
    assert result["boundaries_in_order"] > 0.9 and result["tiles_one_run"] > 0.85


def test_decode_growth_scatters_blocks():
    # long outputs: every 16 tokens each of many running requests takes the free list's next block
    result = _run(input_len=32, output_len=600, rate=50.0)
    assert result["boundaries_in_order"] < 0.2
    assert 0 <= result["tiles_one_run"] <= result["boundaries_in_order"] + 0.05

"""BlockManager: allocation grows block tables, freeing returns every block, exhaustion is explicit."""
from __future__ import annotations

import pytest

from fullgraph_backend.engine.block_manager import BlockManager
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.sequence import Sequence


def seq(n: int = 1, rid: int = 0) -> Sequence:
    return Sequence(rid, [1] * n, SamplingParams(), 0.0)


def test_reserved_blocks_are_never_handed_out():
    bm = BlockManager(num_blocks=10, block_size=16, num_reserved=2)
    s = seq()
    bm.grow(s, 8 * 16)
    assert bm.num_usable == 8 and bm.num_free == 0
    assert sorted(s.block_table) == list(range(2, 10))


def test_grow_counts_the_blocks_a_request_owns():
    bm = BlockManager(num_blocks=6, block_size=16)
    s = seq()
    bm.grow(s, 1)
    assert len(s.block_table) == 1 and bm.num_free == 4
    bm.grow(s, 16)  # still one block
    assert len(s.block_table) == 1
    bm.grow(s, 17)
    assert len(s.block_table) == 2 and bm.num_free == 3
    assert bm.can_grow(s, 5 * 16) and not bm.can_grow(s, 5 * 16 + 1)


def test_free_returns_every_block_and_forgets_the_cache():
    bm = BlockManager(num_blocks=6, block_size=16)
    a, b = seq(rid=0), seq(rid=1)
    bm.grow(a, 40)
    bm.grow(b, 20)
    a.num_computed = 40
    assert bm.num_free == 0 and not set(a.block_table) & set(b.block_table)
    bm.free(a)
    assert a.block_table == [] and a.num_computed == 0 and bm.num_free == 3
    bm.free(b)
    assert bm.num_free == bm.num_usable == 5


def test_exhaustion_is_an_error_not_a_partial_table():
    bm = BlockManager(num_blocks=4, block_size=16)
    s = seq()
    assert not bm.can_grow(s, 4 * 16)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.grow(s, 4 * 16)
    assert s.block_table == [] and bm.num_free == 3


def test_a_cache_without_free_blocks_is_rejected():
    with pytest.raises(ValueError, match="no block is left"):
        BlockManager(num_blocks=2, block_size=16, num_reserved=2)
    with pytest.raises(ValueError, match="null block"):
        BlockManager(num_blocks=4, block_size=16, num_reserved=0)

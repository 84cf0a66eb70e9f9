"""BlockManager: allocation grows block tables, freeing returns every block, exhaustion is explicit."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fullgraph_backend.engine.block_manager import RUN_AHEAD_BLOCKS, BlockManager
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.sequence import Sequence


def seq(n: int = 1, rid: int = 0, max_tokens: int = 16) -> Sequence:
    return Sequence(rid, [1] * n, SamplingParams(max_tokens=max_tokens), 0.0)


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


def test_requests_growing_in_turn_keep_their_blocks_in_order():
    """Each request starts a run and moves the blocks it expects to grow into to the back of the
    free order, so decodes that grow one block at a time, in turn, stay ascending runs."""
    bm = BlockManager(num_blocks=200, block_size=16)
    reqs = [seq(40, rid=i, max_tokens=100) for i in range(4)]
    for r in reqs:
        bm.grow(r, 40)
    for tokens in range(41, 141):
        for r in reqs:
            bm.grow(r, tokens)
    for r in reqs:
        assert r.block_table == list(range(r.block_table[0], r.block_table[0] + 9))
    assert len({b for r in reqs for b in r.block_table}) == 36


def test_run_ahead_is_a_preference_not_a_reservation():
    # a request expecting a long output leaves its next blocks free for anyone who needs them
    bm = BlockManager(num_blocks=12, block_size=16)
    a, b = seq(16, rid=0, max_tokens=1000), seq(16, rid=1)
    bm.grow(a, 16)
    assert bm.can_grow(b, 10 * 16)
    bm.grow(b, 10 * 16)
    assert bm.num_free == 0 and not set(a.block_table) & set(b.block_table)
    assert sorted(a.block_table + b.block_table) == list(range(1, 12))
    assert RUN_AHEAD_BLOCKS >= 64  # enough for 1000-token outputs at block size 16


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 80), st.booleans()), min_size=1, max_size=60),
       st.integers(3, 40))
def test_any_grow_free_sequence_keeps_the_books(ops, num_blocks):
    """Random grows and frees: tables stay disjoint and off the reserved block, every block is free
    or owned exactly once, and the free order hands out each free block once."""
    bm = BlockManager(num_blocks=num_blocks, block_size=4)
    reqs = [seq(1, rid=i, max_tokens=40) for i in range(6)]
    for rid, tokens, release in ops:
        r = reqs[rid]
        if release:
            bm.free(r)
        elif bm.can_grow(r, tokens):
            bm.grow(r, tokens)
        owned = [b for q in reqs for b in q.block_table]
        assert len(owned) == len(set(owned)) and 0 not in owned
        assert bm.num_free + len(owned) == bm.num_usable
    everything = seq(1, rid=99)
    bm.grow(everything, bm.num_free * 4)  # the free order must yield exactly the free blocks
    owned = [b for q in reqs + [everything] for b in q.block_table]
    assert sorted(owned) == list(range(1, num_blocks)) and bm.num_free == 0

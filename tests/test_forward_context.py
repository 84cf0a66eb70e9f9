"""ForwardContext: prepare() fills the static buffers and their sentinel tails; validation; capture metadata."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fullgraph_backend
from fullgraph_backend import NULL_BLOCK, PAD_SLOT, BatchKind, use_forward_context
from fullgraph_backend.forward_context import get_forward_context

from helpers import make_ctx


@pytest.fixture()
def ctx():
    # block_size 16, max_model_len 64 -> 4 blocks per sequence; 4 * 4 + 1 = 17 blocks
    return make_ctx(max_num_seqs=4, max_num_tokens=16, max_model_len=64)


def _snapshot(ctx):
    return {k: v.clone() for k, v in ctx.metadata.tensors().items()}


def test_buffers_start_with_sentinels(ctx):
    m = ctx.metadata
    assert ctx.max_blocks_per_seq == 4 and ctx.num_blocks == 17
    assert m.query_start_loc.shape == (5,) and m.query_start_loc.dtype == torch.int32
    assert m.seq_lens.shape == (4,) and m.seq_lens.dtype == torch.int32
    assert m.block_table.shape == (4, 4) and m.block_table.dtype == torch.int32
    assert m.slot_mapping.shape == (16,) and m.slot_mapping.dtype == torch.int64
    assert (m.seq_lens == 0).all() and (m.block_table == NULL_BLOCK).all() and (m.slot_mapping == PAD_SLOT).all()


def test_prepare_fills_buffers_and_tails(ctx):
    ptrs = {k: v.data_ptr() for k, v in ctx.metadata.tensors().items()}
    positions = ctx.prepare(query_lens=[3, 1, 2], seq_lens=[3, 18, 34], block_tables=[[1], [2, 3], [4, 5, 6]])
    m = ctx.metadata
    assert m.query_start_loc.tolist() == [0, 3, 4, 6, 6]  # the tail repeats the total
    assert m.seq_lens.tolist() == [3, 18, 34, 0]
    assert m.block_table.tolist() == [[1, 0, 0, 0], [2, 3, 0, 0], [4, 5, 6, 0], [0, 0, 0, 0]]
    # req 0: positions 0..2 in block 1; req 1: position 17 -> block 3 offset 1; req 2: 32, 33 -> block 6
    assert m.slot_mapping.tolist() == [16, 17, 18, 49, 96, 97] + [PAD_SLOT] * 10
    assert positions.tolist() == [0, 1, 2, 17, 32, 33]
    assert positions.dtype == torch.int64
    assert (ctx.num_reqs, ctx.num_tokens, ctx.batch_kind) == (3, 6, BatchKind.MIXED)
    assert {k: v.data_ptr() for k, v in m.tensors().items()} == ptrs  # never reallocated


def test_smaller_step_resets_rows_of_larger_previous_step(ctx):
    ctx.prepare([5, 4, 3, 4], [5, 20, 40, 64], [[1], [2, 3], [4, 5, 6], [7, 8, 9, 10]])
    positions = ctx.prepare([2], [2], [[11]])
    m = ctx.metadata
    assert m.query_start_loc.tolist() == [0, 2, 2, 2, 2]
    assert m.seq_lens.tolist() == [2, 0, 0, 0]
    assert m.block_table.tolist() == [[11, 0, 0, 0]] + [[0] * 4] * 3
    assert m.slot_mapping.tolist() == [176, 177] + [PAD_SLOT] * 14
    assert positions.tolist() == [0, 1]
    # and growing again writes the new rows fully
    ctx.prepare([1, 1, 1], [1, 2, 3], [[12], [13], [14]])
    assert m.seq_lens.tolist() == [1, 2, 3, 0]
    assert m.block_table[:, 0].tolist() == [12, 13, 14, 0] and (m.block_table[:, 1:] == 0).all()
    assert m.slot_mapping.tolist() == [192, 209, 226] + [PAD_SLOT] * 13


def test_shorter_block_table_row_resets_old_entries(ctx):
    ctx.prepare([1], [64], [[1, 2, 3, 4]])
    ctx.prepare([1], [5], [[9]])
    assert ctx.metadata.block_table[0].tolist() == [9, 0, 0, 0]


def expected_buffers(ctx, query_lens, seq_lens, tables):
    """What prepare() must leave in the buffers, request by request in plain Python."""
    qsl = [0] * (ctx.max_num_seqs + 1)
    seq = [0] * ctx.max_num_seqs
    table = [[NULL_BLOCK] * ctx.max_blocks_per_seq for _ in range(ctx.max_num_seqs)]
    slots, positions = [PAD_SLOT] * ctx.max_num_tokens, []
    for i, (q, s, blocks) in enumerate(zip(query_lens, seq_lens, tables)):
        seq[i] = s
        table[i][: len(blocks)] = blocks
        for pos in range(s - q, s):
            slots[len(positions)] = blocks[pos // ctx.block_size] * ctx.block_size + pos % ctx.block_size
            positions.append(pos)
    for i in range(ctx.max_num_seqs):
        qsl[i + 1] = qsl[i] + (query_lens[i] if i < len(query_lens) else 0)
    return dict(query_start_loc=qsl, seq_lens=seq, block_table=table, slot_mapping=slots), positions


@pytest.mark.parametrize("query_lens, kind", [([1, 1, 1], BatchKind.DECODE), ([1], BatchKind.DECODE),
                                              ([2, 1], BatchKind.MIXED), ([3], BatchKind.MIXED)])
def test_batch_kind(ctx, query_lens, kind):
    ctx.prepare(query_lens, [5] * len(query_lens), [[i + 1] for i in range(len(query_lens))])
    assert ctx.batch_kind is kind


@pytest.mark.parametrize("args, match", [
    (([1, 1], [2], [[1], [2]]), "one entry per request"),
    (([1], [2, 3], [[1]]), "one entry per request"),
    (([1], [2], [[1], [2]]), "one entry per request"),
    (([], [], []), "1 to max_num_seqs=4 requests"),
    (([1] * 5, [1] * 5, [[i + 1] for i in range(5)]), "1 to max_num_seqs=4 requests, got 5"),
    (([9, 8], [9, 8], [[1], [2]]), "1 to max_num_tokens=16 tokens, got 17"),
    (([3], [2], [[1]]), "query_len <= seq_len"),
    (([0, 1], [3, 1], [[1], [2]]), "request 0: need 1 <= query_len"),
    (([1], [65], [[1, 2, 3, 4, 5]]), "exceeds max_model_len=64"),
    (([1], [17], [[1]]), "needs 2 blocks of 16, block table has 1"),
    (([1], [3], [[]]), "needs 1 blocks"),
    (([1], [3], [[1, 2, 3, 4, 5]]), r"at most 4"),
    (([1], [3], [[0]]), "block id 0 is outside 1..16"),
    (([1, 1], [3, 20], [[1], [2, 0]]), "request 1: block id 0"),
    (([1], [3], [[17]]), "block id 17 is outside"),
    (([1], [3], [[-1]]), "block id -1 is outside"),
])
def test_validation_errors(ctx, args, match):
    before = _snapshot(ctx)
    with pytest.raises(ValueError, match=match):
        ctx.prepare(*args)
    for k, v in ctx.metadata.tensors().items():  # a rejected step leaves the buffers alone
        assert torch.equal(v, before[k]), k


def test_block_ids_past_the_needed_ones_are_validated_too(ctx):
    """Every block-table entry reaches the buffer and implementations gather whole rows (the reference impl
    reads ``kv_cache[block_table[req]]``), so an out-of-range id past the needed blocks must be rejected."""
    with pytest.raises(ValueError, match="block id 99"):
        ctx.prepare([1], [3], [[1, 99]])


def test_capture_metadata_restores_everything(ctx):
    ctx.prepare([3, 1], [3, 18], [[1], [2, 3]])
    before = _snapshot(ctx)
    state = (ctx.num_reqs, ctx.num_tokens, ctx.batch_kind)
    with ctx.capture_metadata(16, BatchKind.DECODE):
        m = ctx.metadata
        assert (ctx.num_reqs, ctx.num_tokens, ctx.batch_kind) == (4, 16, BatchKind.DECODE)
        assert m.query_start_loc.tolist() == [0, 1, 2, 3, 4]
        assert m.seq_lens.tolist() == [1, 1, 1, 1]
        assert (m.block_table == NULL_BLOCK).all() and (m.slot_mapping == PAD_SLOT).all()
    for k, v in ctx.metadata.tensors().items():
        assert torch.equal(v, before[k]), k
    assert (ctx.num_reqs, ctx.num_tokens, ctx.batch_kind) == state


def test_capture_metadata_restores_on_error(ctx):
    ctx.prepare([2], [2], [[1]])
    before = _snapshot(ctx)
    with pytest.raises(KeyError):
        with ctx.capture_metadata(2, BatchKind.MIXED):
            raise KeyError("boom")
    for k, v in ctx.metadata.tensors().items():
        assert torch.equal(v, before[k]), k
    assert ctx.num_tokens == 2


def test_model_inside_capture_metadata_writes_no_kv_cache(ctx):
    for cache in ctx.kv_caches:
        cache.normal_()
    ctx.prepare([3, 1], [3, 18], [[1], [2, 3]])
    caches = [c.clone() for c in ctx.kv_caches]
    with use_forward_context(ctx), ctx.capture_metadata(8, BatchKind.MIXED):
        q, k, v = torch.randn(8, 4, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8)
        for layer in range(2):
            out = fullgraph_backend.attention(q, k, v, layer)
            assert torch.isfinite(out).all()
    for cache, saved in zip(ctx.kv_caches, caches):
        # the null block absorbs padded writes; every block a request can own is untouched
        assert torch.equal(cache[:, NULL_BLOCK + 1:], saved[:, NULL_BLOCK + 1:])


def test_no_active_context_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no active ForwardContext"):
        get_forward_context()
    with pytest.raises(RuntimeError, match="use_forward_context"):
        fullgraph_backend.attention(torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8), 0)


def test_use_forward_context_nests(ctx):
    other = make_ctx(num_layers=1)
    with use_forward_context(ctx):
        with use_forward_context(other):
            assert get_forward_context() is other
        assert get_forward_context() is ctx


def test_attention_checks_token_count_and_layer(ctx):
    ctx.prepare([3], [3], [[1]])
    q, k = torch.randn(4, 4, 8), torch.randn(4, 2, 8)
    with use_forward_context(ctx):
        with pytest.raises(RuntimeError, match="got 4 tokens but the forward context was prepared for 3"):
            fullgraph_backend.attention(q, k, k, 0)
        with pytest.raises(IndexError, match="layer_idx 2 out of range"):
            fullgraph_backend.attention(q[:3], k[:3], k[:3], 2)
        with pytest.raises(ValueError, match="does not fit the cache"):
            fullgraph_backend.attention(q[:3], torch.randn(3, 4, 8), torch.randn(3, 4, 8), 0)


def test_context_constructor_errors():
    with pytest.raises(ValueError, match="must be positive"):
        make_ctx(max_num_tokens=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        make_ctx(block_size=8)


def test_an_unknown_attention_impl_is_named_where_attention_runs():
    ctx = make_ctx(num_layers=1, num_kv_heads=4, head_dim=8, attention_impl="nope")
    with fullgraph_backend.use_forward_context(ctx), torch.inference_mode():
        ctx.prepare([3], [3], [[1]])
        with pytest.raises(ValueError, match="unknown attention_impl 'nope'"):
            fullgraph_backend.attention(torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8), 0)


# Messages of the per-request loop that validated before the numpy version (8d2407c^), verbatim:
# several bad requests report the first; within one, the checks run in the order of these messages.
@pytest.mark.parametrize("args, message", [
    (([1, 1], [2], [[1], [2]]),
     "query_lens, seq_lens and block_tables must have one entry per request (got 2, 1, 2)"),
    (([], [], []), "a step needs 1 to max_num_seqs=4 requests, got 0"),
    (([1] * 5, [1] * 5, [[1], [2], [3], [4], [5]]), "a step needs 1 to max_num_seqs=4 requests, got 5"),
    (([9, 8], [9, 8], [[1], [2]]),
     "a step needs 1 to max_num_tokens=16 tokens, got 17; split the batch or raise max_num_tokens"),
    (([0], [0], [[]]), "a step needs 1 to max_num_tokens=16 tokens, got 0; split the batch or raise max_num_tokens"),
    (([3], [2], [[1]]), "request 0: need 1 <= query_len <= seq_len, got query_len=3, seq_len=2"),
    (([-1, 2], [3, 1], [[1], [2]]), "request 0: need 1 <= query_len <= seq_len, got query_len=-1, seq_len=3"),
    (([1], [65], [[1, 2, 3, 4, 5]]), "request 0: seq_len 65 exceeds max_model_len=64"),
    (([1], [17], [[1]]), "request 0: seq_len 17 needs 2 blocks of 16, block table has 1 (at most 4)"),
    (([1], [3], [[]]), "request 0: seq_len 3 needs 1 blocks of 16, block table has 0 (at most 4)"),
    (([1], [3], [[1, 2, 3, 4, 5]]), "request 0: seq_len 3 needs 1 blocks of 16, block table has 5 (at most 4)"),
    (([1, 1], [3, 20], [[1], [2, 0]]), "request 1: block id 0 is outside 1..16 (block 0 is reserved)"),
    (([1], [3], [[1, 17, -1]]), "request 0: block id 17 is outside 1..16 (block 0 is reserved)"),
    (([1, 2, 1], [3, 1, 99], [[0], [2], [3]]), "request 0: block id 0 is outside 1..16 (block 0 is reserved)"),
    (([1, 2, 1], [3, 1, 99], [[1], [2], [3]]),
     "request 1: need 1 <= query_len <= seq_len, got query_len=2, seq_len=1"),
    (([1, 1, 1], [3, 5, 99], [[1], [2], [3]]), "request 2: seq_len 99 exceeds max_model_len=64"),
    (([1, 1], [3, 99], [[1], []]), "request 1: seq_len 99 exceeds max_model_len=64"),
    (([1, 1], [3, 40], [[1], [2, 0]]), "request 1: seq_len 40 needs 3 blocks of 16, block table has 2 (at most 4)"),
    (([1, 1], [3, 40], [[1], [2, 0, 3, 4, 5]]),
     "request 1: seq_len 40 needs 3 blocks of 16, block table has 5 (at most 4)"),
])
def test_validation_messages_are_exact(ctx, args, message):
    with pytest.raises(ValueError) as info:
        ctx.prepare(*args)
    assert str(info.value) == message


def reference_error(ctx, query_lens, seq_lens, tables):
    """The message prepare() must raise for a step, one request and one block at a time; None if valid."""
    n = len(query_lens)
    if not n == len(seq_lens) == len(tables):
        return (f"query_lens, seq_lens and block_tables must have one entry per request "
                f"(got {n}, {len(seq_lens)}, {len(tables)})")
    if not 1 <= n <= ctx.max_num_seqs:
        return f"a step needs 1 to max_num_seqs={ctx.max_num_seqs} requests, got {n}"
    if not 1 <= sum(query_lens) <= ctx.max_num_tokens:
        return (f"a step needs 1 to max_num_tokens={ctx.max_num_tokens} tokens, got {sum(query_lens)}; "
                f"split the batch or raise max_num_tokens")
    for i, (q, s, blocks) in enumerate(zip(query_lens, seq_lens, tables)):
        if not 1 <= q <= s:
            return f"request {i}: need 1 <= query_len <= seq_len, got query_len={q}, seq_len={s}"
        if s > ctx.max_model_len:
            return f"request {i}: seq_len {s} exceeds max_model_len={ctx.max_model_len}"
        need = -(-s // ctx.block_size)
        if not need <= len(blocks) <= ctx.max_blocks_per_seq:
            return (f"request {i}: seq_len {s} needs {need} blocks of {ctx.block_size}, "
                    f"block table has {len(blocks)} (at most {ctx.max_blocks_per_seq})")
        for b in blocks:
            if not NULL_BLOCK < b < ctx.num_blocks:
                return f"request {i}: block id {b} is outside 1..{ctx.num_blocks - 1} (block {NULL_BLOCK} is reserved)"
    return None


@st.composite
def contexts(draw):
    return make_ctx(num_layers=1, num_kv_heads=1, max_num_seqs=draw(st.integers(1, 6)),
                    max_num_tokens=draw(st.integers(1, 40)), max_model_len=draw(st.integers(1, 100)),
                    block_size=draw(st.sampled_from([16, 32])), num_blocks=draw(st.sampled_from([None, 2, 5, 40])))


@st.composite
def steps(draw, ctx):
    """A valid step for ``ctx``, then up to two requests spoiled (a spoiled step is almost always invalid)."""
    n = draw(st.integers(1, ctx.max_num_seqs))
    most = max(1, min(ctx.max_num_tokens // n, ctx.max_model_len))
    query_lens = [draw(st.integers(1, most)) for _ in range(n)]
    seq_lens = [q + draw(st.integers(0, ctx.max_model_len - q)) for q in query_lens]
    block_ids = st.integers(NULL_BLOCK + 1, ctx.num_blocks - 1)
    tables = [draw(st.lists(block_ids, min_size=-(-s // ctx.block_size), max_size=ctx.max_blocks_per_seq))
              for s in seq_lens]
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, n - 1))
        spoil = draw(st.sampled_from(["query", "seq", "short", "long", "block"]))
        if spoil == "query":
            query_lens[i] = draw(st.sampled_from([0, -1, seq_lens[i] + 1]))
        elif spoil == "seq":
            seq_lens[i] = draw(st.sampled_from([query_lens[i] - 1, ctx.max_model_len + 1, ctx.max_model_len + 40]))
        elif spoil == "short":
            tables[i] = tables[i][: draw(st.integers(0, max(0, -(-seq_lens[i] // ctx.block_size) - 1)))]
        elif spoil == "long":
            tables[i] = tables[i] + [NULL_BLOCK + 1] * (ctx.max_blocks_per_seq + 1 - len(tables[i]))
        elif spoil == "block":
            bad = draw(st.sampled_from([NULL_BLOCK, -1, ctx.num_blocks, ctx.num_blocks + 7]))
            j = draw(st.integers(0, len(tables[i])))
            tables[i] = tables[i][:j] + [bad] + tables[i][j + 1:]
    if draw(st.integers(0, 9)) == 0:
        draw(st.sampled_from([query_lens, seq_lens, tables])).pop()
    return query_lens, seq_lens, tables


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_prepare_matches_per_request_references_on_valid_and_invalid_steps(data):
    """Random geometries and step sequences: same messages as the per-request checks; a rejected step
    leaves everything as it was; an accepted one leaves exactly the reference buffers, staging included."""
    ctx = data.draw(contexts())
    want, state = expected_buffers(ctx, [], [], [])[0], (0, 0, ctx.batch_kind)
    for _ in range(data.draw(st.integers(1, 6))):
        query_lens, seq_lens, tables = data.draw(steps(ctx))
        error = reference_error(ctx, query_lens, seq_lens, tables)
        if error is not None:
            with pytest.raises(ValueError) as info:
                ctx.prepare(query_lens, seq_lens, tables)
            assert str(info.value) == error
        else:
            positions = ctx.prepare(query_lens, seq_lens, tables)
            want, want_positions = expected_buffers(ctx, query_lens, seq_lens, tables)
            assert positions.tolist() == want_positions
            kind = BatchKind.DECODE if all(q == 1 for q in query_lens) else BatchKind.MIXED
            state = (len(query_lens), sum(query_lens), kind)
        assert (ctx.num_reqs, ctx.num_tokens, ctx.batch_kind) == state
        for buffers in (ctx.metadata, ctx._staging):
            assert {k: v.tolist() for k, v in buffers.tensors().items()} == want

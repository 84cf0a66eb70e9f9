"""The reference paged attention against a naive per-request computation."""
from __future__ import annotations

import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

import fullgraph_backend
from fullgraph_backend import NULL_BLOCK, use_forward_context
from fullgraph_backend.attention.reference import reference_attention

from helpers import make_ctx, naive_attention

MAX_LEN = 64


def _setup(query_lens, seq_lens, kv_heads, group, *, seed=0, head_dim=8, max_num_tokens=64, max_num_seqs=6):
    ctx = make_ctx(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, max_num_seqs=max_num_seqs,
                   max_num_tokens=max_num_tokens, max_model_len=MAX_LEN)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ctx.kv_caches[0].copy_(torch.randn(ctx.kv_caches[0].shape, generator=gen))  # cached context (and garbage)
    # each request owns distinct, shuffled blocks: its table is not contiguous
    free = list(range(1, ctx.num_blocks))
    rng.shuffle(free)
    tables = []
    for s in seq_lens:
        need = -(-s // ctx.block_size)
        tables.append([free.pop() for _ in range(need)])
    n = sum(query_lens)
    q = torch.randn(n, kv_heads * group, head_dim, generator=gen)
    k = torch.randn(n, kv_heads, head_dim, generator=gen)
    v = torch.randn(n, kv_heads, head_dim, generator=gen)
    return ctx, tables, q, k, v


def _check(query_lens, seq_lens, kv_heads=2, group=1, window=0, seed=0):
    ctx, tables, q, k, v = _setup(query_lens, seq_lens, kv_heads, group, seed=seed)
    cache = ctx.kv_caches[0]
    before = cache.clone()
    ctx.prepare(query_lens, seq_lens, tables)
    slots = ctx.metadata.slot_mapping[: sum(query_lens)].clone()
    with use_forward_context(ctx):
        out = fullgraph_backend.attention(q, k, v, 0, sliding_window=window or None)
    # the new K/V landed in their slots, nothing else changed
    flat = cache.flatten(1, 2)
    torch.testing.assert_close(flat[0, slots], k, rtol=0, atol=0)
    torch.testing.assert_close(flat[1, slots], v, rtol=0, atol=0)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], before.flatten(1, 2)[:, untouched])
    expected = naive_attention(q, cache[0], cache[1], query_lens, seq_lens, tables, ctx.block_size,
                               q.shape[-1] ** -0.5, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill(group):
    _check([5, 17, 1, 33], [5, 17, 1, 33], group=group)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode(group):
    _check([1, 1, 1, 1], [1, 16, 17, 64], group=group)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_mixed_chunked_prefill_and_decode(group):
    _check([4, 1, 9, 1], [20, 33, 9, 48], group=group)


@pytest.mark.parametrize("window", [1, 4, 16, 100])
def test_sliding_window(window):
    _check([6, 1, 3], [6, 40, 35], window=window, group=2)


def test_window_one_attends_only_to_itself():
    out = _check([3], [3], window=1, kv_heads=1, group=1)
    ctx, tables, q, k, v = _setup([3], [3], 1, 1)
    torch.testing.assert_close(out, v, atol=1e-6, rtol=0)  # softmax over one key is that key's value


def test_explicit_scale():
    ctx, tables, q, k, v = _setup([4, 2], [10, 2], 2, 2)
    ctx.prepare([4, 2], [10, 2], tables)
    with use_forward_context(ctx):
        out = fullgraph_backend.attention(q, k, v, 0, scale=0.3)
    cache = ctx.kv_caches[0]
    expected = naive_attention(q, cache[0], cache[1], [4, 2], [10, 2], tables, ctx.block_size, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad_to", [7, 8, 16])
def test_padded_tokens_give_zeros_and_write_only_null_block(pad_to):
    query_lens, seq_lens = [3, 1, 2], [3, 18, 40]
    ctx, tables, q, k, v = _setup(query_lens, seq_lens, 2, 2)
    n = sum(query_lens)
    cache = ctx.kv_caches[0]
    ctx.prepare(query_lens, seq_lens, tables)
    m = ctx.metadata
    # reference result at the exact size, from a copy of the cache
    exact_cache = cache.clone()
    exact = reference_attention(q, k, v, exact_cache, m.query_start_loc, m.seq_lens, m.block_table,
                                m.slot_mapping, 8 ** -0.5, 0)
    # padded lanes hold garbage, as a static buffer's stale rows would
    gen = torch.Generator().manual_seed(5)
    qp = torch.cat([q, 100 * torch.randn(pad_to - n, *q.shape[1:], generator=gen)])
    kp = torch.cat([k, 100 * torch.randn(pad_to - n, *k.shape[1:], generator=gen)])
    vp = torch.cat([v, 100 * torch.randn(pad_to - n, *v.shape[1:], generator=gen)])
    out = reference_attention(qp, kp, vp, cache, m.query_start_loc, m.seq_lens, m.block_table,
                              m.slot_mapping, 8 ** -0.5, 0)
    torch.testing.assert_close(out[:n], exact, atol=1e-6, rtol=0)
    assert (out[n:] == 0).all()
    # padding wrote nothing outside the null block
    assert torch.equal(cache[:, NULL_BLOCK + 1:], exact_cache[:, NULL_BLOCK + 1:])


def test_output_dtype_follows_query():
    ctx, tables, q, k, v = _setup([2], [2], 2, 1)
    ctx.kv_caches[0] = ctx.kv_caches[0].to(torch.bfloat16)
    ctx.prepare([2], [2], tables)
    with use_forward_context(ctx):
        out = fullgraph_backend.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


@st.composite
def batches(draw):
    reqs = draw(st.integers(1, 6))
    query_lens, seq_lens = [], []
    budget = 32
    for _ in range(reqs):
        if budget == 0:
            break
        decode = draw(st.booleans())
        q = 1 if decode else draw(st.integers(1, min(budget, 12)))
        budget -= q
        query_lens.append(q)
        seq_lens.append(q + draw(st.integers(0, MAX_LEN - q)))
    group = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([1, 2]))
    window = draw(st.sampled_from([0, 0, 1, 5, 17]))
    return query_lens, seq_lens, kv_heads, group, window, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_random_batches(batch):
    query_lens, seq_lens, kv_heads, group, window, seed = batch
    _check(query_lens, seq_lens, kv_heads=kv_heads, group=group, window=window, seed=seed)


def test_non_finite_stale_slots_are_never_read():
    """Slots no query may see (other requests' blocks, the null block, owned slots past seq_len)
    can hold inf/NaN, e.g. left by an overflowed earlier request; a probability of 0 must not turn
    them into NaN."""
    query_lens, seq_lens = [3, 1], [3, 21]
    ctx, tables, q, k, v = _setup(query_lens, seq_lens, 2, 2)
    ctx.prepare(query_lens, seq_lens, tables)
    m = ctx.metadata
    flat = ctx.kv_caches[0].flatten(1, 2)
    visible = torch.zeros(flat.shape[1], dtype=torch.bool)
    for table, length in zip(tables, seq_lens):
        pos = torch.arange(length)
        visible[torch.tensor(table)[pos // ctx.block_size] * ctx.block_size + pos % ctx.block_size] = True
    clean = ctx.kv_caches[0].clone()
    flat[0, ~visible] = float("inf")
    flat[1, ~visible] = float("nan")
    args = (m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping, 8 ** -0.5, 0)
    expected = reference_attention(q, k, v, clean, *args)
    out = reference_attention(q, k, v, ctx.kv_caches[0], *args)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_inductor_passes_q_and_k_in_the_layout_it_computed_them_in():
    """The op is tagged ``flexible_layout`` (it reads q, k and v through their strides): q and k that
    Inductor computes in transformers' ``[heads, tokens, head_dim]`` layout reach it as transposed
    views of those buffers, with no kernel writing them in the traced ``[tokens, heads, head_dim]``
    (such a kernel would be named after the op); the output is eager's."""
    ctx, tables, q, k, v = _setup([3, 2], [5, 2], 2, 2)
    ctx.prepare([3, 2], [5, 2], tables)
    m = ctx.metadata

    def step(q, k, v, cache):
        # elementwise on heads-major views, as transformers' RoPE: eager keeps the memory order of
        # [tokens, heads, head_dim], Inductor writes the result as [heads, tokens, head_dim]
        q, k = ((t.transpose(0, 1) * 2).transpose(0, 1) for t in (q, k))
        return reference_attention(q, k, v, cache, m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping,
                                   0.3, 0)

    expected = step(q, k, v, ctx.kv_caches[0].clone())
    with torch._inductor.config.patch(fx_graph_cache=False):  # an op's tags are not in its cache key
        got, (code,) = run_and_get_code(torch.compile(step, fullgraph=True), q, k, v, ctx.kv_caches[0].clone())
    torch.testing.assert_close(got, expected)
    tokens, heads, dim = q.shape
    heads_major = rf"reinterpret_tensor\(\w+, \({tokens}, {heads}, {dim}\), \({dim}, {tokens * dim}, 1\), 0\)"
    assert re.search(rf"reference_attention\.default\({heads_major}, ", code), code
    assert not [name for name in re.findall(r"\w*fused\w*", code) if "reference_attention" in name]

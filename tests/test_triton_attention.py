"""The Triton paged-attention op against the reference op (CPU: Triton's interpreter, TRITON_INTERPRET=1).

Every case runs both ops on their own clone of one random cache and compares the outputs and the
caches afterwards. Shapes are tiny: the interpreter runs each Triton program in Python.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch

from fullgraph_backend import use_forward_context
from fullgraph_backend.attention import triton_paged
from fullgraph_backend.attention.reference import reference_attention
from fullgraph_backend.attention.registry import get_impl, resolve_impl
from fullgraph_backend.attention.triton_paged import decode_segments, launch_plan, paged_attention, triton_attention
from fullgraph_backend.forward_context import BatchKind, ForwardContext
from fullgraph_backend.kv_cache import NULL_BLOCK, PAD_SLOT

from helpers import run_compiler_script

MAX_LEN = 256


def _batch(query_lens, seq_lens, *, kv_heads=2, group=2, head_dim=64, block_size=16, dtype=torch.float32,
           pad_tokens=0, max_num_seqs=6, layout="fused", seed=0):
    """A prepared context (shuffled block tables), its random cache, and q/k/v of the padded size.

    ``layout``: ``fused``, strided views into one QKV projection output, as models pass them;
    ``contiguous``; ``heads_major``, ``[tokens, heads, head_dim]`` views of ``[heads, tokens,
    head_dim]`` buffers, as Inductor passes transformers' RoPE output to the op (flexible layout).
    """
    ctx = ForwardContext(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                         max_num_seqs=max_num_seqs, max_num_tokens=512, max_model_len=MAX_LEN,
                         block_size=block_size, attention_impl="reference")
    gen = torch.Generator().manual_seed(seed)
    cache = ctx.kv_caches[0]
    cache.copy_(torch.randn(cache.shape, generator=gen))
    free = list(range(NULL_BLOCK + 1, ctx.num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    ctx.prepare(query_lens, seq_lens, tables)
    tokens = sum(query_lens) + pad_tokens
    q_heads = kv_heads * group
    if layout == "fused":
        qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    elif layout == "heads_major":
        q, k, v = (torch.randn(heads, tokens, head_dim, generator=gen).to(dtype).transpose(0, 1)
                   for heads in (q_heads, kv_heads, kv_heads))
    else:
        q = torch.randn(tokens, q_heads, head_dim, generator=gen).to(dtype)
        k = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    return ctx, q, k, v


def _args(ctx, q, k, v, cache, window):
    m = ctx.metadata
    return (q, k, v, cache, m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping,
            q.shape[-1] ** -0.5, window)


def _check(ctx, q, k, v, window=0, run=None):
    """Triton (``run``, default the unified kernel) vs reference: outputs, padded rows, caches."""
    cache = ctx.kv_caches[0]
    ours, theirs = cache.clone(), cache.clone()
    expected = reference_attention(*_args(ctx, q, k, v, theirs, window))
    out = (run or paged_attention)(*_args(ctx, q, k, v, ours, window))
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    tol = dict(atol=2e-5, rtol=2e-5) if q.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, expected, **tol)
    assert not out[ctx.num_tokens:].any(), "padded tokens must get zeros"
    # the reference redirects padded tokens into the null block; ours skips them entirely
    assert torch.equal(ours[:, NULL_BLOCK + 1:], theirs[:, NULL_BLOCK + 1:])
    assert torch.equal(ours[:, NULL_BLOCK], cache[:, NULL_BLOCK])
    return out


def _split(num_segments, **config):
    return lambda *args: paged_attention(*args, split_kv=True, num_segments=num_segments, _config=config)


# ---- unified kernel ---------------------------------------------------------------------------
@pytest.mark.parametrize("group, head_dim, block_size, kv_heads", [
    (1, 64, 16, 2), (2, 128, 32, 2), (4, 64, 32, 2), (8, 64, 16, 1), (3, 64, 16, 2),
])
def test_prefill(group, head_dim, block_size, kv_heads):
    _check(*_batch([5, 17, 1, 33], [5, 17, 1, 33], group=group, head_dim=head_dim, block_size=block_size,
                   kv_heads=kv_heads))


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_decode_unified(group):
    _check(*_batch([1, 1, 1, 1], [1, 16, 17, 100], group=group, kv_heads=1 if group == 8 else 2))


@pytest.mark.parametrize("group, block_size", [(1, 32), (4, 16)])
def test_mixed_chunked_prefill_and_decode(group, block_size):
    _check(*_batch([4, 1, 9, 1, 20], [20, 33, 9, 48, 90], group=group, block_size=block_size))


@pytest.mark.parametrize("window", [1, 5, 16, 100])
def test_sliding_window(window):
    _check(*_batch([6, 1, 30], [6, 70, 35], group=2), window=window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    _check(*_batch([4, 1, 9, 1], [20, 33, 9, 48], group=4, head_dim=128, block_size=32, dtype=dtype))


@pytest.mark.parametrize("layout", ["contiguous", "heads_major"])
def test_input_layouts(layout):
    # both kernels read q, k and v through their strides, so the op may take any layout from Inductor
    assert torch.Tag.flexible_layout in triton_attention.tags
    _check(*_batch([3, 1, 7], [3, 40, 7], layout=layout))
    _check(*_batch([1, 1, 1], [3, 40, 97], layout=layout), run=_split(2))


def test_padded_tokens_and_requests():
    # 3 real requests of 6 (3 padded: query length 0, seq_len 0), 5 padded tokens with PAD_SLOT
    ctx, q, k, v = _batch([2, 1, 3], [9, 17, 3], pad_tokens=5)
    assert (ctx.metadata.slot_mapping[6:11] == PAD_SLOT).all()
    _check(ctx, q, k, v)


def test_more_tokens_than_request_rows():
    # T > max_num_seqs: only min(T, max_num_seqs) requests exist, the rest of T is padding
    _check(*_batch([1, 1, 1, 1], [5, 20, 33, 64], max_num_seqs=4, pad_tokens=6))
    _check(*_batch([2, 1, 1, 1], [5, 20, 33, 64], max_num_seqs=4, pad_tokens=6))


def test_large_prefill_tile():
    # >= 256 tokens in 16-bit takes the 64-row query tile
    ctx, q, k, v = _batch([200, 60], [200, 100], group=4, kv_heads=1, dtype=torch.bfloat16, max_num_seqs=2)
    assert triton_paged._block_m(4, q.shape[0], False, q.dtype) == 64
    _check(ctx, q, k, v, window=50)


# ---- split-KV decode --------------------------------------------------------------------------
@pytest.mark.parametrize("group, segments, window", [
    (1, 2, 0), (4, 4, 0), (8, 8, 0), (2, 4, 20), (4, 16, 0), (2, 1, 0), (4, 1, 20), (8, 1, 0),
])
def test_split_kv_decode(group, segments, window):
    # contexts from 1 token (most segments empty) to several tiles per segment
    ctx, q, k, v = _batch([1] * 5, [1, 16, 17, 100, 128], group=group, kv_heads=1 if group == 8 else 2,
                          pad_tokens=2)
    _check(ctx, q, k, v, window=window, run=_split(segments))


@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("dtype, head_dim, block_size", [(torch.bfloat16, 128, 32), (torch.float32, 128, 16)])
def test_split_kv_dtypes(dtype, head_dim, block_size, segments):
    _check(*_batch([1, 1, 1], [3, 50, 97], group=4, head_dim=head_dim, block_size=block_size, dtype=dtype),
           run=_split(segments))


@pytest.mark.parametrize("group, segments, window, dtype, block_size, head_dim", [
    (4, 1, 0, torch.bfloat16, 16, 64), (4, 4, 20, torch.float16, 16, 128), (2, 8, 0, torch.float32, 32, 64),
    (8, 2, 0, torch.bfloat16, 16, 64),
])
def test_split_kv_page_tiles(group, segments, window, dtype, block_size, head_dim):
    # K/V read a whole cache block a tile through tensor descriptors (the sm_90 narrow plan's path)
    ctx, q, k, v = _batch([1] * 5, [1, 16, 17, 100, 128], group=group, kv_heads=1 if group == 8 else 2,
                          dtype=dtype, block_size=block_size, head_dim=head_dim, pad_tokens=2)
    _check(ctx, q, k, v, window=window, run=_split(segments, page_tiles=True))


def test_page_tiles_on_a_misaligned_cache_gather_instead():
    # a cache view one element into its storage cannot be a TMA base: the same plan, gathered tiles
    ctx, q, k, v = _batch([1, 1, 1], [3, 40, 97], dtype=torch.bfloat16, head_dim=64)
    cache = ctx.kv_caches[0]
    shifted = torch.empty(cache.numel() + 1, dtype=cache.dtype)[1:].view(cache.shape).copy_(cache)
    assert shifted.data_ptr() % 16
    expected_cache = cache.clone()
    expected = reference_attention(*_args(ctx, q, k, v, expected_cache, 0))
    out = _split(2, page_tiles=True)(*_args(ctx, q, k, v, shifted, 0))
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(shifted[:, NULL_BLOCK + 1:], expected_cache[:, NULL_BLOCK + 1:])
    assert shifted not in triton_paged._DESCRIPTORS


def test_page_tile_descriptors_are_built_once_and_dropped_with_the_cache():
    import gc
    import weakref

    ctx, q, k, v = _batch([1, 1], [20, 40], dtype=torch.bfloat16, head_dim=64)
    cache = ctx.kv_caches[0].clone()
    run = _split(2, page_tiles=True)
    run(*_args(ctx, q, k, v, cache, 0))
    descs = triton_paged._DESCRIPTORS[cache]
    run(*_args(ctx, q, k, v, cache, 0))
    assert triton_paged._DESCRIPTORS[cache] is descs
    storage = weakref.ref(descs[0].base)
    del cache, descs
    gc.collect()
    assert storage() is None, "the descriptors must not keep a dropped cache's memory alive"


@pytest.mark.parametrize("segments", [1, 2])
def test_split_kv_more_tokens_than_request_rows(segments):
    # T > max_num_seqs in a decode graph: segment-0 programs also serve tokens req + i * num_reqs
    _check(*_batch([1, 1, 1], [5, 20, 64], max_num_seqs=4, pad_tokens=7), run=_split(segments))


@pytest.mark.parametrize("config", [dict(BLOCK_N=16), dict(BLOCK_N=32, num_warps=2), dict(BLOCK_N=128),
                                    dict(min_segment_tokens=32)])
def test_config_overrides(config):
    # tile sizes other than the default, for both kernels (the page lookup is per key position)
    ctx, q, k, v = _batch([1, 1, 1, 1], [1, 17, 100, 200], group=4, pad_tokens=1)
    _check(ctx, q, k, v, run=lambda *a: paged_attention(*a, split_kv=True, _config=config))
    _check(ctx, q, k, v, window=33, run=lambda *a: paged_attention(*a, split_kv=True, _config=config))
    _check(*_batch([5, 1, 40], [5, 70, 90], group=2), run=lambda *a: paged_attention(*a, _config=config))


def test_op_picks_split_kv_only_for_the_contexts_decode_batch():
    ctx, q, k, v = _batch([1, 1, 1], [3, 50, 97], group=4, pad_tokens=1)
    m = ctx.metadata
    assert ctx.batch_kind is BatchKind.DECODE
    assert not triton_paged.uses_split_kv(m.query_start_loc, q.shape[0])  # no active context
    with use_forward_context(ctx):
        assert triton_paged.uses_split_kv(m.query_start_loc, q.shape[0])
        assert not triton_paged.uses_split_kv(m.query_start_loc.clone(), q.shape[0])  # not its buffers
        with pytest.raises(RuntimeError, match="prepare"):
            triton_paged.uses_split_kv(m.query_start_loc, 2)
        _check(ctx, q, k, v, run=triton_attention)
        ctx.batch_kind = BatchKind.MIXED
        assert not triton_paged.uses_split_kv(m.query_start_loc, q.shape[0])
        _check(ctx, q, k, v, run=triton_attention)


def test_decode_segments():
    cpu = torch.device("cpu")
    counts = [decode_segments(n, 8, 1 << 20, cpu) for n in (1, 2, 4, 8, 64, 1024)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 1 and counts[-1] == 1
    assert all(1 <= c <= triton_paged.MAX_SEGMENTS and c & (c - 1) == 0 for c in counts)
    # the graph's KV bound caps the count: the bound's min_segment_tokens chunks, rounded up to a
    # power of two (no segment spans two chunks; the last ones may be empty)
    bounds = (64, 256, 511, 512, 577, 1008, 1024, 4096, 1 << 20)
    by_bound = [decode_segments(1, 2, bound, cpu, min_segment_tokens=256) for bound in bounds]
    assert by_bound == sorted(by_bound) and by_bound[:6] == [1, 1, 2, 2, 4, 4] and by_bound[-1] > 4
    default = [decode_segments(1, 2, bound, cpu) for bound in bounds]
    target = triton_paged.PROGRAMS_PER_SM * triton_paged.sm_count(cpu)
    for c, bound in zip(default, bounds):
        chunks = -(-bound // triton_paged.MIN_SEGMENT_TOKENS)
        stopped_by_sms = 1 * 2 * (2 * c) > target
        assert c >= chunks or c == triton_paged.MAX_SEGMENTS or stopped_by_sms  # one chunk a segment at most
        assert c < 2 * chunks  # and no doubling past that
    assert default[4] == 8  # Llama-3.2-1B at the engine bench's bound: five chunks, eight segments
    assert decode_segments(1, 2, triton_paged.MIN_SEGMENT_TOKENS, cpu) == 1
    assert decode_segments(1, 2, triton_paged.MIN_SEGMENT_TOKENS + 1, cpu) == 2
    assert decode_segments(1, 2, 4096, cpu, min_segment_tokens=4096) == 1
    assert decode_segments(1, 2, 4096, cpu, min_segment_tokens=1024) < decode_segments(1, 2, 4096, cpu)
    # the launch stays within PROGRAMS_PER_SM programs per SM
    target = triton_paged.PROGRAMS_PER_SM * triton_paged.sm_count(cpu)
    assert all(n * 8 * c <= max(target, n * 8) for n, c in zip((1, 2, 4, 8, 64, 1024), counts))


def test_launch_plan():
    """Uniform decode: one launch with any number of segments; mixed: store + unified."""
    ctx, q, k, v = _batch([1, 1, 1], [3, 50, 97], group=4)
    m, bs = ctx.metadata, ctx.block_size
    plan = functools.partial(launch_plan, q, 2, m.block_table, bs, m.seq_lens.shape[0])
    one = {"min_segment_tokens": MAX_LEN}  # the graph's bound (block_table width x block size) is MAX_LEN
    assert m.block_table.shape[1] * bs == MAX_LEN
    assert (plan(split_kv=True, _config=one)["kernel"], plan(split_kv=True, _config=one)["launches"]) == ("split", 1)
    assert plan(split_kv=True)["segments"] == decode_segments(3, 2, MAX_LEN, q.device)
    assert (plan(split_kv=True, num_segments=4)["kernel"], plan(split_kv=True, num_segments=4)["launches"]) == \
        ("split", 1)
    assert plan(split_kv=True, _config={"min_segment_tokens": 16})["segments"] > 1
    assert (plan(split_kv=False)["kernel"], plan(split_kv=False)["launches"]) == ("unified", 2)
    config = {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "segments": 8}
    got = plan(split_kv=True, _config=config)
    assert {key: got[key] for key in config} == config
    with pytest.raises(ValueError, match="unknown _config"):
        plan(split_kv=True, _config={"block_n": 32})
    with pytest.raises(ValueError, match="power of two"):
        plan(split_kv=True, _config={"segments": 3})


def test_launch_plan_page_tiles(monkeypatch):
    """Page tiles: only for the narrow plan with 16-token blocks where TMA was measured (sm_90), or
    when forced; one cache block a tile, PAGE_TILE_STAGES deep; illegal boxes are refused."""
    table = torch.zeros(64, 64, dtype=torch.int32)
    wide = torch.empty(40, 8, 128, dtype=torch.bfloat16)  # 40 requests x 2 KV heads: the narrow plan
    small = torch.empty(1, 8, 128, dtype=torch.bfloat16)
    plan = functools.partial(launch_plan, kv_heads=2, block_table=table, max_num_seqs=64, split_kv=True)
    assert not plan(wide, block_size=16)["page_tiles"]  # the CPU has no TMA
    monkeypatch.setattr(triton_paged, "_has_tma", lambda device: True)
    got = plan(wide, block_size=16)
    assert got["page_tiles"] and got["BLOCK_N"] == 16 and got["num_stages"] == triton_paged.PAGE_TILE_STAGES
    assert got["num_warps"] == triton_paged.NARROW_WARPS
    assert not plan(wide, block_size=32)["page_tiles"]  # unmeasured block size: gathered tiles
    assert not plan(small, block_size=16)["page_tiles"]  # the 4-warp plan
    assert not plan(wide.float(), block_size=16)["page_tiles"]
    assert not launch_plan(wide, 2, table, 16, 64, split_kv=False)["page_tiles"]
    assert not plan(wide, block_size=16, _config={"page_tiles": False})["page_tiles"]
    forced = plan(small, block_size=32, _config={"page_tiles": True, "num_stages": 3})
    assert forced["page_tiles"] and forced["BLOCK_N"] == 32 and forced["num_stages"] == 3
    with pytest.raises(ValueError, match="power-of-two block_size"):
        plan(small, block_size=48, _config={"page_tiles": True})
    with pytest.raises(ValueError, match="BLOCK_N must be the block size"):
        plan(small, block_size=16, _config={"page_tiles": True, "BLOCK_N": 64})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_launch_plan_narrow_decode(dtype):
    """(request, KV head) pairs reaching a quarter of the SMs: 16-bit decode takes the narrow
    program (fewer warps, half-size tiles, twice the programs per SM); below, the 4-warp one."""
    cpu = torch.device("cpu")
    sms = triton_paged.sm_count(cpu)
    kv_heads, head_dim = 2, 128
    table = torch.zeros(64, 64, dtype=torch.int32)  # bound 1024 tokens at block size 16
    elem = torch.finfo(dtype).bits // 8
    for reqs in (sms // (4 * kv_heads) - 1, sms // (4 * kv_heads), 40):
        q = torch.empty(reqs, kv_heads * 4, head_dim, dtype=dtype)
        plan = launch_plan(q, kv_heads, table, 16, 64, split_kv=True)
        narrow = 4 * reqs * kv_heads >= sms and dtype != torch.float32
        per_sm = triton_paged.NARROW_PROGRAMS_PER_SM if narrow else triton_paged.PROGRAMS_PER_SM
        assert plan["num_warps"] == (triton_paged.NARROW_WARPS if narrow else 4)
        assert plan["BLOCK_N"] == min(128, (16384 if narrow else 32768) // (head_dim * elem))
        assert plan["segments"] == decode_segments(reqs, kv_heads, 1024, cpu, programs_per_sm=per_sm)
        assert reqs * kv_heads * plan["segments"] <= max(per_sm * sms, reqs * kv_heads)
        assert launch_plan(q, kv_heads, table, 16, 64, split_kv=False)["num_warps"] == 4


def test_split_kv_scratch_is_allocated_once_per_shape():
    ctx, q, k, v = _batch([1, 1], [3, 40])
    args = _args(ctx, q, k, v, ctx.kv_caches[0].clone(), 0)
    paged_attention(*args, split_kv=True, num_segments=4)
    before = {key: tuple(t.data_ptr() for t in bufs) for key, bufs in triton_paged._SCRATCH.items()}
    paged_attention(*args, split_kv=True, num_segments=4)
    after = {key: tuple(t.data_ptr() for t in bufs) for key, bufs in triton_paged._SCRATCH.items()}
    assert before == after


def test_split_kv_merge_ignores_stale_scratch():
    """Empty segments write only their max; the merge reads every segment's acc and sum and must drop
    theirs by select, so NaN left in the scratch by anything before cannot reach the output."""
    ctx, q, k, v = _batch([1] * 3, [1, 20, 130], group=4)
    run = _split(16, BLOCK_N=16)
    run(*_args(ctx, q, k, v, ctx.kv_caches[0].clone(), 0))  # allocates this shape's scratch
    for acc, seg_max, seg_sum, _ in triton_paged._SCRATCH.values():
        acc.fill_(float("nan"))
        seg_max.fill_(float("nan"))
        seg_sum.fill_(float("nan"))
    out = _check(ctx, q, k, v, run=run)
    assert not out.isnan().any()


# ---- the K/V store: fused into split-KV decode, its own launch before the unified kernel -------------
def _run_kind(kind):
    """``(name, runner)``: unified, split-KV with one segment, split-KV with four merged in-launch."""
    return {"unified": paged_attention, "split-1": _split(1), "split-4": _split(4)}[kind]


_DECODE_BATCH = ([1, 1, 1, 1], [1, 16, 17, 100])
_MIXED_BATCH = ([4, 1, 37, 1, 20], [20, 33, 37, 48, 90])  # a 37-token prefill spans several query blocks


def _redirect_new_slots(ctx):
    """Point the step's real tokens at shuffled slots of spare blocks and fill their old slots
    (still the new tokens' positions in the block table) with NaN. Returns the new slots."""
    cache, m = ctx.kv_caches[0], ctx.metadata
    n = ctx.num_tokens
    used = {int(b) for b in m.block_table[: ctx.num_reqs].flatten()}
    spare = [b for b in range(NULL_BLOCK + 1, ctx.num_blocks) if b not in used]
    blocks = -(-n // ctx.block_size)
    new_slots = (torch.tensor(spare[:blocks]).repeat_interleave(ctx.block_size) * ctx.block_size
                 + torch.arange(ctx.block_size).repeat(blocks))[torch.randperm(blocks * ctx.block_size)]
    cache.flatten(1, 2)[:, m.slot_mapping[:n].clone()] = float("nan")
    m.slot_mapping[:n] = new_slots[:n]
    return new_slots[:n]


@pytest.mark.parametrize("kind, window", [("split-1", 0), ("split-1", 20), ("split-4", 0), ("split-4", 20)])
def test_new_keys_come_from_the_inputs(kind, window):
    """Split-KV decode: no program reads this step's K/V back from the cache, so no program waits
    on another's (fused) store.

    The step's slots are redirected to spare blocks and the block-table positions of the new
    tokens hold NaN: a kernel that read a new key from the cache (written by another program, in
    any order) would return NaN. The output must still equal the reference on consistent
    metadata, and the K/V must land exactly in the (redirected) slots.
    """
    ctx, q, k, v = _batch(*_DECODE_BATCH, group=2, pad_tokens=2)
    cache = ctx.kv_caches[0]
    expected = reference_attention(*_args(ctx, q, k, v, cache.clone(), window))
    n = ctx.num_tokens
    new_slots = _redirect_new_slots(ctx)
    flat = cache.flatten(1, 2)
    before = cache.clone()
    out = _run_kind(kind)(*_args(ctx, q, k, v, cache, window))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert not out[n:].any()
    assert torch.equal(flat[0, new_slots], k[:n]) and torch.equal(flat[1, new_slots], v[:n])
    keep = torch.ones(flat.shape[1], dtype=torch.bool)
    keep[new_slots] = False
    assert torch.equal(flat[:, keep].nan_to_num(7.0), before.flatten(1, 2)[:, keep].nan_to_num(7.0))


@pytest.mark.parametrize("window", [0, 10])
def test_mixed_store_runs_before_attention(monkeypatch, window):
    """Mixed batches: ``_store_kv_kernel`` is launched first and the unified kernel reads this step's
    keys from the cache, so it sees what the store wrote.

    The new tokens' slots hold NaN before the call. With the store launch, the output equals the
    reference (the NaN were overwritten before attention read them); with the store launch
    skipped, the same unified launch returns NaN: it reads the new keys from the cache only.
    """
    ctx, q, k, v = _batch(*_MIXED_BATCH, group=2, pad_tokens=2)
    cache, m = ctx.kv_caches[0], ctx.metadata
    n = ctx.num_tokens
    expected = reference_attention(*_args(ctx, q, k, v, cache.clone(), window))
    flat = cache.flatten(1, 2)
    flat[:, m.slot_mapping[:n]] = float("nan")
    poisoned = cache.clone()
    calls = []
    for name in ("_store_kv_kernel", "_unified_kernel"):
        monkeypatch.setattr(triton_paged, name, _CountingKernel(getattr(triton_paged, name), name, calls))
    out = paged_attention(*_args(ctx, q, k, v, cache, window))
    assert calls == ["_store_kv_kernel", "_unified_kernel"]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert not out[n:].any()
    assert torch.equal(flat[0, m.slot_mapping[:n]], k[:n]) and torch.equal(flat[1, m.slot_mapping[:n]], v[:n])

    monkeypatch.setattr(triton_paged, "_store_kv_kernel", _SkippedKernel())
    out = paged_attention(*_args(ctx, q, k, v, poisoned, window))
    assert out[:n].isnan().any(-1).any(-1).all(), "every real token attends to at least its own (NaN) key"


@pytest.mark.parametrize("kind", ["unified", "split-1", "split-4"])
def test_padded_tokens_with_dummy_slots(kind):
    """Padded tokens that carry a dummy slot in the null block (instead of PAD_SLOT) write exactly
    there, as the reference does, and nothing else; the whole cache then equals the reference's."""
    query_lens, seq_lens = _MIXED_BATCH if kind == "unified" else _DECODE_BATCH
    ctx, q, k, v = _batch(query_lens, seq_lens, group=2, pad_tokens=5)
    n = ctx.num_tokens
    ctx.metadata.slot_mapping[n: n + 5] = torch.tensor([NULL_BLOCK * ctx.block_size + i for i in (3, 0, 7, 15, 9)])
    cache = ctx.kv_caches[0]
    ours, theirs = cache.clone(), cache.clone()
    expected = reference_attention(*_args(ctx, q, k, v, theirs, 0))
    out = _run_kind(kind)(*_args(ctx, q, k, v, ours, 0))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert not out[n:].any()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[:, NULL_BLOCK], cache[:, NULL_BLOCK])


def test_split_kv_one_segment_is_one_launch(monkeypatch):
    """Split-KV decode is one launch: a short graph bound takes no scratch, more segments merge in the
    launch and leave the merge tickets at 0 for the next. Mixed: two launches."""
    ctx, q, k, v = _batch([1, 1, 1], [3, 50, 97], group=4, pad_tokens=1)
    calls = []
    for name in ("_split_kv_kernel", "_store_kv_kernel", "_unified_kernel"):
        kernel = getattr(triton_paged, name)
        monkeypatch.setattr(triton_paged, name, _CountingKernel(kernel, name, calls))
    scratch = dict(triton_paged._SCRATCH)
    # each segment must cover the graph's whole bound (MAX_LEN): 1 segment
    _check(ctx, q, k, v, run=lambda *a: paged_attention(*a, split_kv=True, _config={"min_segment_tokens": MAX_LEN}))
    assert calls == ["_split_kv_kernel"] and triton_paged._SCRATCH == scratch
    calls.clear()
    for _ in range(2):  # the second call relies on the tickets the first left at 0
        _check(ctx, q, k, v, run=_split(2))
    assert calls == ["_split_kv_kernel"] * 2
    assert all(not bufs[3].any() for bufs in triton_paged._SCRATCH.values())
    calls.clear()
    _check(*_batch([3, 1, 20], [3, 40, 50]))
    assert calls == ["_store_kv_kernel", "_unified_kernel"]


class _CountingKernel:
    """Wraps a Triton kernel; records its name on every launch."""

    def __init__(self, kernel, name, calls):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]


class _SkippedKernel:
    """Stands in for a Triton kernel; launching it does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# ---- sentinels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split, config", [(False, {}), (1, {}), (4, {}), (1, {"page_tiles": True}),
                                           (4, {"page_tiles": True})])
def test_padded_lanes_never_write_outside_their_slots(split, config):
    """Real tokens write exactly their slots, padded ones nothing; unused cache (NaN here) is never read."""
    ctx, q, k, v = _batch([1, 1, 1], [5, 20, 33], pad_tokens=4)
    cache = ctx.kv_caches[0]
    m = ctx.metadata
    slots = m.slot_mapping[: ctx.num_tokens]
    flat = cache.flatten(1, 2)  # [2, num_blocks * block_size, kv_heads, head_dim]
    used = torch.zeros(flat.shape[1], dtype=torch.bool)
    for i in range(ctx.num_reqs):
        blocks = m.block_table[i, : -(-int(m.seq_lens[i]) // ctx.block_size)]
        pos = torch.arange(int(m.seq_lens[i]))
        used[blocks[pos // ctx.block_size] * ctx.block_size + pos % ctx.block_size] = True
    flat[:, ~used] = float("nan")  # the null block, other blocks, and owned slots past seq_len
    before = cache.clone()
    clean = cache.nan_to_num(0.0)
    expected = reference_attention(*_args(ctx, q, k, v, clean, 0))
    out = paged_attention(*_args(ctx, q, k, v, cache, 0), split_kv=bool(split), num_segments=split or None,
                          _config=config)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    changed = ~((flat == before.flatten(1, 2)) | (flat.isnan() & before.flatten(1, 2).isnan()))
    written = changed.flatten(2).any(-1).any(0)
    expected_written = torch.zeros_like(written)
    expected_written[slots] = True
    assert torch.equal(written, expected_written)


# ---- the op's contract ----------------------------------------------------------------------------
def test_config_is_not_in_the_op_schema():
    schema = str(triton_attention._schema)
    assert "_config" not in schema and "split_kv" not in schema


def test_opcheck():
    ctx, q, k, v = _batch([3, 1], [3, 20], pad_tokens=1)
    torch.library.opcheck(triton_attention, _args(ctx, q, k, v, ctx.kv_caches[0].clone(), 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_input_checks():
    ctx, q, k, v = _batch([2], [5])
    cache = ctx.kv_caches[0]
    bad = {
        "dtype": _args(ctx, q.double(), k, v, cache, 0),
        "heads": _args(ctx, q[:, :3], k, v, cache, 0),
        "cache layout": _args(ctx, q, k, v, cache.transpose(3, 4), 0),
        "block size": _args(ctx, q, k, v, torch.zeros(2, 4, 8, *cache.shape[3:]), 0),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError):
            paged_attention(*args)
    m = ctx.metadata
    with pytest.raises(ValueError, match="slot_mapping"):
        paged_attention(q, k, v, cache, m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping.int(), 1.0, 0)
    with pytest.raises(ValueError, match="metadata shapes"):
        paged_attention(q, k, v, cache, m.query_start_loc[:-1], m.seq_lens, m.block_table, m.slot_mapping, 1.0, 0)


def test_registry():
    cpu = torch.device("cpu")
    assert get_impl("triton").device_types == ("cuda",)
    assert get_impl("triton").decode_variant
    with pytest.raises(ValueError, match="does not run on cpu"):
        resolve_impl("triton", cpu)
    assert resolve_impl("auto", cpu).name == "reference"
    assert "flash-attn" in get_impl("flash_attn").unavailable()  # not installable here


# ---- the real compiler ----------------------------------------------------------------------------
_SM90_SCRIPT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fullgraph_backend.attention import triton_paged as tp

def compile_sm90(fn, ints, consts, num_warps=4, num_stages=3, dns=(), launch_pdl=False):
    """Specialise like a launch: 16-aligned pointers, ints == 1 constant, ints % 16 == 0 divisible."""
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = consts.get(name, ints.get(name, "*bf16"))
        if name in consts or (value == 1 and name not in dns):
            sig[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, str):
            sig[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if value % 16 == 0 and name not in dns:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, launch_pdl=launch_pdl))

row = (32 + 16) * 128
ints = dict(query_start_loc="*i32", seq_lens="*i32", block_table="*i32", slot_mapping="*i64",
            partial_acc="*fp32", partial_max="*fp32", partial_sum="*fp32", tickets="*i32", qk_scale=0.1, num_reqs=8, num_tokens=8,
            stride_qt=row, stride_qh=128, stride_qd=1, stride_kt=row, stride_kh=128, stride_kd=1, stride_vt=row,
            stride_vh=128, stride_vd=1, stride_ot=4096, stride_oh=128, stride_bt=256, stride_cb=16384,
            stride_cs=1024, stride_ch=128)
base = dict(GROUP=4, G_PAD=4, HEAD_DIM=128, D_PAD=128, BLOCK_N=64, BLOCK_SIZE=16, SLIDING_WINDOW=0,
            DOT_PRECISION="tf32", DOT_FP32=False, Q_HEADS=32, BLOCK_M=16, PDL=False)
pick = lambda fn, c: {k: v for k, v in c.items() if k in fn.arg_names}
gather = dict(k_desc=None, v_desc=None, PAGE_TILES=False)
for segments, window in ((1, 0), (4, 256), (32, 0)):
    compile_sm90(tp._split_kv_kernel, ints, pick(tp._split_kv_kernel, dict(base, NUM_SEGMENTS=segments,
                 MERGE_CHUNK=tp._merge_chunk(segments, 4), SLIDING_WINDOW=window, **gather)), dns=("num_tokens",))
boxes = dict(ints, k_desc="tensordesc<bf16[16,128]>", v_desc="tensordesc<bf16[16,128]>")
for segments, window in ((1, 0), (8, 256)):
    compile_sm90(tp._split_kv_kernel, boxes, pick(tp._split_kv_kernel, dict(base, BLOCK_N=16, NUM_SEGMENTS=segments,
                 MERGE_CHUNK=tp._merge_chunk(segments, 4), SLIDING_WINDOW=window, PAGE_TILES=True)),
                 num_warps=2, num_stages=tp.PAGE_TILE_STAGES, dns=("num_tokens",))
for consts, warps, stages in ((dict(NUM_SEGMENTS=8, MERGE_CHUNK=tp._merge_chunk(8, 4), **gather), 4, 3),
                              (dict(BLOCK_N=16, NUM_SEGMENTS=1, MERGE_CHUNK=1, PAGE_TILES=True), 2, tp.PAGE_TILE_STAGES)):
    kernel = compile_sm90(tp._split_kv_kernel, boxes if consts["PAGE_TILES"] else ints,
                          pick(tp._split_kv_kernel, dict(base, **consts, PDL=True)), num_warps=warps, num_stages=stages,
                          dns=("num_tokens",), launch_pdl=True)
    ptx = kernel.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert kernel.metadata.launch_pdl and wait < ptx.index("griddepcontrol.launch_dependents")
    assert "st.global" not in ptx[:wait]  # no store before the wait (`out` may be a neighbour's memory till then)
compile_sm90(tp._store_kv_kernel, ints, dict(KV_HEADS=8, Q_HEADS=32, HEAD_DIM=128, KV_HEADS_PAD=8, Q_HEADS_PAD=32,
             D_PAD=128, BLOCK_SIZE=16), dns=("num_reqs",))
for block_m in (16, 64):
    compile_sm90(tp._unified_kernel, ints, pick(tp._unified_kernel, dict(base, BLOCK_M=block_m,
                 BLOCK_Q=block_m // 4, SLIDING_WINDOW=128)), dns=("num_reqs",))
print("compiled")
'''


def test_kernels_compile_for_sm90():
    """The interpreter is lenient; compile the kernels for sm_90 (Triton's own ptxas), no GPU needed."""
    run_compiler_script(_SM90_SCRIPT)


def test_split_kv_narrow_decode_batch():
    # enough (request, KV head) pairs for the narrow program, with the plan's own segment count
    lens = [1 + (37 * i) % 200 for i in range(20)]
    ctx, q, k, v = _batch([1] * 20, lens, group=4, head_dim=128, dtype=torch.bfloat16, max_num_seqs=20, pad_tokens=3)
    plan = launch_plan(q, 2, ctx.metadata.block_table, ctx.block_size, 20, split_kv=True)
    assert plan["num_warps"] == triton_paged.NARROW_WARPS
    _check(ctx, q, k, v, run=lambda *a: paged_attention(*a, split_kv=True))


@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("window", [0, 24])
def test_split_kv_pdl_path_equals_the_plain_launch(segments, window):
    """pdl=True runs the kernel's PDL path (on CPU its waits are no-ops): same outputs and caches,
    bit for bit, including padded tokens, merged segments, empty segments (the 5-token request) and
    a sliding window."""
    ctx, q, k, v = _batch([1, 1, 1], [5, 40, 90], pad_tokens=2, dtype=torch.float32)
    cache = ctx.kv_caches[0]
    runs = {}
    for pdl in (False, True):
        mine = cache.clone()
        out = paged_attention(*_args(ctx, q, k, v, mine, window), split_kv=True, num_segments=segments, pdl=pdl)
        runs[pdl] = out, mine
    assert torch.equal(runs[True][0], runs[False][0]) and torch.equal(runs[True][1], runs[False][1])
    _check(ctx, q, k, v, window,
           run=lambda *a: paged_attention(*a, split_kv=True, num_segments=segments, pdl=True))

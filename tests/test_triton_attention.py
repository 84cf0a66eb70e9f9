"""The Triton paged-attention op against the reference op (CPU: Triton's interpreter, TRITON_INTERPRET=1).

Every case runs both ops on their own clone of one random cache and compares the outputs and the
caches afterwards. Shapes are tiny: the interpreter runs each Triton program in Python.
"""
from __future__ import annotations

import random

import pytest
import torch

from fullgraph_backend import use_forward_context
from fullgraph_backend.attention import triton_paged
from fullgraph_backend.attention.reference import reference_attention
from fullgraph_backend.attention.registry import get_impl, resolve_impl
from fullgraph_backend.attention.triton_paged import decode_segments, paged_attention, triton_attention
from fullgraph_backend.forward_context import BatchKind, ForwardContext
from fullgraph_backend.kv_cache import NULL_BLOCK, PAD_SLOT

MAX_LEN = 256


def _batch(query_lens, seq_lens, *, kv_heads=2, group=2, head_dim=64, block_size=16, dtype=torch.float32,
           pad_tokens=0, max_num_seqs=6, fused=True, seed=0):
    """A prepared context (shuffled block tables), its random cache, and q/k/v of the padded size.

    ``fused``: q, k and v are strided views into one QKV projection output, as models pass them.
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
    if fused:
        qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
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


def _split(num_segments):
    return lambda *args: paged_attention(*args, split_kv=True, num_segments=num_segments)


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


def test_contiguous_inputs():
    _check(*_batch([3, 1, 7], [3, 40, 7], fused=False))


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
@pytest.mark.parametrize("group, segments, window", [(1, 2, 0), (4, 4, 0), (8, 8, 0), (2, 4, 20), (4, 16, 0)])
def test_split_kv_decode(group, segments, window):
    # contexts from 1 token (most segments empty) to several tiles per segment
    ctx, q, k, v = _batch([1] * 5, [1, 16, 17, 100, 128], group=group, kv_heads=1 if group == 8 else 2,
                          pad_tokens=2)
    _check(ctx, q, k, v, window=window, run=_split(segments))


@pytest.mark.parametrize("dtype, head_dim, block_size", [(torch.bfloat16, 128, 32), (torch.float32, 128, 16)])
def test_split_kv_dtypes(dtype, head_dim, block_size):
    _check(*_batch([1, 1, 1], [3, 50, 97], group=4, head_dim=head_dim, block_size=block_size, dtype=dtype),
           run=_split(4))


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
    counts = [decode_segments(n, 8, cpu) for n in (1, 2, 4, 8, 64, 1024)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1
    assert all(1 <= c <= triton_paged.MAX_SEGMENTS and c & (c - 1) == 0 for c in counts)


def test_split_kv_scratch_is_allocated_once_per_shape():
    ctx, q, k, v = _batch([1, 1], [3, 40])
    args = _args(ctx, q, k, v, ctx.kv_caches[0].clone(), 0)
    paged_attention(*args, split_kv=True, num_segments=4)
    before = {key: tuple(t.data_ptr() for t in bufs) for key, bufs in triton_paged._SCRATCH.items()}
    paged_attention(*args, split_kv=True, num_segments=4)
    after = {key: tuple(t.data_ptr() for t in bufs) for key, bufs in triton_paged._SCRATCH.items()}
    assert before == after


# ---- sentinels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [False, True])
def test_padded_lanes_never_write_outside_their_slots(split):
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
    out = paged_attention(*_args(ctx, q, k, v, cache, 0), split_kv=split, num_segments=4 if split else None)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    changed = ~((flat == before.flatten(1, 2)) | (flat.isnan() & before.flatten(1, 2).isnan()))
    written = changed.flatten(2).any(-1).any(0)
    expected_written = torch.zeros_like(written)
    expected_written[slots] = True
    assert torch.equal(written, expected_written)


# ---- the op's contract ----------------------------------------------------------------------------
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

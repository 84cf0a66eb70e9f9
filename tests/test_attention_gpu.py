"""GPU: every available attention impl against SDPA and the reference, eager and under CUDA graph replay.

Realistic shapes (32 query heads, 8 KV heads, head dim 128, bf16, contexts up to 4096). The oracle
gathers each request's K/V from the paged cache into contiguous tensors and calls
``F.scaled_dot_product_attention`` in fp32 with an explicit causal (and window) mask.

Run on the GPU machine: ``PYTHONPATH=. python -m pytest -m gpu tests/test_attention_gpu.py -q``.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fullgraph_backend import use_forward_context
from fullgraph_backend.attention.registry import get_impl, resolve_impl
from fullgraph_backend.forward_context import BatchKind, ForwardContext
from fullgraph_backend.kv_cache import NULL_BLOCK

pytestmark = pytest.mark.gpu

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
MAX_LEN = 4096
TOL = dict(atol=2e-2, rtol=2e-2)


def _impls() -> list[str]:
    available = []
    for name in ("reference", "triton", "flash_attn"):
        try:
            if get_impl(name).unavailable() is None:
                available.append(name)
        except ValueError:
            pass
    return available


def _context(impl: str, max_num_seqs: int, max_num_tokens: int) -> ForwardContext:
    block_size = 256 if impl == "flash_attn" else 16  # upstream FA2 pages are multiples of 256
    ctx = ForwardContext(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16, device="cuda",
                         max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens, max_model_len=MAX_LEN,
                         block_size=block_size, attention_impl=impl)
    ctx.kv_caches[0].normal_()
    return ctx


def _prepare(ctx: ForwardContext, query_lens, seq_lens, rng: random.Random) -> None:
    free = list(range(NULL_BLOCK + 1, ctx.num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // ctx.block_size))] for s in seq_lens]
    ctx.prepare(query_lens, seq_lens, tables)


def _call(ctx: ForwardContext, q, k, v, window: int) -> torch.Tensor:
    m = ctx.metadata
    return resolve_impl(ctx.attention_impl, ctx.device).op(q, k, v, ctx.kv_caches[0], m.query_start_loc, m.seq_lens,
                                                           m.block_table, m.slot_mapping, HEAD_DIM ** -0.5, window)


def _sdpa(ctx: ForwardContext, q: torch.Tensor, window: int) -> torch.Tensor:
    """Per request, on the cache as it is now (after the step's store): ``[real tokens, Q_HEADS, HEAD_DIM]`` fp32."""
    m, cache, bs = ctx.metadata, ctx.kv_caches[0], ctx.block_size
    starts = m.query_start_loc.tolist()
    outs = []
    for i in range(ctx.num_reqs):
        seq_len, q_len = int(m.seq_lens[i]), starts[i + 1] - starts[i]
        pos = torch.arange(seq_len, device="cuda")
        slots = m.block_table[i, pos // bs].long() * bs + pos % bs
        keys, values = (cache[j].flatten(0, 1)[slots].float().transpose(0, 1)[None] for j in (0, 1))
        q_pos = torch.arange(seq_len - q_len, seq_len, device="cuda")[:, None]
        mask = pos[None, :] <= q_pos
        if window:
            mask &= pos[None, :] > q_pos - window
        query = q[starts[i]: starts[i + 1]].float().transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=HEAD_DIM ** -0.5,
                                             enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def _qkv(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strided q, k, v views of one fused projection output, as models pass them."""
    qkv = torch.randn(tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    return q.view(tokens, Q_HEADS, HEAD_DIM), k.view(tokens, KV_HEADS, HEAD_DIM), v.view(tokens, KV_HEADS, HEAD_DIM)


BATCHES = {
    "decode-1": ([1], [4000]),
    "decode-16": ([1] * 16, [1, 15, 16, 17, 100, 255, 256, 257, 1000, 1500, 2047, 2048, 3000, 3500, 4000, 4096]),
    "mixed": ([300, 1, 1, 64, 1, 1], [300, 2000, 17, 1500, 3000, 1]),
    # 320 (request, KV head) pairs: triton's narrow decode program with one segment on an H100
    "decode-40": ([1] * 40, [1 + (97 * i) % MAX_LEN for i in range(40)]),
}


@pytest.mark.parametrize("window", [0, 256])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("impl", _impls())
def test_matches_sdpa_and_reference(impl, batch, window):
    query_lens, seq_lens = BATCHES[batch]
    pad = 3
    ctx = _context(impl, max_num_seqs=48, max_num_tokens=512)
    _prepare(ctx, query_lens, seq_lens, random.Random(0))
    q, k, v = _qkv(ctx.num_tokens + pad)
    before = ctx.kv_caches[0].clone()
    with use_forward_context(ctx):
        out = _call(ctx, q, k, v, window)
    torch.testing.assert_close(out[: ctx.num_tokens].float(), _sdpa(ctx, q, window), **TOL)
    assert not out[ctx.num_tokens:].any()
    if impl != "reference" and ctx.block_size == 16:  # same cache layout: compare with the oracle op too
        ref_cache = before.clone()
        m = ctx.metadata
        expected = get_impl("reference").op(q, k, v, ref_cache, m.query_start_loc, m.seq_lens, m.block_table,
                                            m.slot_mapping, HEAD_DIM ** -0.5, window)
        torch.testing.assert_close(out, expected, **TOL)
        assert torch.equal(ctx.kv_caches[0][:, NULL_BLOCK + 1:], ref_cache[:, NULL_BLOCK + 1:])


def _replay_cases(kind: BatchKind, rng: random.Random, max_reqs: int):
    """(query_lens, seq_lens) of batches longer and shorter than the one captured."""
    cases = []
    for low, high in [(3000, MAX_LEN), (1, 40), (500, 1500), (MAX_LEN - 1, MAX_LEN)]:
        reqs = rng.randint(1, max_reqs)
        if kind is BatchKind.DECODE:
            query = [1] * reqs
        else:
            query = [rng.choice([1, 1, 7, 60]) for _ in range(reqs)]
        cases.append((query, [max(q, rng.randint(low, high)) for q in query]))
    return cases


@pytest.mark.parametrize("kind", [BatchKind.DECODE, BatchKind.MIXED])
@pytest.mark.parametrize("impl", _impls())
def test_cuda_graph_replay(impl, kind):
    """One capture at one padded size, replayed with other lengths, block tables and request counts."""
    rng = random.Random(1)
    tokens = 16 if kind is BatchKind.DECODE else 256
    ctx = _context(impl, max_num_seqs=16, max_num_tokens=256)
    q, k, v = _qkv(tokens)
    capture_batch = ([1] * 11, [1000] * 11) if kind is BatchKind.DECODE else ([100, 1, 30, 1], [1000, 1000, 1030, 5])
    _prepare(ctx, *capture_batch, rng)
    assert ctx.batch_kind is kind
    graph = torch.cuda.CUDAGraph()
    with use_forward_context(ctx):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warmup: Triton JIT and split-KV scratch happen here, not in capture
            _call(ctx, q, k, v, 0)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = _call(ctx, q, k, v, 0)
    cases = _replay_cases(kind, rng, max_reqs=16 if kind is BatchKind.DECODE else 4)
    if kind is BatchKind.MIXED:
        cases.append(([1] * 16, [rng.randint(1, MAX_LEN) for _ in range(16)]))  # a decode batch in a mixed graph
    for query_lens, seq_lens in cases:
        _prepare(ctx, query_lens, seq_lens, rng)
        for t, new in zip((q, k, v), _qkv(tokens)):
            t.copy_(new)
        before = ctx.kv_caches[0].clone()
        graph.replay()
        torch.cuda.synchronize()
        n = ctx.num_tokens
        torch.testing.assert_close(out[:n].float(), _sdpa(ctx, q, 0), **TOL)
        assert not out[n:].any()
        # this step's K/V landed in its slots; nothing else outside the null block changed
        flat, old = ctx.kv_caches[0].flatten(1, 2), before.flatten(1, 2)
        slots = ctx.metadata.slot_mapping[:n]
        assert torch.equal(flat[0, slots], k[:n]) and torch.equal(flat[1, slots], v[:n])
        keep = torch.ones(flat.shape[1], dtype=torch.bool, device="cuda")
        keep[slots] = False
        keep[: ctx.block_size] = False
        assert torch.equal(flat[:, keep], old[:, keep])


@pytest.mark.parametrize("batch", [1, 8])
def test_split_kv_merge_is_exact_on_every_replay(batch):
    """The last segment program to finish merges, in a fixed segment order: 300 replays of one graph
    give bitwise the same output (a merge that read a partial before it was published would not),
    and leave every merge ticket at 0."""
    if "triton" not in _impls():
        pytest.skip("triton impl unavailable")
    from fullgraph_backend.attention import triton_paged

    ctx = _context("triton", max_num_seqs=batch, max_num_tokens=batch)
    _prepare(ctx, [1] * batch, [MAX_LEN - 7 * i for i in range(batch)], random.Random(2))
    q, k, v = _qkv(batch)
    with use_forward_context(ctx):
        assert triton_paged.launch_plan(q, KV_HEADS, ctx.metadata.block_table, ctx.block_size, batch,
                                        split_kv=True)["segments"] >= 4
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _call(ctx, q, k, v, 0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _call(ctx, q, k, v, 0)
    graph.replay()
    first = out.clone()
    torch.testing.assert_close(first.float(), _sdpa(ctx, q, 0), **TOL)
    outs = []
    for _ in range(300):
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    assert all(torch.equal(o, first) for o in outs)
    assert all(not bufs[3].any() for bufs in triton_paged._SCRATCH.values())


@pytest.mark.parametrize("window", [0, 256])
def test_page_tiles_on_hopper(window):
    """The decode plan that reads whole cache blocks through TMA descriptors (sm_90, 16-token blocks)
    against SDPA, with stale NaN past every request's length, and against the gathered tiles."""
    if "triton" not in _impls() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("page tiles are chosen on sm_90 only")
    from fullgraph_backend.attention import triton_paged

    batch = 40
    ctx = _context("triton", max_num_seqs=batch, max_num_tokens=batch)
    _prepare(ctx, [1] * batch, [1 + (211 * i) % MAX_LEN for i in range(batch)], random.Random(3))
    m, bs = ctx.metadata, ctx.block_size
    owned = torch.zeros(ctx.num_blocks * bs, dtype=torch.bool, device="cuda")
    for i in range(batch):
        pos = torch.arange(int(m.seq_lens[i]), device="cuda")
        owned[m.block_table[i, pos // bs].long() * bs + pos % bs] = True
    ctx.kv_caches[0].flatten(1, 2)[:, ~owned] = float("nan")
    q, k, v = _qkv(batch)
    plan = triton_paged.launch_plan(q, KV_HEADS, m.block_table, bs, batch, split_kv=True)
    assert plan["page_tiles"] and plan["BLOCK_N"] == bs
    args = (q, k, v, ctx.kv_caches[0], m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping,
            HEAD_DIM ** -0.5, window)
    boxes = triton_paged.paged_attention(*args, split_kv=True)
    gathered = triton_paged.paged_attention(*args, split_kv=True, _config={"page_tiles": False})
    torch.testing.assert_close(boxes.float(), _sdpa(ctx, q, window), **TOL)
    torch.testing.assert_close(boxes, gathered, **TOL)

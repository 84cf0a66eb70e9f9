"""``triton``: our unified paged-attention kernel, graph-safe, with a split-KV decode variant.

Written from the published designs (vLLM's unified Triton attention, SGLang's split-KV decode);
no code is copied. One op call is two launches for a mixed batch and one or two for a
uniform-decode batch:

* mixed graphs: ``_store_kv_kernel``, grid ``(T,)``, writes each token's new K/V into its slot
  (``PAD_SLOT`` tokens write nothing) and zeroes the output rows of padded tokens; then
  ``_unified_kernel``, grid ``(T // BLOCK_Q + num_reqs, kv_heads)``: one program per (query block
  of one request, KV head), serving prefill, decode and mixed batches alike, every key read from
  the cache (the store launch precedes it on the stream). The ``GROUP = q_heads // kv_heads`` query
  heads that share a KV head are packed along the tile's M dimension next to the ``BLOCK_Q``
  tokens, so even a one-token decode row feeds ``tl.dot`` a 16-row tile and every KV tile is read
  once for all heads of its group. (Fusing the store here, new keys taken from the ``k``/``v``
  inputs by a per-key source select in the loop, cost registers and prefill speed, so mixed
  batches keep the store launch: docs/perf-notes.md, section 4.)
* uniform-decode graphs: ``_split_kv_kernel``, grid ``(num_reqs, kv_heads, segments)``, with the
  store fused, which cuts each request's cached keys into a fixed number of segments. With one
  segment it writes the output itself; with more it writes fp32 partials (unnormalised output,
  running max, running sum) and the last program of each (request, KV head) to finish merges
  them (an atomic ticket counter; no second launch). Its K/V tiles are gathered row by row through
  the block table, or, in the narrow plan on Hopper, are whole cache blocks fetched as TMA
  descriptor boxes (``PAGE_TILES``; see ``PAGE_TILE_STAGES``).

Fused store in the split kernel, and why it is race-free: no program reads this step's new K/V
back from the cache. The cached keys ``[0, seq_len - 1)`` come from the cache; the request's one
new key comes straight from the ``k``/``v`` inputs. Each new token's K/V is stored by exactly one
program per KV head, segment 0 of its request (which also folds that key into its partial). A
padded token (``t >= query_start_loc[num_reqs]``) is stored only if its slot is not ``PAD_SLOT``,
and its output rows are zeroed, by split program ``(t mod num_reqs, kv_head, 0)``.

Graph safety (docs/architecture.md, "What a kernel may read"): every grid, tile size and segment
count is a function of the padded token count ``T``, the metadata buffers' fixed sizes
(``max_num_seqs``, the block table's width times the block size as the bound on any KV length)
and the model's head counts, never of the values in the buffers. Each program finds its request,
its query rows and its KV range on the device from ``query_start_loc``, ``seq_lens`` and
``block_table``, so one captured launch serves any batch of the same padded size.
``num_reqs = min(T, max_num_seqs)``: at most that many requests can own tokens; programs of
padded requests (query length 0) exit at once. The TMA descriptors are built on the host from the
cache's address and shape, fixed for its lifetime, so a captured launch keeps valid ones.

The split-KV partials live in scratch that is allocated on the first call for its shape and
kept for the life of the process (``_SCRATCH``). That first call must not be under CUDA graph
capture: the graph runner warms up every graph key before capturing it, which allocates it.

Tuning: :func:`paged_attention` takes a private ``_config`` dict (``BLOCK_N``, ``num_warps``,
``num_stages``, ``segments``, ``min_segment_tokens``, ``page_tiles``) that overrides the defaults
below; the op schema does not have it. ``tools/sweep_attention.py`` times a grid of such configs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary
from triton.tools.tensor_descriptor import TensorDescriptor

from fullgraph_backend.attention.registry import impl_op
from fullgraph_backend.forward_context import BatchKind, current_forward_context
from fullgraph_backend.pdl import enabled as pdl_enabled, gdc_launch_dependents, gdc_wait, kernel_flag
from fullgraph_backend.scratch import kept_buffers, sm_count

LOG2E = 1.4426950408889634
# Cap on split-KV segments per request, which bounds the scratch and the merge's work (untuned;
# vLLM uses 16): at batch 1 and 4096 tokens, 32 segments are one 128-key tile each.
MAX_SEGMENTS = 32
# Each segment gets at most this many tokens of the longest possible KV range (the graph's
# bound, block-table width x block size; the segment count is that bound's number of such chunks,
# rounded up to a power of two, where the SMs allow it), so short-context graphs take few segments
# or one (no partials, no merge). One 128-key tile, because one-tile segments beat two-tile ones
# for Qwen2.5-1.5B's decode at batch 1 (docs/perf-notes.md, section 13) and for Llama-3.2-1B's
# (section 43). Fewer, longer segments trade the merge (partials written and read back by the last
# program) for a longer serial loop per program.
MIN_SEGMENT_TOKENS = 128
# Decode launches aim at this many programs per SM. Three of the split-KV programs (4 warps,
# 128-key tiles) fit an SM on sm_90, but two are faster: the best segment count at every batch
# from 1 to 32 was the one that fills one wave of two per SM (docs/perf-notes.md, section 13).
PROGRAMS_PER_SM = 2
# 16-bit decode launches with at least a quarter as many (request, KV head) pairs as SMs run
# narrower programs (2 warps, 16 KiB K and V tiles), twice as many per SM: from that many pairs
# on they were as fast as the 4-warp program or faster, below it slower, on both measured shapes
# (docs/perf-notes.md, section 13).
NARROW_WARPS = 2
NARROW_PROGRAMS_PER_SM = 4
# Narrow programs on Hopper read K/V a whole 16-token cache block a tile through TMA descriptors,
# PAGE_TILE_STAGES buffers deep: the fastest depth measured (fewer buffers keep fewer bytes in
# flight, more cut the programs per SM). Against gathered tiles they win where each request's
# blocks run in order and lose only for 32q/8kv on scattered blocks at batch 64; the engine's
# block manager keeps a request's blocks in order where it can, which engine/block_layout.py
# measures (docs/perf-notes.md, section 15).
PAGE_TILE_STAGES = 5
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Keys of paged_attention's private ``_config`` overrides.
CONFIG_KEYS = ("BLOCK_N", "num_warps", "num_stages", "segments", "min_segment_tokens", "page_tiles")


# ---- kernel helpers ----------------------------------------------------------------------------
@triton.jit
def _load_row(ptr, t, head, stride_t, stride_h, stride_d, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Row ``[t, head, :]`` of a ``[tokens, heads, head_dim]`` tensor, zero-padded to ``D_PAD``."""
    offs_d = tl.arange(0, D_PAD)
    return tl.load(ptr + t * stride_t + head * stride_h + offs_d * stride_d, mask=offs_d < HEAD_DIM, other=0.0)


@triton.jit
def _put_token(k_cache, v_cache, slot, kv_head, key, value, stride_cb, stride_cs, stride_ch,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Store one token's ``key``/``value`` rows of ``kv_head`` at ``slot``, unless it is PAD_SLOT."""
    if slot >= 0:
        offs_d = tl.arange(0, D_PAD)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch + offs_d
        tl.store(k_cache + dst, key, mask=offs_d < HEAD_DIM)
        tl.store(v_cache + dst, value, mask=offs_d < HEAD_DIM)


@triton.jit
def _pad_token(
    t, out, k, v, k_cache, v_cache, slot_mapping, kv_head,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Padded token ``t``, KV head ``kv_head``: zero its GROUP output heads; store its K/V if it has a slot."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    head = kv_head * GROUP + offs_g
    mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(out + t * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             tl.zeros((G_PAD, D_PAD), dtype=out.dtype.element_ty), mask=mask)
    slot = tl.load(slot_mapping + t)
    if slot >= 0:
        key = _load_row(k, t, kv_head, stride_kt, stride_kh, stride_kd, HEAD_DIM, D_PAD)
        value = _load_row(v, t, kv_head, stride_vt, stride_vh, stride_vd, HEAD_DIM, D_PAD)
        _put_token(k_cache, v_cache, slot, kv_head, key, value, stride_cb, stride_cs, stride_ch,
                   HEAD_DIM, D_PAD, BLOCK_SIZE)


@triton.jit
def _kv_offsets(block_table_row, pos, valid, kv_head, stride_cb, stride_cs, stride_ch, BLOCK_SIZE: tl.constexpr):
    """Element offsets of key positions ``pos`` of ``kv_head`` in one half of the paged cache.

    The page is looked up per position, so a KV tile need not match the cache's block size.
    Positions not ``valid`` take block 0 (their loads are masked); int64 because caches exceed
    2**31 elements.
    """
    block = tl.load(block_table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch


@triton.jit
def _online_update(acc, m_i, l_i, q, k, v, visible, qk_scale, DOT_PRECISION: tl.constexpr):
    """One KV tile of the online softmax (base 2: ``qk_scale`` includes log2(e)).

    ``q [M, D]``, ``k [D, N]``, ``v [N, D]``, ``visible [M, N]``. Rows that have seen no visible key
    keep ``m_i = -inf, l_i = 0, acc = 0``.
    """
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps max -inf; subtracting 0 instead avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend(
    acc, m_i, l_i, q, win_lo, k_cache, v_cache, block_table_row, context_len, tile_lo, tile_hi, qk_scale,
    kv_head, stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """The split-KV decode tile against cached KV tiles ``[tile_lo, tile_hi)`` of one request.

    Only keys at positions ``< context_len`` (cached before this step; no program writes those
    slots during the step) are read; they precede the query, so only the window
    (``pos >= win_lo[row]``) masks them. The step's new key is folded in by the caller.
    """
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    if DOT_FP32:
        q = q.to(tl.float32)
    for start in range(tile_lo * BLOCK_N, tile_hi * BLOCK_N, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_cache = pos < context_len
        kv_off = _kv_offsets(block_table_row, pos, in_cache, kv_head, stride_cb, stride_cs, stride_ch, BLOCK_SIZE)
        visible = in_cache[None, :]
        if SLIDING_WINDOW > 0:
            visible = visible & (pos[None, :] >= win_lo[:, None])
        # Masked loads return zeros: stale slots may hold anything, and 0 * NaN would poison acc.
        k_tile = tl.load(k_cache + kv_off[None, :] + offs_d[:, None], mask=in_cache[None, :] & d_mask[:, None],
                         other=0.0)
        v_tile = tl.load(v_cache + kv_off[:, None] + offs_d[None, :], mask=in_cache[:, None] & d_mask[None, :],
                         other=0.0)
        if DOT_FP32:
            k_tile = k_tile.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        acc, m_i, l_i = _online_update(acc, m_i, l_i, q, k_tile, v_tile, visible, qk_scale, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_pages(
    acc, m_i, l_i, q, win_lo, k_desc, v_desc, block_table_row, context_len, page_lo, page_hi, qk_scale, kv_head,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLIDING_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """:func:`_attend` over cache blocks ``[page_lo, page_hi)``, one block a tile, each K and V tile
    one ``[BLOCK_SIZE, HEAD_DIM]`` box of a tensor descriptor (TMA on sm_90): the loads are
    asynchronous copies that Triton pipelines through several shared-memory buffers, which the
    gather loads of :func:`_attend` do not get.
    """
    if DOT_FP32:
        q = q.to(tl.float32)
    for page in range(page_lo, page_hi):
        pos = page * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_cache = pos < context_len
        row = tl.load(block_table_row + page) * BLOCK_SIZE
        k_tile = k_desc.load([row, kv_head * HEAD_DIM])
        # A box has no mask: slots past context_len (stale, possibly NaN) get score -inf through
        # `visible`, and zeros in V, since 0 * NaN would poison acc.
        v_tile = tl.where(in_cache[:, None], v_desc.load([row, kv_head * HEAD_DIM]), 0.0)
        visible = in_cache[None, :]
        if SLIDING_WINDOW > 0:
            visible = visible & (pos[None, :] >= win_lo[:, None])
        if DOT_FP32:
            k_tile = k_tile.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        acc, m_i, l_i = _online_update(acc, m_i, l_i, q, tl.trans(k_tile), v_tile, visible, qk_scale, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_causal(
    acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table_row, seq_len, tile_lo, tile_hi, qk_scale,
    kv_head, stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online softmax of the query tile against KV tiles ``[tile_lo, tile_hi)`` of one request, every
    key from the cache (the unified kernel runs after ``_store_kv_kernel``), masked causally.

    Returns the updated ``(acc, m_i, l_i)``: unnormalised output, running max and running sum, in
    base 2 (``qk_scale`` includes log2(e)). Rows that see no key keep ``m_i = -inf, l_i = 0``.
    """
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    if DOT_FP32:
        q = q.to(tl.float32)
    for start in range(tile_lo * BLOCK_N, tile_hi * BLOCK_N, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_seq = pos < seq_len
        kv_off = _kv_offsets(block_table_row, pos, in_seq, kv_head, stride_cb, stride_cs, stride_ch, BLOCK_SIZE)
        # Masked loads return zeros: stale slots may hold anything, and 0 * NaN would poison acc.
        k = tl.load(k_cache + kv_off[None, :] + offs_d[:, None], mask=in_seq[None, :] & d_mask[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = in_seq[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING_WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - SLIDING_WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps max -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + kv_off[:, None] + offs_d[None, :], mask=in_seq[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _find_request(query_start_loc, q_block, num_reqs, BLOCK_Q: tl.constexpr):
    """The request owning query block ``q_block``.

    Request ``r``'s blocks start at ``query_start_loc[r] // BLOCK_Q + r``, a strictly increasing
    sequence, so the owner is the last ``r`` whose start is ``<= q_block`` (binary search).
    """
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_reqs"])
def _store_kv_kernel(
    k, v, k_cache, v_cache, slot_mapping, out, query_start_loc, num_reqs,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_ot, stride_oh,
    KV_HEADS: tl.constexpr, Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Token ``t``: store its K/V at ``slot_mapping[t]`` unless PAD_SLOT; zero its output if padding."""
    t = tl.program_id(0)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    slot = tl.load(slot_mapping + t)
    if slot >= 0:
        offs_h = tl.arange(0, KV_HEADS_PAD)
        mask = (offs_h < KV_HEADS)[:, None] & d_mask[None, :]
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
        dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
        key = tl.load(k + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
        tl.store(k_cache + dst, key, mask=mask)
        value = tl.load(v + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
        tl.store(v_cache + dst, value, mask=mask)
    if t >= tl.load(query_start_loc + num_reqs):
        offs_h = tl.arange(0, Q_HEADS_PAD)
        mask = (offs_h < Q_HEADS)[:, None] & d_mask[None, :]
        zeros = tl.zeros((Q_HEADS_PAD, D_PAD), dtype=out.dtype.element_ty)
        tl.store(out + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], zeros, mask=mask)


@triton.jit(do_not_specialize=["num_reqs"])
def _unified_kernel(
    out, q, k_cache, v_cache, query_start_loc, seq_lens, block_table, num_reqs, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (query block, KV head): ``BLOCK_Q`` tokens x ``GROUP`` heads against their keys, all read
    from the cache (``_store_kv_kernel``, launched just before on the same stream, wrote this step's)."""
    # Last blocks first: under causality they see the most keys, so starting them early
    # shortens the tail of a prefill launch.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc, q_block, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc + req)
    q_len = tl.load(query_start_loc + req + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + req)
    if local_block * BLOCK_Q >= q_len:  # beyond this request's tokens (or a padded request)
        return
    seq_len = tl.load(seq_lens + req)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q_idx = local_block * BLOCK_Q + offs_m // GROUP  # token index within the request's new tokens
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    token = q_start + q_idx
    q_tile = tl.load(q + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                     mask=mask, other=0.0)
    q_pos = context_len + q_idx

    # Keys this block can see: up to its last token's position (causal), from its first token's
    # window start.
    hi = tl.minimum(seq_len, context_len + tl.minimum(q_len, (local_block + 1) * BLOCK_Q))
    lo = 0
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(0, context_len + local_block * BLOCK_Q - SLIDING_WINDOW + 1)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_causal(acc, m_i, l_i, q_tile, q_pos, k_cache, v_cache, block_table + req * stride_bt,
                                   seq_len, lo // BLOCK_N, tl.cdiv(hi, BLOCK_N), qk_scale, kv_head,
                                   stride_cb, stride_cs, stride_ch,
                                   HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, DOT_PRECISION, DOT_FP32)
    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that saw no key have acc = 0
    tl.store(out + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             result.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _split_kv_kernel(
    out, partial_acc, partial_max, partial_sum, tickets, q, k, v, k_cache, v_cache, query_start_loc, seq_lens,
    block_table, slot_mapping, num_tokens, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
    Q_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    MERGE_CHUNK: tl.constexpr, SLIDING_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    k_desc, v_desc, PAGE_TILES: tl.constexpr, PDL: tl.constexpr,
):
    """Program (request, KV head, segment) of a uniform-decode batch: one query token's GROUP heads.

    The request's one new token (position ``seq_len - 1``) is segment 0's: it stores the token's
    K/V and folds that key in from the inputs (after its loop); the cached keys ``[0, seq_len - 1)``
    are cut into ``NUM_SEGMENTS`` ranges of whole tiles. One segment: the program writes the output.
    More: fp32 partials ``[num_reqs, Q_HEADS, NUM_SEGMENTS, (D_PAD)]``; an empty segment writes only
    ``max = -inf``, which the merge reads as weight 0 (its stale ``acc`` and ``sum`` are dropped);
    the last program of a (request, KV head) to finish merges them (:func:`_merge_if_last`).
    Segment-0 programs also serve the padded tokens ``t = req + i * num_reqs`` (zero output,
    store only where a slot is set). ``PAGE_TILES``: K/V tiles are whole cache blocks read through
    the descriptors ``k_desc``/``v_desc`` (:func:`_attend_pages`, ``BLOCK_N == BLOCK_SIZE``);
    otherwise the descriptors are None and tiles are gathered by :func:`_attend`. ``PDL``: launched
    with programmatic dependent launch (:mod:`fullgraph_backend.pdl`), the program reads the step's
    metadata (host copies that precede the graph) before it waits for the previous kernel, whose
    outputs ``q``/``k``/``v`` are, then lets the next kernel launch.
    """
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    num_reqs = tl.num_programs(0)
    # Independent loads first, so their latencies overlap.
    q_start = tl.load(query_start_loc + req)
    q_end = tl.load(query_start_loc + req + 1)
    real_tokens = tl.load(query_start_loc + num_reqs)
    seq_len = tl.load(seq_lens + req)
    cache_len = seq_len - 1  # the one new token is the last one
    first_tile = 0
    if SLIDING_WINDOW > 0:
        first_tile = tl.maximum(0, seq_len - SLIDING_WINDOW) // BLOCK_N
    end_tile = tl.cdiv(cache_len, BLOCK_N)
    per_segment = tl.cdiv(end_tile - first_tile, NUM_SEGMENTS)
    tile_lo = first_tile + segment * per_segment
    tile_hi = tl.minimum(tile_lo + per_segment, end_tile)
    if PDL:
        gdc_wait()  # before any read of q/k/v and any store (the pool may hand `out` a neighbour's memory)
        gdc_launch_dependents()
    if segment == 0:
        for t in range(req, num_tokens, num_reqs):
            if t >= real_tokens:
                _pad_token(t, out, k, v, k_cache, v_cache, slot_mapping, kv_head,
                           stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_ot, stride_oh,
                           stride_cb, stride_cs, stride_ch, GROUP, G_PAD, HEAD_DIM, D_PAD, BLOCK_SIZE)
    if q_end == q_start:  # padded request: no segment takes a ticket, so its counter stays 0
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    head = kv_head * GROUP + offs_m
    row_ok = offs_m < GROUP
    row = (req * Q_HEADS + head) * NUM_SEGMENTS + segment
    if NUM_SEGMENTS > 1:
        if (segment > 0) & (tile_lo >= tile_hi):  # nothing to read: weight 0 in the merge
            tl.store(partial_max + row, tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), mask=row_ok)
            _merge_if_last(out, partial_acc, partial_max, partial_sum, tickets, req, kv_head, q_start, stride_ot,
                           stride_oh, Q_HEADS, GROUP, G_PAD, HEAD_DIM, D_PAD, NUM_SEGMENTS, MERGE_CHUNK)
            return

    mask = row_ok[:, None] & d_mask[None, :]
    q_tile = tl.load(q + q_start * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                     mask=mask, other=0.0)
    # Segment 0 owns the new token: its K/V are loaded now (in flight during the loop), stored and
    # folded in after it.
    own = d_mask & (offs_d * 0 + segment == 0)
    key = tl.load(k + q_start * stride_kt + kv_head * stride_kh + offs_d * stride_kd, mask=own, other=0.0)
    value = tl.load(v + q_start * stride_vt + kv_head * stride_vh + offs_d * stride_vd, mask=own, other=0.0)
    slot = tl.load(slot_mapping + q_start)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    win_lo = tl.full((BLOCK_M,), 0, dtype=tl.int32) + seq_len - SLIDING_WINDOW
    if PAGE_TILES:
        acc, m_i, l_i = _attend_pages(acc, m_i, l_i, q_tile, win_lo, k_desc, v_desc, block_table + req * stride_bt,
                                      cache_len, tile_lo, tile_hi, qk_scale, kv_head, HEAD_DIM, BLOCK_SIZE,
                                      SLIDING_WINDOW, DOT_PRECISION, DOT_FP32)
    else:
        acc, m_i, l_i = _attend(acc, m_i, l_i, q_tile, win_lo, k_cache, v_cache, block_table + req * stride_bt,
                                cache_len, tile_lo, tile_hi, qk_scale, kv_head, stride_cb, stride_cs, stride_ch,
                                HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, DOT_PRECISION, DOT_FP32)
    if segment == 0:
        _put_token(k_cache, v_cache, slot, kv_head, key, value, stride_cb, stride_cs, stride_ch,
                   HEAD_DIM, D_PAD, BLOCK_SIZE)
        # the new key (position seq_len - 1, visible to its own query under any window)
        s_new = tl.sum(q_tile.to(tl.float32) * key.to(tl.float32)[None, :], 1) * qk_scale
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp2(m_i - m_new)
        p_new = tl.exp2(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * value.to(tl.float32)[None, :]
        m_i = m_new
    if NUM_SEGMENTS == 1:
        result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out + q_start * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 result.to(out.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_acc + row[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(partial_max + row, m_i, mask=row_ok)
        tl.store(partial_sum + row, l_i, mask=row_ok)
        _merge_if_last(out, partial_acc, partial_max, partial_sum, tickets, req, kv_head, q_start, stride_ot,
                       stride_oh, Q_HEADS, GROUP, G_PAD, HEAD_DIM, D_PAD, NUM_SEGMENTS, MERGE_CHUNK)


@triton.jit
def _merge_if_last(
    out, partial_acc, partial_max, partial_sum, tickets, req, kv_head, token, stride_ot, stride_oh,
    Q_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):
    """Called by each segment program of (``req``, ``kv_head``) after it wrote its partials: the
    last of them to arrive merges all ``NUM_SEGMENTS`` partials of the ``GROUP`` heads into ``out``.

    The merge rides in the split launch instead of a second kernel (one launch less per layer in
    a decode graph). Arrival order comes from an atomic ticket counter per (request, KV head);
    the last program resets it to 0, so every launch, replayed or not, finds the counters zeroed.
    The barrier makes every thread's partial stores precede the ticket, whose acq_rel order then
    publishes them to the merging program; that program reads them past L1 (``.cg``), where
    another program's stores are not coherent. No load waits on another: every segment's partials
    are read (``MERGE_CHUNK`` segments a tile), and empty segments, whose ``acc`` and ``sum`` were
    never written, are dropped by a select after the loads, not by load masks.
    """
    tl.debug_barrier()
    counter = tickets + req * (Q_HEADS // GROUP) + kv_head
    ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if ticket == NUM_SEGMENTS - 1:
        tl.store(counter, 0)
        offs_g = tl.arange(0, G_PAD)
        offs_s = tl.arange(0, NUM_SEGMENTS)
        offs_c = tl.arange(0, MERGE_CHUNK)
        offs_d = tl.arange(0, D_PAD)
        head = kv_head * GROUP + offs_g
        g_ok = offs_g < GROUP
        rows = (req * Q_HEADS + head) * NUM_SEGMENTS  # each head's segment 0
        seg_max = tl.load(partial_max + rows[:, None] + offs_s[None, :], mask=g_ok[:, None], other=float("-inf"),
                          cache_modifier=".cg")
        seg_sum = tl.load(partial_sum + rows[:, None] + offs_s[None, :], mask=g_ok[:, None], other=0.0,
                          cache_modifier=".cg")
        live = seg_max > float("-inf")  # segment 0 always is; empty segments wrote no acc or sum
        top = tl.max(seg_max, 1)
        total = tl.sum(tl.where(live, tl.exp2(seg_max - top[:, None]) * seg_sum, 0.0), 1)
        result = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
        for chunk in tl.static_range(NUM_SEGMENTS // MERGE_CHUNK):
            seg = chunk * MERGE_CHUNK + offs_c
            chunk_max = tl.load(partial_max + rows[:, None] + seg[None, :], mask=g_ok[:, None],
                                other=float("-inf"), cache_modifier=".cg")
            acc = tl.load(partial_acc + (rows[:, None, None] + seg[None, :, None]) * D_PAD + offs_d[None, None, :],
                          mask=g_ok[:, None, None], other=0.0, cache_modifier=".cg")
            weight = tl.exp2(chunk_max - top[:, None])
            result += tl.sum(tl.where((chunk_max > float("-inf"))[:, :, None], weight[:, :, None] * acc, 0.0), 1)
        result = result / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 result.to(out.dtype.element_ty), mask=g_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# ---- launch parameters (functions of shapes and device constants only) ---------------------------
@functools.lru_cache(maxsize=None)
def decode_segments(num_reqs: int, num_kv_heads: int, max_kv_len: int, device: torch.device,
                    min_segment_tokens: int = MIN_SEGMENT_TOKENS, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """Split-KV segments per request for a uniform-decode launch of ``num_reqs`` padded requests.

    ``max_kv_len`` bounds every request's KV length in this graph (block-table width x block size,
    a host constant of the graph key). Doubles the segment count while the launch stays within
    ``programs_per_sm`` programs per SM and segments are fewer than the bound's ``min_segment_tokens``
    chunks: a small batch over a long bound gets many segments, up to one chunk each (the chunk
    count rounded up to a power of two, so no segment takes two chunks: 8 segments for Llama-3.2-1B's
    bound of 577 at batch 1, 9.5 against 10.8 us for 4; docs/perf-notes.md, section 43); a batch that
    already fills the GPU or a bound of one chunk gets 1 (no partials, no merge).
    """
    segments = 1
    target = programs_per_sm * sm_count(device)
    chunks = -(-max_kv_len // min_segment_tokens)
    while segments < MAX_SEGMENTS and num_reqs * num_kv_heads * segments * 2 <= target and segments < chunks:
        segments *= 2
    return segments


def _narrow_decode(num_reqs: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a 16-bit decode launch has enough (request, KV head) pairs, a quarter of the SMs,
    for ``NARROW_WARPS``-warp programs on 16 KiB tiles (``NARROW_PROGRAMS_PER_SM`` per SM)."""
    return dtype != torch.float32 and 4 * num_reqs * num_kv_heads >= sm_count(device)


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Hopper (sm_90): where page tiles were measured to pay (Blackwell has TMA too, unmeasured)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _page_tiles_fit(block_size: int, head_dim: int) -> bool:
    """Whether a cache block of one KV head is a legal descriptor box: power-of-two sides, 16..256."""
    return all(16 <= n <= 256 and n & (n - 1) == 0 for n in (block_size, head_dim))


def _tiles(head_dim: int, dtype: torch.dtype, large: bool = False) -> tuple[int, int]:
    """``(D_PAD, BLOCK_N)``: the padded head dim and a KV tile of 16 KiB per K or V load, 32 KiB
    (``large``) for the 4-warp split-KV decode program, whose 16-row query tile leaves registers for
    the larger tile: in the tile sweep it sped up Qwen2.5-1.5B's 12q/2kv decode and left 32q/8kv
    unchanged (docs/perf-notes.md, section 6)."""
    d_pad = max(16, triton.next_power_of_2(head_dim))
    elem = torch.finfo(dtype).bits // 8
    tile_bytes = 32768 if large else 16384
    return d_pad, min(128, max(16, tile_bytes // (d_pad * elem)))


def _block_m(group: int, num_tokens: int, decode: bool, dtype: torch.dtype) -> int:
    """Query-tile rows: 16 (the smallest tl.dot) for decode and small batches, 64 for 16-bit prefill.

    fp32 stays at 16: its exact (non-TF32) dot runs on CUDA cores, and a 64-row tile spills
    (sm_90 compile: 7.5 KB of stack per thread).
    """
    rows = 64 if num_tokens >= 256 and not decode and dtype != torch.float32 else 16
    return max(rows, triton.next_power_of_2(group))


def _merge_chunk(segments: int, group: int) -> int:
    """Segments the merge reads per tile: ``[G_PAD, chunk, D_PAD]`` fp32 tiles of at most 32 rows,
    so the merging program's registers stay bounded however many segments there are."""
    return max(1, min(segments, 32 // triton.next_power_of_2(group)))


def _check_config(config: dict | None) -> dict:
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown _config keys {unknown}; known: {list(CONFIG_KEYS)}")
    for key in ("BLOCK_N", "segments"):
        value = config.get(key)
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"_config[{key!r}] must be a power of two, got {value}")
    if config.get("BLOCK_N") is not None and config["BLOCK_N"] < 16:
        raise ValueError(f"_config['BLOCK_N'] must be >= 16 (the smallest tl.dot), got {config['BLOCK_N']}")
    return config


# Split-KV partials and merge tickets, keyed by (device, rows, D_PAD); entries are never dropped,
# because a captured graph keeps writing to the addresses it was captured with.
_SCRATCH: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _scratch(device: torch.device, rows: int, d_pad: int) -> tuple[torch.Tensor, ...]:
    """``(acc, max, sum, tickets)`` for ``rows`` partial rows; the tickets (one per (request, KV
    head), fewer than ``rows``) start at 0, and every split launch leaves them at 0."""
    return kept_buffers(_SCRATCH, (rows, d_pad), device, lambda: (
        torch.empty(rows * d_pad, dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.float32, device=device),
        torch.zeros(rows, dtype=torch.int32, device=device)), "triton attention: split-KV")


# TMA descriptors of each KV cache: built once per cache, not per call (two would cost an eager
# or piecewise step ~5 us of host time a layer), and dropped with the cache, since the table holds
# the cache tensor weakly and the descriptors only its storage.
_DESCRIPTORS = WeakIdKeyDictionary()


def _descriptors(kv_cache: torch.Tensor, head_dim: int) -> tuple[TensorDescriptor, TensorDescriptor]:
    """K and V descriptors of a contiguous ``[2, num_blocks, block_size, kv_heads, head_dim]`` cache,
    each half seen as ``[slots, kv_heads * head_dim]``, whose ``[block_size, head_dim]`` box is one
    block of one KV head."""
    if kv_cache not in _DESCRIPTORS:
        _, num_blocks, block_size, kv_heads, _ = kv_cache.shape
        rows, cols = num_blocks * block_size, kv_heads * head_dim
        # on the storage alone: a view of kv_cache would hold it, and the entry would never drop
        halves = [torch.empty(0, dtype=kv_cache.dtype, device=kv_cache.device).set_(
            kv_cache.untyped_storage(), kv_cache.storage_offset() + i * rows * cols, (rows, cols), (cols, 1))
            for i in (0, 1)]
        _DESCRIPTORS[kv_cache] = tuple(TensorDescriptor.from_tensor(h, [block_size, head_dim]) for h in halves)
    return _DESCRIPTORS[kv_cache]


# ---- wrapper ----------------------------------------------------------------------------------
def _check_inputs(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"triton attention takes q [tokens, q_heads, dim] and k, v [tokens, kv_heads, dim]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if q_heads % kv_heads or k.shape[2] != head_dim:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of kv heads ({kv_heads}) with equal head_dim "
                         f"({head_dim} vs {k.shape[2]})")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != (kv_heads, head_dim):
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, {kv_heads}, {head_dim}], "
                         f"got {tuple(kv_cache.shape)}")
    if kv_cache.shape[2] % 16 or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache must be contiguous with block_size a multiple of 16, got shape "
                         f"{tuple(kv_cache.shape)}, strides {kv_cache.stride()}")
    if q.dtype not in _DTYPES or not q.dtype == k.dtype == v.dtype == kv_cache.dtype:
        raise ValueError(f"q, k, v and kv_cache must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}, {kv_cache.dtype}")
    expected = {"query_start_loc": (query_start_loc, torch.int32), "seq_lens": (seq_lens, torch.int32),
                "block_table": (block_table, torch.int32), "slot_mapping": (slot_mapping, torch.int64)}
    for name, (t, dtype) in expected.items():
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor, got {t.dtype} with strides {t.stride()}")
    num_seqs = seq_lens.shape[0]
    if (query_start_loc.dim(), seq_lens.dim(), block_table.dim(), slot_mapping.dim()) != (1, 1, 2, 1) or \
            query_start_loc.shape[0] != num_seqs + 1 or block_table.shape[0] < num_seqs or \
            slot_mapping.shape[0] < tokens:
        raise ValueError(f"metadata shapes disagree: query_start_loc {tuple(query_start_loc.shape)} (want "
                         f"[max_num_seqs + 1]), seq_lens {tuple(seq_lens.shape)}, block_table "
                         f"{tuple(block_table.shape)} (want >= max_num_seqs rows), slot_mapping "
                         f"{tuple(slot_mapping.shape)} (want >= {tokens} tokens)")
    devices = {t.device for t in (q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all attention inputs must be on one device, got {sorted(map(str, devices))}")


def launch_plan(q: torch.Tensor, kv_heads: int, block_table: torch.Tensor, block_size: int, max_num_seqs: int,
                *, split_kv: bool, num_segments: int | None = None, _config: dict | None = None) -> dict:
    """The kernel parameters :func:`paged_attention` uses for these shapes (functions of shapes only).

    Keys: ``kernel`` (``"unified"`` = the K/V store launch, then the unified kernel: 2 launches;
    ``"split"`` = one split-KV launch, its store and its segments' merge fused), ``launches``,
    ``segments``, ``BLOCK_N``, ``BLOCK_M``, ``num_warps``, ``num_stages`` (None: Triton's default),
    ``page_tiles`` (split-KV tiles are whole cache blocks read through TMA descriptors).
    """
    config = _check_config(_config)
    tokens, q_heads, head_dim = q.shape
    num_reqs = min(tokens, max_num_seqs)
    narrow = split_kv and _narrow_decode(num_reqs, kv_heads, q.dtype, q.device)
    fits = _page_tiles_fit(block_size, head_dim)
    page_tiles = split_kv and config.get("page_tiles", narrow and block_size == 16 and fits and _has_tma(q.device))
    if page_tiles and not fits:
        raise ValueError(f"page tiles need power-of-two block_size and head_dim in 16..256, got {block_size}, "
                         f"{head_dim}")
    _, block_n = _tiles(head_dim, q.dtype, large=split_kv and not narrow)
    if page_tiles:
        if config.get("BLOCK_N", block_size) != block_size:
            raise ValueError(f"page tiles are one cache block: BLOCK_N must be the block size {block_size}")
        block_n = block_size
    block_n = config.get("BLOCK_N") or block_n
    segments = 1
    if split_kv:
        segments = num_segments or config.get("segments") or decode_segments(
            num_reqs, kv_heads, block_table.shape[1] * block_size, q.device,
            config.get("min_segment_tokens") or MIN_SEGMENT_TOKENS,
            NARROW_PROGRAMS_PER_SM if narrow else PROGRAMS_PER_SM)
        if segments & (segments - 1):
            raise ValueError(f"num_segments must be a power of two, got {segments}")
    kernel = "split" if split_kv else "unified"
    return dict(kernel=kernel, launches=1 if split_kv else 2, segments=segments, BLOCK_N=block_n,
                BLOCK_M=_block_m(q_heads // kv_heads, tokens, split_kv, q.dtype),
                num_warps=config.get("num_warps") or (NARROW_WARPS if narrow else 4),
                num_stages=config.get("num_stages") or (PAGE_TILE_STAGES if page_tiles else None),
                page_tiles=bool(page_tiles))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    sliding_window: int,
    *,
    split_kv: bool = False,
    num_segments: int | None = None,
    pdl: bool | None = None,
    _config: dict | None = None,
) -> torch.Tensor:
    """Store this step's K/V and attend causally per request: ``reference_attention``'s function.

    ``q [T, q_heads, D]``, ``k``/``v [T, kv_heads, D]`` may be strided views (e.g. slices of a
    fused QKV projection). ``split_kv=True`` is legal only for a uniform-decode batch (every
    request has at most one new token, the last of its sequence); it splits each request's keys
    into ``num_segments`` (default :func:`decode_segments`), in one launch either way (the last
    segment to finish merges). Without it, a store launch precedes the unified kernel. ``pdl``:
    launch the split-KV kernel with programmatic dependent launch where the device supports it;
    None takes :func:`fullgraph_backend.pdl.enabled` (mixed batches' kernels never use it).
    ``_config`` (private, for tuning; see ``CONFIG_KEYS``) overrides tile sizes, warps, pipeline
    stages and the segment choice. Returns a new contiguous ``[T, q_heads, D]`` tensor.

    Example (CPU, under ``TRITON_INTERPRET=1``)::

        out = paged_attention(q, k, v, cache, m.query_start_loc, m.seq_lens, m.block_table,
                              m.slot_mapping, q.shape[-1] ** -0.5, 0)
    """
    _check_inputs(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for kernel, grid, args, kwargs in kernel_launches(out, q, k, v, kv_cache, query_start_loc, seq_lens, block_table,
                                                      slot_mapping, scale, sliding_window, split_kv=split_kv,
                                                      num_segments=num_segments, pdl=pdl, _config=_config):
        kernel[grid](*args, **kwargs)
    return out


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **kwargs)``."""

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


def kernel_launches(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                    slot_mapping: torch.Tensor, scale: float, sliding_window: int, *, split_kv: bool = False,
                    num_segments: int | None = None, pdl: bool | None = None,
                    _config: dict | None = None) -> list[Launch]:
    """The launches, in order, by which :func:`paged_attention` (same arguments, inputs it checked)
    writes ``out``; none is made here. They depend on shapes, strides, dtypes and the device only
    (the split-KV scratch of a new shape is allocated here), so :mod:`.precompile` lists a graph key's
    kernel variants from them without running anything.
    """
    tokens, q_heads, head_dim = q.shape
    if tokens == 0:
        return []
    kv_heads = k.shape[1]
    num_reqs = min(tokens, seq_lens.shape[0])
    block_size = kv_cache.shape[2]
    plan = launch_plan(q, kv_heads, block_table, block_size, seq_lens.shape[0], split_kv=split_kv,
                       num_segments=num_segments, _config=_config)
    k_cache, v_cache = kv_cache.unbind(0)  # separate base pointers keep every in-kernel offset in one half
    cache_strides = k_cache.stride()[:3]
    group = q_heads // kv_heads
    d_pad, _ = _tiles(head_dim, q.dtype)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # no silent TF32 in fp32 models
    # Triton's CPU interpreter (3.9) multiplies bf16 tiles as their raw uint16 bits: feed it fp32.
    dot_fp32 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    window = max(sliding_window, 0)
    qk_scale = scale * LOG2E
    launch = dict(num_warps=plan["num_warps"])
    if plan["num_stages"] is not None:
        launch["num_stages"] = plan["num_stages"]
    strides = (*q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1), block_table.stride(0),
               *cache_strides)
    common = dict(GROUP=group, G_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim, D_PAD=d_pad,
                  BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"], BLOCK_SIZE=block_size, SLIDING_WINDOW=window,
                  DOT_PRECISION=precision, DOT_FP32=dot_fp32)

    if split_kv:
        segments = plan["segments"]
        if segments > 1:
            scratch = _scratch(q.device, num_reqs * q_heads * segments, d_pad)
        else:  # one segment writes the output itself; the scratch pointers are never touched
            scratch = (out,) * 4
        page_tiles = plan["page_tiles"] and kv_cache.data_ptr() % 16 == 0  # TMA needs a 16-byte aligned base
        descs = _descriptors(kv_cache, head_dim) if page_tiles else (None, None)
        flag = kernel_flag(pdl_enabled(q.device) if pdl is None else pdl, q.device)
        return [Launch(_split_kv_kernel, (num_reqs, kv_heads, segments), (
            out, *scratch, q, k, v, k_cache, v_cache, query_start_loc, seq_lens,
            block_table, slot_mapping, tokens, qk_scale, *strides,
        ), {
            "Q_HEADS": q_heads, "NUM_SEGMENTS": segments, "MERGE_CHUNK": _merge_chunk(segments, group), **common,
            **launch, "k_desc": descs[0], "v_desc": descs[1], "PAGE_TILES": page_tiles, "PDL": flag,
            "launch_pdl": flag and q.is_cuda,
        })]

    # Mixed batches: store first (its own launch), then attend with every key read from the cache.
    # Fusing the store into the unified kernel (new keys from the k/v inputs, picked per key inside
    # the loop) cost it registers and prefill speed (docs/perf-notes.md, section 4).
    store = Launch(_store_kv_kernel, (tokens,), (
        k, v, k_cache, v_cache, slot_mapping, out, query_start_loc, num_reqs,
        *k.stride(), *v.stride(), *cache_strides, out.stride(0), out.stride(1),
    ), {
        "KV_HEADS": kv_heads, "Q_HEADS": q_heads, "HEAD_DIM": head_dim,
        "KV_HEADS_PAD": triton.next_power_of_2(kv_heads), "Q_HEADS_PAD": triton.next_power_of_2(q_heads),
        "D_PAD": d_pad, "BLOCK_SIZE": block_size,
    })
    block_q = plan["BLOCK_M"] // group
    # Request r's query blocks start at query_start_loc[r] // block_q + r, so this many cover any
    # batch of `tokens` tokens in at most num_reqs requests.
    grid = (tokens // block_q + num_reqs, kv_heads)
    return [store, Launch(_unified_kernel, grid, (
        out, q, k_cache, v_cache, query_start_loc, seq_lens, block_table, num_reqs, qk_scale,
        *q.stride(), out.stride(0), out.stride(1), block_table.stride(0), *cache_strides,
    ), {
        "GROUP": group, "HEAD_DIM": head_dim, "D_PAD": d_pad, "BLOCK_M": plan["BLOCK_M"], "BLOCK_Q": block_q,
        "BLOCK_N": plan["BLOCK_N"], "BLOCK_SIZE": block_size, "SLIDING_WINDOW": window, "DOT_PRECISION": precision,
        "DOT_FP32": dot_fp32, **launch,
    })]


def uses_split_kv(query_start_loc: torch.Tensor, num_tokens: int) -> bool:
    """Whether the op runs the split-KV decode variant for this call: only when the active forward
    context's batch kind is DECODE and these are its metadata buffers.

    The kind is fixed per graph key (the runner captures DECODE and MIXED graphs separately), so
    the choice is made once per capture, never per replay. No context, another context's buffers
    or a MIXED kind take the unified kernel, which is correct for every batch.
    """
    ctx = current_forward_context()
    if ctx is None or ctx.batch_kind is not BatchKind.DECODE:
        return False
    if query_start_loc.data_ptr() != ctx.metadata.query_start_loc.data_ptr():
        return False
    if num_tokens < ctx.num_tokens:
        raise RuntimeError(f"triton attention: the forward context describes a decode batch of {ctx.num_tokens} "
                           f"tokens but the op got {num_tokens}; call ctx.prepare(...) for this batch first")
    return True


@impl_op("triton_attention", flexible_layout=True)
def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    sliding_window: int,
) -> torch.Tensor:
    """``fullgraph::reference_attention``'s contract on Triton kernels; split-KV in decode graphs."""
    return paged_attention(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, scale,
                           sliding_window, split_kv=uses_split_kv(query_start_loc, q.shape[0]))


"""``triton``: our unified paged-attention kernel, graph-safe, with a split-KV decode variant.

Written from the published designs (vLLM's unified Triton attention, SGLang's split-KV decode);
no code is copied. One op call is two or three launches:

1. ``_store_kv_kernel``, grid ``(T,)``: writes each token's new K/V into its slot (``PAD_SLOT``
   tokens write nothing) and zeroes the output rows of padded tokens, which no attention program
   owns.
2. either ``_unified_kernel``, grid ``(T // BLOCK_Q + num_reqs, kv_heads)``: one program per
   (query block of one request, KV head), serving prefill, decode and mixed batches alike. The
   ``GROUP = q_heads // kv_heads`` query heads that share a KV head are packed along the tile's M
   dimension next to the ``BLOCK_Q`` tokens, so even a one-token decode row feeds ``tl.dot`` a
   16-row tile and every KV tile is read once for all heads of its group;
3. or, in uniform-decode graphs, ``_split_kv_kernel``, grid ``(num_reqs, kv_heads, segments)``,
   which cuts each request's KV range into a fixed number of segments and writes fp32 partials
   (unnormalised output, running max, running sum), and ``_reduce_segments_kernel``, grid
   ``(num_reqs, q_heads)``, which merges them.

Graph safety (DESIGN.md rules 1-2): every grid, tile size and segment count is a function of the
padded token count ``T``, the metadata buffers' fixed sizes and the model's head counts, never of
the values in the buffers. Each program finds its request, its query rows and its KV range on the
device from ``query_start_loc``, ``seq_lens`` and ``block_table``, so one captured launch serves
any batch of the same padded size. ``num_reqs = min(T, max_num_seqs)``: at most that many
requests can own tokens; programs of padded requests (query length 0) exit at once.

The split-KV partials live in scratch that is allocated on the first call for its shape and
kept for the life of the process (``_SCRATCH``). That first call must not be under CUDA graph
capture: the graph runner warms up every graph key before capturing it, which allocates it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fullgraph_backend.forward_context import BatchKind, current_forward_context

LOG2E = 1.4426950408889634
# Cap on split-KV segments per request, which bounds the scratch and the reduce's work (untuned;
# vLLM uses 16): at batch 1 and 4096 tokens, 32 segments are two 64-key tiles each.
MAX_SEGMENTS = 32
# Decode launches aim at this many programs per SM: the decode tile compiles to ~115 registers x
# 128 threads on sm_90, so four programs are resident per SM at once.
PROGRAMS_PER_SM = 4
# Stand-in SM count where there are no SMs (the CPU interpreter), so tests exercise splitting.
_NOMINAL_SMS = 16
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- kernels ----------------------------------------------------------------------------------
@triton.jit
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


@triton.jit
def _attend(
    acc, m_i, l_i, q, q_pos, k_cache, v_cache, block_table_row, seq_len, tile_lo, tile_hi, qk_scale,
    kv_head, stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online softmax of the query tile against KV tiles ``[tile_lo, tile_hi)`` of one request.

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
        # Page lookup per key position, so BLOCK_N need not match the cache's block size.
        # Positions past seq_len read the null block; int64 because caches exceed 2**31 elements.
        block = tl.load(block_table_row + pos // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
        kv_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
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


@triton.jit
def _unified_kernel(
    out, q, k_cache, v_cache, query_start_loc, seq_lens, block_table, num_reqs, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_bt, stride_cb, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (query block, KV head): ``BLOCK_Q`` tokens x ``GROUP`` heads against their keys."""
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
    acc, m_i, l_i = _attend(acc, m_i, l_i, q_tile, q_pos, k_cache, v_cache, block_table + req * stride_bt, seq_len,
                            lo // BLOCK_N, tl.cdiv(hi, BLOCK_N), qk_scale, kv_head, stride_cb, stride_cs, stride_ch,
                            HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, DOT_PRECISION, DOT_FP32)
    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that saw no key have acc = 0
    tl.store(out + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             result.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _split_kv_kernel(
    partial_acc, partial_max, partial_sum, q, k_cache, v_cache, query_start_loc, seq_lens, block_table, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_bt, stride_cb, stride_cs, stride_ch,
    Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (request, KV head, segment) of a uniform-decode batch: one query token's GROUP heads
    against one segment of its KV range, written as fp32 partials (all zero for an empty segment)."""
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    q_start = tl.load(query_start_loc + req)
    if tl.load(query_start_loc + req + 1) == q_start:  # padded request: the reduce skips it too
        return
    seq_len = tl.load(seq_lens + req)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    head = kv_head * GROUP + offs_m
    row_ok = offs_m < GROUP
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_tile = tl.load(q + q_start * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                     mask=mask, other=0.0)
    q_pos = tl.zeros((BLOCK_M,), dtype=tl.int32) + seq_len - 1  # the one new token is the last one

    first_tile = 0
    if SLIDING_WINDOW > 0:
        first_tile = tl.maximum(0, seq_len - SLIDING_WINDOW) // BLOCK_N
    end_tile = tl.cdiv(seq_len, BLOCK_N)
    per_segment = tl.cdiv(end_tile - first_tile, NUM_SEGMENTS)
    tile_lo = first_tile + segment * per_segment
    tile_hi = tl.minimum(tile_lo + per_segment, end_tile)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q_tile, q_pos, k_cache, v_cache, block_table + req * stride_bt, seq_len,
                            tile_lo, tile_hi, qk_scale, kv_head, stride_cb, stride_cs, stride_ch,
                            HEAD_DIM, D_PAD, BLOCK_N, BLOCK_SIZE, SLIDING_WINDOW, DOT_PRECISION, DOT_FP32)
    row = (req * Q_HEADS + head) * NUM_SEGMENTS + segment  # partials are [num_reqs, Q_HEADS, NUM_SEGMENTS, (D_PAD)]
    tl.store(partial_acc + row[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(partial_max + row, m_i, mask=row_ok)
    tl.store(partial_sum + row, l_i, mask=row_ok)


@triton.jit
def _reduce_segments_kernel(
    out, partial_acc, partial_max, partial_sum, query_start_loc, stride_ot, stride_oh,
    Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
):
    """Program (request, query head): merge the segments' partials into the token's output."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc + req)
    if tl.load(query_start_loc + req + 1) == token:
        return
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, D_PAD)
    row = (req * Q_HEADS + head) * NUM_SEGMENTS + offs_s
    seg_max = tl.load(partial_max + row)
    top = tl.max(seg_max, 0)
    weight = tl.exp2(seg_max - tl.where(top == float("-inf"), 0.0, top))  # empty segments weigh 0
    acc = tl.load(partial_acc + row[:, None] * D_PAD + offs_d[None, :])
    total = tl.sum(weight * tl.load(partial_sum + row), 0)
    result = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + token * stride_ot + head * stride_oh + offs_d, result.to(out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---- launch parameters (functions of shapes and device constants only) ---------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _NOMINAL_SMS


def decode_segments(num_reqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Split-KV segments per request for a uniform-decode launch of ``num_reqs`` padded requests.

    Doubles the segment count while the launch stays within ``PROGRAMS_PER_SM`` programs per SM:
    a small batch gets many segments, a batch that already fills the GPU gets 1 (no split).
    """
    segments = 1
    target = PROGRAMS_PER_SM * _sm_count(device)
    while segments < MAX_SEGMENTS and num_reqs * num_kv_heads * segments * 2 <= target:
        segments *= 2
    return segments


def _tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(D_PAD, BLOCK_N)``: the padded head dim and a KV tile of 16 KiB per K or V load."""
    d_pad = max(16, triton.next_power_of_2(head_dim))
    elem = torch.finfo(dtype).bits // 8
    return d_pad, min(128, max(16, 16384 // (d_pad * elem)))


def _block_m(group: int, num_tokens: int, decode: bool, dtype: torch.dtype) -> int:
    """Query-tile rows: 16 (the smallest tl.dot) for decode and small batches, 64 for 16-bit prefill.

    fp32 stays at 16: its exact (non-TF32) dot runs on CUDA cores, and a 64-row tile spills
    (sm_90 compile: 7.5 KB of stack per thread).
    """
    rows = 64 if num_tokens >= 256 and not decode and dtype != torch.float32 else 16
    return max(rows, triton.next_power_of_2(group))


# Split-KV partials, keyed by (device, rows, D_PAD); entries are never dropped, because a captured
# graph keeps writing to the addresses it was captured with.
_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scratch(device: torch.device, rows: int, d_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (device, rows, d_pad)
    if key not in _SCRATCH:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("triton attention: split-KV scratch for this shape was not allocated before CUDA "
                               "graph capture; run the op once at this padded size (warmup) before capturing")
        _SCRATCH[key] = (torch.empty(rows * d_pad, dtype=torch.float32, device=device),
                         torch.empty(rows, dtype=torch.float32, device=device),
                         torch.empty(rows, dtype=torch.float32, device=device))
    return _SCRATCH[key]


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
) -> torch.Tensor:
    """Store this step's K/V, then attend causally per request: ``reference_attention``'s function.

    ``q [T, q_heads, D]``, ``k``/``v [T, kv_heads, D]`` may be strided views (e.g. slices of a
    fused QKV projection). ``split_kv=True`` is legal only for a uniform-decode batch (every
    request has at most one new token, the last of its sequence); it splits each request's keys
    into ``num_segments`` (default :func:`decode_segments`) and falls back to the unified kernel
    with decode tiles when that is 1. Returns a new contiguous ``[T, q_heads, D]`` tensor.

    Example (CPU, under ``TRITON_INTERPRET=1``)::

        out = paged_attention(q, k, v, cache, m.query_start_loc, m.seq_lens, m.block_table,
                              m.slot_mapping, q.shape[-1] ** -0.5, 0)
    """
    _check_inputs(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping)
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    out = torch.empty((tokens, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    num_reqs = min(tokens, seq_lens.shape[0])
    block_size = kv_cache.shape[2]
    k_cache, v_cache = kv_cache.unbind(0)  # separate base pointers keep every in-kernel offset in one half
    cache_strides = k_cache.stride()[:3]
    group = q_heads // kv_heads
    d_pad, block_n = _tiles(head_dim, q.dtype)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # no silent TF32 in fp32 models
    # Triton's CPU interpreter (3.9) multiplies bf16 tiles as their raw uint16 bits: feed it fp32.
    dot_fp32 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    window = max(sliding_window, 0)

    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, out, query_start_loc, num_reqs,
        *k.stride(), *v.stride(), *cache_strides, out.stride(0), out.stride(1),
        KV_HEADS=kv_heads, Q_HEADS=q_heads, HEAD_DIM=head_dim, KV_HEADS_PAD=triton.next_power_of_2(kv_heads),
        Q_HEADS_PAD=triton.next_power_of_2(q_heads), D_PAD=d_pad, BLOCK_SIZE=block_size,
    )
    qk_scale = scale * LOG2E
    segments = (num_segments or decode_segments(num_reqs, kv_heads, q.device)) if split_kv else 1
    if segments > 1:
        if segments & (segments - 1):
            raise ValueError(f"num_segments must be a power of two, got {segments}")
        rows = num_reqs * q_heads * segments
        partial_acc, partial_max, partial_sum = _scratch(q.device, rows, d_pad)
        _split_kv_kernel[(num_reqs, kv_heads, segments)](
            partial_acc, partial_max, partial_sum, q, k_cache, v_cache, query_start_loc, seq_lens, block_table,
            qk_scale, *q.stride(), block_table.stride(0), *cache_strides,
            Q_HEADS=q_heads, GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=_block_m(group, tokens, True, q.dtype),
            BLOCK_N=block_n, BLOCK_SIZE=block_size, NUM_SEGMENTS=segments, SLIDING_WINDOW=window,
            DOT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=4,
        )
        _reduce_segments_kernel[(num_reqs, q_heads)](
            out, partial_acc, partial_max, partial_sum, query_start_loc, out.stride(0), out.stride(1),
            Q_HEADS=q_heads, HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SEGMENTS=segments, num_warps=4,
        )
        return out
    block_m = _block_m(group, tokens, split_kv, q.dtype)
    block_q = block_m // group
    # Request r's query blocks start at query_start_loc[r] // block_q + r, so this many cover any
    # batch of `tokens` tokens in at most num_reqs requests.
    grid = (tokens // block_q + num_reqs, kv_heads)
    _unified_kernel[grid](
        out, q, k_cache, v_cache, query_start_loc, seq_lens, block_table, num_reqs, qk_scale,
        *q.stride(), out.stride(0), out.stride(1), block_table.stride(0), *cache_strides,
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, SLIDING_WINDOW=window, DOT_PRECISION=precision, DOT_FP32=dot_fp32, num_warps=4,
    )
    return out


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


@torch.library.custom_op("fullgraph::triton_attention", mutates_args=("kv_cache",))
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


@triton_attention.register_fake
def _(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping, scale, sliding_window):
    return q.new_empty(q.shape)

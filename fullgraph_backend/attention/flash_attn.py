"""``flash_attn``: the flash-attn package's paged kernels, where that package is installed.

Optional and import-guarded: flash-attn is never a dependency (``pip install 'fullgraph[flash-attn]'``),
and it cannot be built on our GPU machine (no wheel for torch 2.11; a source build outlasts a
command there). Versions after 2.8.3.post1 are refused: commit 77aacb68 (#2711) added
``seqlens_k.max().item()`` to the paged path, a host sync that CUDA graph capture rejects; the
v2.8.3 and v2.8.3.post1 tags do not have it (2.8.3.post2 on PyPI has no upstream tag to check).

Uniform-decode batches use ``flash_attn_with_kvcache`` (one query per request, block table,
explicit ``num_splits``); anything else uses ``flash_attn_varlen_func`` with the block table and
bound-valued ``max_seqlen_q = T``, ``max_seqlen_k = table width x block size``, so both are
graph-safe. Upstream FA2 requires the cache's block size to be a multiple of 256.
"""
from __future__ import annotations

import re

import torch

from fullgraph_backend.forward_context import BatchKind, current_forward_context
from fullgraph_backend.attention.registry import impl_op
from fullgraph_backend.kv_cache import store_kv
from fullgraph_backend.scratch import sm_count

MAX_VERSION = (2, 8, 3, 1)  # 2.8.3.post1


def unavailable() -> str | None:
    """Why the flash_attn impl cannot run here, or None."""
    try:
        import flash_attn
    except ImportError as error:
        return f"flash-attn is not installed ({error}); pip install 'fullgraph[flash-attn]' (<= 2.8.3.post1)"
    found = re.match(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", flash_attn.__version__)
    if found is None or tuple(int(part or 0) for part in found.groups()) > MAX_VERSION:
        return (f"flash-attn {flash_attn.__version__} is newer than 2.8.3.post1; later versions call .item() in "
                f"the paged path, which breaks CUDA graph capture")
    return None


def _num_splits(num_reqs: int, kv_heads: int, device: torch.device) -> int:
    """Splits of each request's keys so a decode launch covers every SM about twice (at most 32).

    Counted per KV head: FA2 packs a one-token query's GQA group into one tile.
    """
    return max(1, min(32, 2 * sm_count(device) // (num_reqs * kv_heads)))


@impl_op("flash_attn_attention")
def flash_attn_attention(
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
    """``fullgraph::reference_attention``'s contract on flash-attn's paged kernels."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    tokens = q.shape[0]
    block_size = kv_cache.shape[2]
    if block_size % 256:
        raise ValueError(f"flash_attn needs a KV block size that is a multiple of 256, got {block_size}")
    store_kv(kv_cache, k, v, slot_mapping[:tokens])
    num_reqs = min(tokens, seq_lens.shape[0])
    window = (sliding_window - 1, 0) if sliding_window > 0 else (-1, -1)
    table = block_table[:num_reqs]
    ctx = current_forward_context()
    if ctx is not None and ctx.batch_kind is BatchKind.DECODE and \
            query_start_loc.data_ptr() == ctx.metadata.query_start_loc.data_ptr():
        # token i is request i's only new token; padded requests have seq_len 0 and get zeros
        out = torch.zeros_like(q)
        out[:num_reqs] = flash_attn_with_kvcache(
            q[:num_reqs].unsqueeze(1), kv_cache[0], kv_cache[1], cache_seqlens=seq_lens[:num_reqs],
            block_table=table, softmax_scale=scale, causal=True, window_size=window,
            num_splits=_num_splits(num_reqs, k.shape[1], q.device)).squeeze(1)
        return out
    cu_seqlens_k = torch.nn.functional.pad(seq_lens[:num_reqs].cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(
        q, kv_cache[0], kv_cache[1], query_start_loc[: num_reqs + 1], cu_seqlens_k, tokens,
        table.shape[1] * block_size, softmax_scale=scale, causal=True, window_size=window, block_table=table)
    padded = torch.arange(tokens, device=q.device) >= query_start_loc[num_reqs]  # rows varlen leaves unwritten
    return out.masked_fill_(padded[:, None, None], 0.0)


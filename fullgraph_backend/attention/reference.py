"""``reference``: paged attention in plain PyTorch, graph-safe, the CPU path and the test oracle.

Every shape here comes from the padded token count and the buffers' fixed sizes, never from
the values in them, so one capture serves any batch of the same padded size. It gathers each
token's whole block-table row (max_model_len keys), which makes it slow at large batch and
simple to trust.
"""
from __future__ import annotations

import torch

from fullgraph_backend.attention.registry import impl_op
from fullgraph_backend.kv_cache import store_kv


@impl_op("reference_attention", flexible_layout=True)
def reference_attention(
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
    """Store the new K/V of ``num_tokens`` packed tokens, then attend causally per request.

    Shapes: ``q [num_tokens, q_heads, head_dim]``, ``k``/``v [num_tokens, kv_heads, head_dim]``.
    ``sliding_window > 0`` limits each query to that many most recent keys (itself included).
    Tokens past ``query_start_loc[-1]`` (padding) get zeros.
    """
    num_tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    store_kv(kv_cache, k, v, slot_mapping[:num_tokens])

    # Requests that can own tokens at this padded size; the rest are padding by construction.
    num_reqs = min(num_tokens, seq_lens.shape[0])
    starts = query_start_loc[: num_reqs + 1]
    token = torch.arange(num_tokens, device=q.device, dtype=starts.dtype)
    req = torch.searchsorted(starts[1:], token, right=True).clamp_(max=num_reqs - 1)
    is_real = token < starts[num_reqs]
    position = seq_lens[req] - (starts[req + 1] - token)  # of the token within its sequence

    blocks = block_table[req]  # [T, W]: every token reads its request's full table row
    keys = kv_cache[0][blocks].flatten(1, 2).float()  # [T, W * block_size, kv_heads, head_dim]
    values = kv_cache[1][blocks].flatten(1, 2).float()
    key_pos = torch.arange(keys.shape[1], device=q.device)
    visible = (key_pos[None, :] < seq_lens[req][:, None]) & (key_pos[None, :] <= position[:, None])
    if sliding_window > 0:
        visible &= key_pos[None, :] > position[:, None] - sliding_window
    visible &= is_real[:, None]

    qg = q.float().view(num_tokens, kv_heads, q_heads // kv_heads, head_dim)
    scores = torch.einsum("tkgd,tlkd->tkgl", qg, keys) * scale
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with no visible key: zeros
    # Slots a token may not see can hold anything (inf or NaN from an earlier request): a weight
    # of 0 times NaN is NaN, so they are zeroed rather than only weighted 0.
    values = values.masked_fill_(~visible[:, :, None, None], 0.0)
    out = torch.einsum("tkgl,tlkd->tkgd", probs, values)
    return out.reshape(num_tokens, q_heads, head_dim).to(q.dtype)


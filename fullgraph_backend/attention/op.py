"""The attention node models call: ``fullgraph_backend.attention(q, k, v, layer_idx)``.

It is a ``torch.library`` op, so Dynamo records it as one node that the attention-swap pass can
find by target. In eager it looks up the active forward context and calls the implementation
op that compiled code calls, so eager and compiled run the same kernel on the same buffers.
"""
from __future__ import annotations

import torch

from fullgraph_backend.attention.registry import resolve_impl
from fullgraph_backend.forward_context import get_forward_context


@torch.library.custom_op("fullgraph::attention", mutates_args=())
def attention_node(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, scale: float, sliding_window: int
) -> torch.Tensor:
    """Eager body: store K/V in layer ``layer_idx``'s cache and attend, per the active context."""
    ctx = get_forward_context()
    if q.shape[0] != ctx.num_tokens:
        raise RuntimeError(f"attention got {q.shape[0]} tokens but the forward context was prepared for "
                           f"{ctx.num_tokens}; call ctx.prepare(...) for this batch first")
    if not 0 <= layer_idx < len(ctx.kv_caches):
        raise IndexError(f"layer_idx {layer_idx} out of range: the context has {len(ctx.kv_caches)} layers")
    cache = ctx.kv_caches[layer_idx]
    if k.shape[1:] != cache.shape[3:] or q.device != cache.device:
        raise ValueError(f"layer {layer_idx}: K of shape {tuple(k.shape)} on {q.device} does not fit the cache "
                         f"[.., kv_heads={cache.shape[3]}, head_dim={cache.shape[4]}] on {cache.device}")
    m = ctx.metadata
    impl = resolve_impl(ctx.attention_impl, ctx.device)
    return impl.op(q, k, v, cache, m.query_start_loc, m.seq_lens, m.block_table, m.slot_mapping,
                   scale, sliding_window)


@attention_node.register_fake
def _(q, k, v, layer_idx, scale, sliding_window):
    return q.new_empty(q.shape)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_idx: int,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal paged attention over packed tokens, through the layer's KV cache.

    ``q [num_tokens, q_heads, head_dim]``, ``k``/``v [num_tokens, kv_heads, head_dim]``, with
    ``q_heads`` a multiple of ``kv_heads`` (GQA). The new K/V are stored in the cache of layer
    ``layer_idx`` of the active :class:`~fullgraph_backend.ForwardContext`, then every token attends
    to its own request's cached tokens up to its position (the last ``sliding_window`` of them,
    if given). ``scale`` defaults to ``head_dim ** -0.5``. Returns ``[num_tokens, q_heads, head_dim]``.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"attention takes q [tokens, q_heads, dim] and k, v [tokens, kv_heads, dim]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) "
                         f"with equal head_dim ({q.shape[2]} vs {k.shape[2]})")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    return attention_node(q, k, v, layer_idx, scale if scale is not None else q.shape[-1] ** -0.5,
                          sliding_window or 0)

"""The paged KV cache layout and the sentinels that make padded lanes harmless.

Every attention implementation reads and writes one layout, and honours the sentinels defined
here (and only here):

* a layer's cache is one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
  (index 0 holds keys, 1 values); token ``p`` of a sequence lives in block
  ``block_table[req, p // block_size]`` at offset ``p % block_size``, i.e. flat slot
  ``block * block_size + offset``;
* ``NULL_BLOCK`` is reserved: padded block-table entries point at it and no request owns it;
* ``PAD_SLOT`` in ``slot_mapping`` marks a padded token, whose K/V is never stored;
* a padded request has query length 0 and ``seq_len`` 0, so nothing attends for it.
"""
from __future__ import annotations

import torch

NULL_BLOCK = 0
PAD_SLOT = -1


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Allocate one zeroed cache tensor per layer.

    Zeros, not ``empty``: kernels multiply masked-out keys by a zero probability, and an
    uninitialised NaN would survive that.
    """
    if block_size % 16:
        raise ValueError(f"block_size must be a multiple of 16, got {block_size}")
    if num_blocks < 2:
        raise ValueError(f"num_blocks must be at least 2 (block {NULL_BLOCK} is reserved), got {num_blocks}")
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def store_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write packed ``key``/``value`` ``[num_tokens, kv_heads, head_dim]`` into their slots.

    Graph-safe (no data-dependent shapes): padded tokens (``PAD_SLOT``) are redirected to the
    first slot of the null block, which nothing reads unmasked.
    """
    _, num_blocks, block_size, heads, dim = kv_cache.shape
    slots = torch.where(slot_mapping < 0, NULL_BLOCK * block_size, slot_mapping)
    kv_cache[0].view(num_blocks * block_size, heads, dim).index_copy_(0, slots, key.to(kv_cache.dtype))
    kv_cache[1].view(num_blocks * block_size, heads, dim).index_copy_(0, slots, value.to(kv_cache.dtype))

"""Hands out KV-cache blocks to requests and takes them back.

Blocks ``0 .. num_reserved - 1`` are never handed out: block 0 is the null block every padded
block-table entry points at (:data:`fullgraph_backend.NULL_BLOCK`), and the engine keeps block 1
as the scratch block its dummy requests write (warm-up). A request's block
table grows as its tokens are scheduled and is freed whole when it finishes or is preempted.
"""
from __future__ import annotations

import math
from collections import deque

from fullgraph_backend.engine.sequence import Sequence
from fullgraph_backend.kv_cache import NULL_BLOCK


class BlockManager:
    """A free list over ``num_blocks`` cache blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, num_reserved: int = 1) -> None:
        if num_reserved < 1:
            raise ValueError(f"block {NULL_BLOCK} is the null block: num_reserved must be >= 1, got {num_reserved}")
        if num_blocks <= num_reserved:
            raise ValueError(f"the KV cache has {num_blocks} blocks, {num_reserved} of them reserved: "
                             f"no block is left for requests")
        self.block_size = block_size
        self.num_usable = num_blocks - num_reserved
        self._free = deque(range(num_reserved, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return math.ceil(num_tokens / self.block_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens in all, counting the blocks it owns."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend ``seq``'s block table to hold ``num_tokens`` tokens."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: request {seq.request_id} needs {need} more, "
                               f"{len(self._free)} free (check can_grow first)")
        seq.block_table.extend(self._free.popleft() for _ in range(max(need, 0)))

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq``; its cached tokens are gone."""
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

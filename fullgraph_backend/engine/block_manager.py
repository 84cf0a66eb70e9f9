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

# How far ahead of a new run the blocks its request expects to grow into are moved to the back of
# the free order (256 blocks: 4096 tokens at block size 16).
RUN_AHEAD_BLOCKS = 256


class BlockManager:
    """A free list over ``num_blocks`` cache blocks of ``block_size`` tokens that keeps each
    request's blocks in one ascending run where it can.

    Decode attention streams a request's blocks fastest when they lie in order (H100, 32q/8kv,
    context 4096, batch 64: 351 us in order, 363 us scattered; docs/perf-notes.md, section 15). A
    growing request therefore takes the block right after its last one when that is free, and
    whenever it starts a run it moves the blocks it expects to grow into (up to
    :data:`RUN_AHEAD_BLOCKS`) to the back of the free order, where other requests reach them last.
    This is a preference, never a reservation: any free block can be handed out, so capacity is
    what it was with a plain first-in, first-out list.
    """

    def __init__(self, num_blocks: int, block_size: int, num_reserved: int = 1) -> None:
        if num_reserved < 1:
            raise ValueError(f"block {NULL_BLOCK} is the null block: num_reserved must be >= 1, got {num_reserved}")
        if num_blocks <= num_reserved:
            raise ValueError(f"the KV cache has {num_blocks} blocks, {num_reserved} of them reserved: "
                             f"no block is left for requests")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_usable = num_blocks - num_reserved
        self._is_free = bytearray(num_reserved) + bytearray(b"\x01") * self.num_usable
        # The free order: (block, stamp) entries of free blocks. A block's stamp moves on whenever
        # it is placed in the order again, so its older entries are stale; entries of taken blocks
        # are skipped too. Both are dropped lazily (no search-and-delete in a deque).
        self._stamp = [0] * num_blocks
        self._order: deque[tuple[int, int]] = deque((block, 0) for block in range(num_reserved, num_blocks))
        self._num_free = self.num_usable

    @property
    def num_free(self) -> int:
        return self._num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return math.ceil(num_tokens / self.block_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens in all, counting the blocks it owns."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self._num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend ``seq``'s block table to hold ``num_tokens`` tokens."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self._num_free:
            raise RuntimeError(f"out of KV blocks: request {seq.request_id} needs {need} more, "
                               f"{self._num_free} free (check can_grow first)")
        table = seq.block_table
        started_run = False
        for _ in range(max(need, 0)):
            after = table[-1] + 1 if table else self.num_blocks
            if after < self.num_blocks and self._is_free[after]:
                block = after
            else:
                block = self._first_free()
                started_run = True
            self._take(block)
            table.append(block)
        if started_run:  # the free blocks right after the new run go last, for this request to grow into
            ahead = min(self.blocks_for(seq.prompt_len + seq.params.max_tokens) - len(table), RUN_AHEAD_BLOCKS)
            for block in range(table[-1] + 1, min(table[-1] + 1 + ahead, self.num_blocks)):
                if not self._is_free[block]:
                    break
                self._move_back(block)

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq``; its cached tokens are gone."""
        for block in seq.block_table:
            self._release(block)
        seq.block_table = []
        seq.num_computed = 0

    def _first_free(self) -> int:
        while True:
            block, stamp = self._order.popleft()
            if self._is_free[block] and self._stamp[block] == stamp:
                return block

    def _take(self, block: int) -> None:
        self._is_free[block] = 0
        self._num_free -= 1

    def _release(self, block: int) -> None:
        self._is_free[block] = 1
        self._num_free += 1
        self._move_back(block)

    def _move_back(self, block: int) -> None:
        self._stamp[block] += 1
        self._order.append((block, self._stamp[block]))
        if len(self._order) > 4 * self.num_blocks:  # drop stale entries, keeping the order
            self._order = deque((b, st) for b, st in self._order if self._is_free[b] and self._stamp[b] == st)

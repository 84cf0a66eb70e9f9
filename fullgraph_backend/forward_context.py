"""Persistent attention metadata and the forward context that owns it.

The metadata buffers are allocated once at their maximum size and never reallocated, so a
captured CUDA graph can keep reading them: per step, host data reaches them only through
``copy_`` from pinned staging. Their tails always hold the padding sentinels of
:mod:`fullgraph_backend.kv_cache`, so any padded prefix of the buffers is a valid batch.
"""
from __future__ import annotations

import contextlib
import enum
import itertools
import math
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import numpy as np
import torch

from fullgraph_backend.kv_cache import NULL_BLOCK, PAD_SLOT, allocate_kv_caches


class BatchKind(str, enum.Enum):
    """The second half of a graph key: kernels may pick a variant per kind, never per step."""

    DECODE = "decode"  # every request has exactly one new token
    MIXED = "mixed"  # anything else: prefill, chunked prefill, decode and prefill together


@dataclass
class AttentionMetadata:
    """The per-step metadata every attention implementation reads, in the field's vocabulary."""

    query_start_loc: torch.Tensor  # [max_num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [max_num_seqs] int32, tokens in the cache after this step
    block_table: torch.Tensor  # [max_num_seqs, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [max_num_tokens] int64, cache slot of each new token

    @classmethod
    def allocate(cls, max_num_seqs: int, max_num_tokens: int, max_blocks_per_seq: int,
                 device: torch.device | str, pin_memory: bool = False) -> "AttentionMetadata":
        """Allocate buffers at their maximum size, filled with the padding sentinels."""
        kw = dict(device=device, pin_memory=pin_memory) if pin_memory else dict(device=device)
        meta = cls(
            query_start_loc=torch.zeros(max_num_seqs + 1, dtype=torch.int32, **kw),
            seq_lens=torch.zeros(max_num_seqs, dtype=torch.int32, **kw),
            block_table=torch.full((max_num_seqs, max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32, **kw),
            slot_mapping=torch.full((max_num_tokens,), PAD_SLOT, dtype=torch.int64, **kw),
        )
        return meta

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers by field name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def copy_from(self, other: "AttentionMetadata", num_reqs: int, num_tokens: int) -> None:
        """Copy the first ``num_reqs`` rows / ``num_tokens`` slots of ``other`` in place.

        The tails beyond those prefixes must already be equal in both (they hold sentinels),
        so a step moves only the rows it can have changed.
        """
        self.query_start_loc.copy_(other.query_start_loc, non_blocking=True)  # its tail repeats the total
        self.seq_lens[:num_reqs].copy_(other.seq_lens[:num_reqs], non_blocking=True)
        self.block_table[:num_reqs].copy_(other.block_table[:num_reqs], non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(other.slot_mapping[:num_tokens], non_blocking=True)


# Dims of the context's buffers whose sizes come from engine limits (num_blocks, max_num_seqs,
# max_model_len, max_num_tokens), by graph input name (``fg_<name>``, the KV caches
# ``fg_kv_cache_<layer>``). Compiled code takes them as sizes read from the buffers at run time,
# not constants: the kernels read their shapes when called anyway, and a change of those limits
# then reuses the compiled code (Inductor's cache key holds the graph's shapes).
SIZED_BY_LIMITS = {"kv_cache": (1,), "query_start_loc": (0,), "seq_lens": (0,), "block_table": (0, 1),
                   "slot_mapping": (0,)}


class ForwardContext:
    """Owns the paged KV cache, the static metadata buffers and the current step's shape.

    Create one per model, make it active with :func:`use_forward_context`, call
    :meth:`prepare` before every forward pass, then call the model (eager or compiled)::

        ctx = ForwardContext(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32)
        with use_forward_context(ctx):
            positions = ctx.prepare(query_lens=[3, 1], seq_lens=[3, 9], block_tables=[[1], [2]])
            logits = model(input_ids, positions)
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_num_seqs: int = 256,
        max_num_tokens: int = 512,
        max_model_len: int = 2048,
        block_size: int = 16,
        num_blocks: int | None = None,
        attention_impl: str = "auto",
    ) -> None:
        self.device = torch.device(device)
        if max_num_tokens < 1 or max_num_seqs < 1 or max_model_len < 1:
            raise ValueError("max_num_tokens, max_num_seqs and max_model_len must be positive")
        self.max_num_seqs, self.max_num_tokens, self.max_model_len = max_num_seqs, max_num_tokens, max_model_len
        self.block_size = block_size
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        # default: room for every sequence at full length, plus the null block
        self.num_blocks = num_blocks or max_num_seqs * self.max_blocks_per_seq + 1
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        # a name ("auto" or an implementation), resolved for the device where attention runs: by the
        # backend when it compiles, by the attention op in eager mode (the context only holds buffers)
        self.attention_impl = attention_impl
        self.kv_caches = allocate_kv_caches(num_layers, self.num_blocks, block_size, num_kv_heads, head_dim,
                                            dtype, self.device)
        self.metadata = AttentionMetadata.allocate(max_num_seqs, max_num_tokens, self.max_blocks_per_seq, self.device)
        pin = self.device.type == "cuda"
        self._staging = AttentionMetadata.allocate(max_num_seqs, max_num_tokens, self.max_blocks_per_seq, "cpu", pin)
        self._positions = torch.zeros(max_num_tokens, dtype=torch.int64, pin_memory=pin)
        self._copied = torch.cuda.Event() if pin else None
        self.num_reqs = 0
        self.num_tokens = 0
        self.batch_kind = BatchKind.MIXED

    # ---- per step -------------------------------------------------------------------------
    def prepare(self, query_lens: Sequence[int], seq_lens: Sequence[int],
                block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Describe the next forward pass and return the positions of its packed tokens.

        ``query_lens[i]`` new tokens of request ``i`` are packed in order; ``seq_lens[i]`` counts
        its tokens in the cache after this step (context + new); ``block_tables[i]`` lists the
        cache blocks it owns, in order. The metadata reaches the device buffers by one
        non-blocking copy each; everything beyond this batch keeps the padding sentinels.
        """
        # numpy over all requests at once: this runs on the host every engine step
        q, s, lens, blocks = self._validate(query_lens, seq_lens, block_tables)
        num_reqs, num_tokens = len(q), int(q.sum())
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies still read the staging
        st = self._staging
        prev_reqs, prev_tokens = self.num_reqs, self.num_tokens
        table, slots, positions = st.block_table.numpy(), st.slot_mapping.numpy(), self._positions.numpy()
        # reset the rows the previous step used, then write this step's
        st.seq_lens.numpy()[:prev_reqs] = 0
        table[:prev_reqs] = NULL_BLOCK
        slots[:prev_tokens] = PAD_SLOT
        qsl = st.query_start_loc.numpy()
        qsl[1: num_reqs + 1] = np.cumsum(q)
        qsl[num_reqs + 1:] = num_tokens
        st.seq_lens.numpy()[:num_reqs] = s
        # a boolean mask selects row-major, the order in which ``blocks`` concatenates the tables
        table[:num_reqs][np.arange(self.max_blocks_per_seq) < lens[:, None]] = blocks
        request_of_token = np.repeat(np.arange(num_reqs), q)
        pos = np.arange(num_tokens) + (s - q - qsl[:num_reqs])[request_of_token]
        positions[:num_tokens] = pos
        slots[:num_tokens] = table[request_of_token, pos // self.block_size] * self.block_size + pos % self.block_size
        self.metadata.copy_from(st, max(num_reqs, prev_reqs), max(num_tokens, prev_tokens))
        positions = self._positions[:num_tokens].to(self.device, non_blocking=True, copy=True)
        if self._copied is not None:
            self._copied.record()
        self.num_reqs, self.num_tokens = num_reqs, num_tokens
        self.batch_kind = BatchKind.DECODE if bool((q == 1).all()) else BatchKind.MIXED
        return positions

    def _validate(self, query_lens, seq_lens, block_tables) -> tuple[np.ndarray, ...]:
        """Check one step's description; returns it as arrays: query lens, seq lens, block-table
        lengths and every table's entries concatenated. Per request, the checks run in the order of
        the messages below and the first failing request is reported."""
        n = len(query_lens)
        if not (n == len(seq_lens) == len(block_tables)):
            raise ValueError(f"query_lens, seq_lens and block_tables must have one entry per request "
                             f"(got {n}, {len(seq_lens)}, {len(block_tables)})")
        if not 1 <= n <= self.max_num_seqs:
            raise ValueError(f"a step needs 1 to max_num_seqs={self.max_num_seqs} requests, got {n}")
        q = np.asarray(query_lens, dtype=np.int64).reshape(n)
        s = np.asarray(seq_lens, dtype=np.int64).reshape(n)
        total = int(q.sum())
        if not 1 <= total <= self.max_num_tokens:
            raise ValueError(f"a step needs 1 to max_num_tokens={self.max_num_tokens} tokens, got {total}; "
                             f"split the batch or raise max_num_tokens")
        lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=n)
        blocks = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=np.int64, count=int(lens.sum()))
        need = -(-s // self.block_size)
        # every entry is read: kernels gather whole table rows
        bad_block = (blocks <= NULL_BLOCK) | (blocks >= self.num_blocks)
        checks = [(q < 1) | (q > s), s > self.max_model_len, (lens < need) | (lens > self.max_blocks_per_seq)]
        if not (bad_block.any() or np.logical_or.reduce(checks).any()):
            return q, s, lens, blocks
        # which request owns a bad block id matters only for the message
        checks.append(np.bincount(np.repeat(np.arange(n), lens)[bad_block], minlength=n) > 0)
        failing = np.logical_or.reduce(checks)
        i = int(failing.argmax())
        if checks[0][i]:
            raise ValueError(f"request {i}: need 1 <= query_len <= seq_len, got query_len={q[i]}, seq_len={s[i]}")
        if checks[1][i]:
            raise ValueError(f"request {i}: seq_len {s[i]} exceeds max_model_len={self.max_model_len}")
        if checks[2][i]:
            raise ValueError(f"request {i}: seq_len {s[i]} needs {need[i]} blocks of {self.block_size}, "
                             f"block table has {lens[i]} (at most {self.max_blocks_per_seq})")
        start = int(lens[:i].sum())
        b = int(blocks[start: start + lens[i]][bad_block[start: start + lens[i]]][0])
        raise ValueError(f"request {i}: block id {b} is outside 1..{self.num_blocks - 1} "
                         f"(block {NULL_BLOCK} is reserved)")

    # ---- capture --------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_metadata(self, num_tokens: int, kind: BatchKind) -> Iterator[None]:
        """Fill benign, bound-shaped metadata for warming up and capturing a graph key.

        Every padded-size lane reads one token of the null block and writes nothing, so a warmup
        run can neither corrupt the cache nor take long; the real step's metadata comes back
        afterwards (kernels may have cached host state during warmup, so it is rewritten).
        """
        saved = {k: v.clone() for k, v in self.metadata.tensors().items()}
        state = self.num_reqs, self.num_tokens, self.batch_kind
        reqs = min(num_tokens, self.max_num_seqs)
        m = self.metadata
        m.query_start_loc.copy_(torch.arange(self.max_num_seqs + 1).clamp_(max=reqs))
        m.seq_lens.fill_(0)
        m.seq_lens[:reqs] = 1
        m.block_table.fill_(NULL_BLOCK)
        m.slot_mapping.fill_(PAD_SLOT)
        self.num_reqs, self.num_tokens, self.batch_kind = reqs, num_tokens, kind
        try:
            yield
        finally:
            for k, v in saved.items():
                getattr(m, k).copy_(v)
            self.num_reqs, self.num_tokens, self.batch_kind = state


_active: ForwardContext | None = None


@contextlib.contextmanager
def use_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``ctx`` the context that attention (eager and compiled) reads, for the block."""
    global _active
    previous, _active = _active, ctx
    try:
        yield ctx
    finally:
        _active = previous


def get_forward_context() -> ForwardContext:
    """The active context; a clear error where a model runs attention outside one."""
    if _active is None:
        raise RuntimeError("fullgraph attention ran with no active ForwardContext: wrap the call in "
                           "`with fullgraph_backend.use_forward_context(ctx):` and call ctx.prepare(...) first")
    return _active


def current_forward_context() -> ForwardContext | None:
    """The active context, or None (for code that works with and without one)."""
    return _active

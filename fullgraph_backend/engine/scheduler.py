"""Continuous batching with chunked prefill under a per-step token budget.

Every step the scheduler walks the running requests first (each needs one token for a decode,
or the next chunk of its prompt), then admits waiting requests, first come first served, while
the token budget (``max_num_batched_tokens``), the request limit (``max_num_seqs``) and the KV
cache allow. A prompt longer than what is left of the budget gets a chunk now and the rest in
later steps, so steps mixing prefill chunks and decodes are the normal case. When a running
request needs a block and none is free, the most recently admitted request is preempted: its
blocks are freed and it waits at the front of the queue to be recomputed (vLLM's recompute
preemption). A request that could never fit in the cache is rejected when it is added.

A step's life: :meth:`Scheduler.schedule` picks it, the engine launches it, :meth:`commit`
counts its tokens as computed and its samples as pending, and :meth:`update` fills in the sampled
tokens and finishes requests. With asynchronous scheduling the next step is scheduled between
``commit`` and ``update``: a request whose pending token will end it by length is not scheduled
again, and one that ends on a stop token after being scheduled again wastes that one slot.
:meth:`abort` takes requests out at any point of this life.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from fullgraph_backend.engine.block_manager import BlockManager
from fullgraph_backend.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step: ``num_new[i]`` tokens of ``seqs[i]``, starting at its ``num_computed``;
    ``samples[i]``: whether it gets a new token (its every token is computed after the step)."""

    seqs: list[Sequence]
    num_new: list[int]
    samples: list[bool]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    @property
    def is_decode(self) -> bool:
        """Every request feeds exactly one token (a uniform-decode batch)."""
        return all(n == 1 for n in self.num_new)


@dataclass
class _Plan:
    """The step being built: the chosen requests, their token counts and the budget left."""

    budget: int
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)

    def chunk(self, seq: Sequence) -> int:
        """The tokens ``seq`` would feed: what it has uncomputed, cut to the budget left."""
        return min(seq.num_uncomputed, self.budget)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(n)
        self.budget -= n

    def batch(self) -> ScheduledBatch | None:
        if not self.seqs:
            return None
        samples = [s.num_computed + n == s.num_tokens for s, n in zip(self.seqs, self.num_new)]
        return ScheduledBatch(self.seqs, self.num_new, samples)


class Scheduler:
    """Decides, step by step, which tokens of which requests the model runs."""

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (after :meth:`check`)."""
        self.check(seq)
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """An error if the cache could never hold ``seq``, however long it waited."""
        longest = min(seq.prompt_len + seq.params.max_tokens, self.max_model_len)
        cached = max(seq.prompt_len, longest - 1)  # the last token is sampled, never fed
        need = self.blocks.blocks_for(cached)
        if need > self.blocks.num_usable:
            raise ValueError(f"request {seq.request_id} can never fit in the KV cache: {cached} tokens need {need} "
                             f"blocks of {self.blocks.block_size}, the cache has {self.blocks.num_usable}; lower "
                             f"max_tokens, or give the cache more blocks (num_kv_blocks / gpu_memory_utilization)")

    def has_unfinished(self) -> bool:
        """Whether any request waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch (blocks already allocated), or None when nothing can run."""
        plan = _Plan(self.max_num_batched_tokens)
        if not self._schedule_running(plan):  # a preemption means the cache is full: admit no one
            self._admit_waiting(plan)
        return plan.batch()

    def _schedule_running(self, plan: _Plan) -> bool:
        """Give the running requests, oldest first, their next tokens while the budget lasts,
        preempting the latest admitted ones when blocks run out. Whether any was preempted."""
        num_running = len(self.running)
        for seq in list(self.running):
            if not plan.budget or seq.status is not Status.RUNNING:  # preempted for an older request
                break
            if not self._last_token_in_flight(seq) and self._make_room(seq, plan):
                self._place(seq, plan)
        return len(self.running) < num_running

    def _make_room(self, seq: Sequence, plan: _Plan) -> bool:
        """Preempt the latest admitted requests until ``seq`` can grow by its chunk; False when
        ``seq`` itself, the latest left, had to go."""
        while not self.blocks.can_grow(seq, seq.num_computed + plan.chunk(seq)):
            latest = self.running.pop()
            self._preempt(latest)
            if latest is seq:
                return False
        return True

    def _admit_waiting(self, plan: _Plan) -> None:
        """Start waiting requests, first come first served, while the limits and the cache allow."""
        while self._can_admit(plan):
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._place(seq, plan)

    def _can_admit(self, plan: _Plan) -> bool:
        """Whether the head of the queue can start now; later requests wait behind it."""
        if not (self.waiting and plan.budget and len(self.running) < self.max_num_seqs):
            return False
        seq = self.waiting[0]
        # preempted while its token was in flight: it is recomputed once that token is known
        return not seq.num_pending and self.blocks.can_grow(seq, seq.num_computed + plan.chunk(seq))

    def _place(self, seq: Sequence, plan: _Plan) -> None:
        """Grow ``seq``'s blocks for its chunk and add the chunk to the step."""
        n = plan.chunk(seq)
        self.blocks.grow(seq, seq.num_computed + n)
        plan.add(seq, n)

    def commit(self, batch: ScheduledBatch) -> None:
        """``batch`` was launched: its tokens count as computed, its samples as pending tokens."""
        for seq, n, sample in zip(batch.seqs, batch.num_new, batch.samples):
            seq.num_computed += n
            if sample:
                seq.append_pending()

    def update(self, batch: ScheduledBatch, sampled: list[int | None], now: float,
               eos_token_ids: frozenset[int]) -> list[Sequence]:
        """Record a committed step's result: ``sampled[i]`` is the token of ``batch.seqs[i]`` (None: a
        prefill chunk that samples nothing). Returns the requests that finished; their blocks are freed."""
        finished = []
        for seq, token in zip(batch.seqs, sampled):
            if token is None or seq.status is Status.FINISHED:  # finished: a spare step's token
                continue
            seq.resolve(token, now)
            reason = self._finish_reason(seq, token, eos_token_ids)
            if reason:
                (self.running if seq in self.running else self.waiting).remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def abort(self, seqs: Iterable[Sequence]) -> None:
        """Finish ``seqs`` with reason ``"abort"`` wherever they are: off the queues, their blocks
        freed, their tokens in flight dropped (:meth:`update` skips finished requests). Requests
        that finished already are left as they are."""
        seqs = list(seqs)
        gone = set(seqs)
        self.running = [s for s in self.running if s not in gone]
        self.waiting = deque(s for s in self.waiting if s not in gone)
        for seq in seqs:
            if seq.status is not Status.FINISHED:
                self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.blocks.free(seq)
        seq.drop_pending()
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _finish_reason(self, seq: Sequence, token: int, eos_token_ids: frozenset[int]) -> str | None:
        p = seq.params
        if (not p.ignore_eos and token in eos_token_ids) or token in p.stop_token_ids:
            return "stop"
        if self._length_reached(seq, resolved_only=True):
            return "length"
        return None

    def _last_token_in_flight(self, seq: Sequence) -> bool:
        """Whether a token ``seq`` has in flight ends it by length: nothing more to compute. Only a
        pending token counts: a prompt of ``max_model_len`` tokens reaches the length before its
        later chunks run and its one token is sampled."""
        return seq.num_pending > 0 and self._length_reached(seq)

    def _length_reached(self, seq: Sequence, resolved_only: bool = False) -> bool:
        """Whether ``seq``'s tokens (the pending ones too, unless ``resolved_only``) reach max_tokens
        or max_model_len."""
        tokens = seq.num_tokens - (seq.num_pending if resolved_only else 0)
        return tokens - seq.prompt_len >= seq.params.max_tokens or tokens >= self.max_model_len

    def _preempt(self, seq: Sequence) -> None:
        """Free the blocks of ``seq`` (taken off the running list) and queue it first, to be recomputed."""
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

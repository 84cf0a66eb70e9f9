"""``LLM``: the offline engine on the fullgraph backend, with the interface vLLM users know.

::

    from fullgraph_backend.engine import LLM, SamplingParams
    llm = LLM(model="qwen2.5-1.5b", optimization_level=4, max_num_seqs=256, max_model_len=4096,
              dtype="auto", seed=0)
    outs = llm.generate(prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    outs[0].token_ids

Construction loads the model, sizes the KV cache, compiles and captures (``llm.startup`` says
what that cost). ``generate`` runs a batch to completion; ``add_request`` / ``step`` drive the
engine one step at a time (the serving benchmark does); ``abort_request`` drops a request.

An error inside ``generate`` or ``step`` (a KeyboardInterrupt too) aborts the requests it could
have left half done and re-raises; the engine stays ready for the next call, every block back.
With ``tensor_parallel_size > 1`` an error that stops rank 0 between the collectives of a step
(or a worker's death) also shuts the workers down: the engine then says to create a new one
(:mod:`fullgraph_backend.engine.parallel`).
"""
from __future__ import annotations

import logging
import operator
import time
import weakref
from collections import deque
from typing import Iterable, Sequence as Seq

from fullgraph_backend.engine import parallel
from fullgraph_backend.engine.block_manager import BlockManager
from fullgraph_backend.engine.config import EngineConfig
from fullgraph_backend.engine.model_runner import NUM_RESERVED_BLOCKS, SampledTokens, build_runner
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.scheduler import ScheduledBatch, Scheduler
from fullgraph_backend.engine.sequence import RequestOutput, Sequence, Status

log = logging.getLogger("fullgraph")


class LLM:
    """An engine: ``LLM(model, **options)``, options as :class:`EngineConfig` lists them."""

    def __init__(self, model: str, **options) -> None:
        self.config = c = EngineConfig.from_kwargs(model, **options)
        # tensor_parallel_size > 1: this process is rank 0, and these the others (else None)
        self.workers = parallel.start(c)
        with parallel.lockstep(self.workers):  # startup: an error on one rank stops them all
            start = time.perf_counter()
            loaded, self.max_model_len, self.runner = build_runner(c, self.workers)
            load_s = time.perf_counter() - start
            self.startup = self.runner.warm_up()
            self.startup.load_s = load_s
        if self.workers is not None:  # stop them when the engine goes, or at the latest when the interpreter exits
            weakref.finalize(self, self.workers.close)
        self.model_config = loaded.model.config
        self.eos_token_ids, self.tokenizer = loaded.eos_token_ids, loaded.tokenizer
        blocks = self.runner.ctx.num_blocks
        self.block_manager = BlockManager(blocks, c.block_size, num_reserved=NUM_RESERVED_BLOCKS)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=c.max_num_seqs,
                                   max_num_batched_tokens=c.max_num_batched_tokens, max_model_len=self.max_model_len)
        self._next_id = 0
        self._requests: dict[int, Sequence] = {}  # added, not yet handed back or aborted
        self._outputs: list[RequestOutput] = []  # finished, handed back by the next step()
        self._in_flight: deque[tuple[ScheduledBatch, SampledTokens]] = deque()  # launched, not read back
        log.info("fullgraph engine: %s", self.startup)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt: Seq[int] | str, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> int:
        """Queue one request; returns its id. Bad input is a ValueError naming the problem."""
        seq = self._make_sequence(prompt, params or SamplingParams(), arrival_time)
        self.scheduler.check(seq)
        self._queue(seq)
        return seq.request_id

    def abort_request(self, request_id: int) -> bool:
        """Drop a waiting or running request (one with a token in flight too) and free its blocks;
        :meth:`step` never hands it back. Returns whether there was such a request. As in vLLM, any
        other id (handed back already, aborted already, never issued) is ignored: a request can
        finish between a caller's decision to abort it and the call."""
        seq = self._requests.get(request_id)
        if seq is None:
            return False
        self._abort([seq])
        return True

    def has_unfinished(self) -> bool:
        """Whether a request added is not yet handed back by :meth:`step` (nor aborted)."""
        return bool(self._requests or self._outputs)

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, collect the results of steps that are done; the requests
        that finished.

        With ``async_scheduling`` one step stays in flight: the next is scheduled and launched
        while the device runs it, and its tokens are read back one call later.

        An error, KeyboardInterrupt included, aborts every request the step could have left half
        done: the running ones and those with a token in flight (their blocks are freed, the
        error's notes list their ids), then re-raises. Requests still waiting keep their place;
        those that finished before the error are handed back by the next call.
        """
        try:
            self._step()
        except BaseException as error:
            self._abort_after(error)
            raise
        outputs, self._outputs = self._outputs, []
        return outputs

    def _step(self) -> None:
        batch = self.scheduler.schedule()
        if batch is not None:
            self._in_flight.append((batch, self.runner.execute(batch)))
            self.scheduler.commit(batch)
        elif not self._in_flight and self.scheduler.has_unfinished():  # add() rejects what can never fit
            raise RuntimeError(f"the scheduler is stuck with {len(self.scheduler.waiting)} waiting requests")
        depth = 1 if self.config.async_scheduling else 0
        # read back down to ``depth`` steps in flight; all of them when nothing new launched or when
        # every request has finished (what is left in flight is spare)
        while self._in_flight and (len(self._in_flight) > depth or batch is None
                                   or not self.scheduler.has_unfinished()):
            done, tokens = self._in_flight.popleft()
            for seq in self.scheduler.update(done, tokens.wait(), time.perf_counter(), self.eos_token_ids):
                self._hand_back(seq)

    def _abort_after(self, error: BaseException) -> None:
        """After ``error`` in a step: hand back the requests that finished, abort all others but
        those waiting with no token in flight (they hold no blocks and recompute from their tokens)."""
        queued = set(self.scheduler.waiting)
        finished = [s for s in self._requests.values() if s.status is Status.FINISHED]
        for seq in finished:
            self._hand_back(seq)
        doomed = [s for s in self._requests.values()
                  if s.status is Status.RUNNING or s.num_pending or s not in queued]
        self._abort(doomed)
        if doomed:
            ids = [s.request_id for s in doomed]
            error.add_note(f"fullgraph: the failed step aborted {len(ids)} request(s): "
                           f"{ids[:20]}{' ...' if len(ids) > 20 else ''}")

    def generate(self, prompts: Seq[Seq[int] | str] | Seq[int] | str,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` (token-id lists, or strings where a tokenizer exists) to completion.

        One ``SamplingParams`` for all, or one per prompt. Every prompt is checked before any
        runs. Returns one :class:`RequestOutput` per prompt, in order. Not to be mixed with
        requests queued by :meth:`add_request` (an error while any is unfinished).
        ``use_tqdm`` (vLLM's name) shows a progress bar of finished requests.
        """
        if self.has_unfinished():
            raise RuntimeError("generate() runs its own batch: finish the requests queued with add_request() first "
                               "(step() until has_unfinished() is False), or abort them (abort_request)")
        if isinstance(prompts, str) or (len(prompts) and not isinstance(prompts[0], str) and _is_token(prompts[0])):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if not isinstance(sampling_params, (list, tuple)):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        now = time.perf_counter()
        seqs = [self._make_sequence(p, sp, now) for p, sp in zip(prompts, params)]
        for seq in seqs:
            self.scheduler.check(seq)  # every request, before any is queued
        done: dict[int, RequestOutput] = {}
        try:
            for seq in seqs:
                self._queue(seq)
            from rich.progress import Progress  # here: rich.progress costs ~0.1 s of the engine's import

            with Progress(disable=not use_tqdm) as bar:
                task = bar.add_task("generate", total=len(seqs))
                while len(done) < len(seqs):
                    finished = self.step()
                    done.update((out.request_id, out) for out in finished)
                    bar.advance(task, len(finished))
        except BaseException:
            self._abort(seqs)
            ids = {s.request_id for s in seqs}
            self._outputs = [o for o in self._outputs if o.request_id not in ids]
            raise
        return [done[s.request_id] for s in seqs]

    # ---- helpers -------------------------------------------------------------------------
    def _queue(self, seq: Sequence) -> None:
        # recorded first: an interrupt in between must not leave a queued request that _abort misses
        self._requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def _hand_back(self, seq: Sequence) -> None:
        """``seq`` finished: its output goes out with the next :meth:`step` return."""
        self._outputs.append(RequestOutput.of(seq, self._decode(seq.output_token_ids)))
        del self._requests[seq.request_id]
        self.runner.forget(seq.request_id)

    def _abort(self, seqs: Iterable[Sequence]) -> None:
        """Abort those of ``seqs`` not yet handed back, forget them, and drop the steps in flight
        left with no token anyone waits for."""
        seqs = [s for s in seqs if self._requests.pop(s.request_id, None) is not None]
        self.scheduler.abort(seqs)
        for seq in seqs:
            self.runner.forget(seq.request_id)
        self._in_flight = deque((batch, tokens) for batch, tokens in self._in_flight
                                if any(sample and s.status is not Status.FINISHED
                                       for s, sample in zip(batch.seqs, batch.samples)))

    def _make_sequence(self, prompt, params: SamplingParams, arrival_time: float | None) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = self._token_ids(prompt)
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than max_model_len={self.max_model_len}")
        seq = Sequence(self._next_id, ids, params, time.perf_counter() if arrival_time is None else arrival_time)
        self._next_id += 1
        return seq

    def _token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this model has none: pass token id lists")
            prompt = self.tokenizer.encode(prompt)
        try:
            ids = [operator.index(t) for t in _as_list(prompt)]
        except TypeError:
            raise ValueError(f"a prompt must be a list of int token ids, got {prompt!r:.80}") from None
        if not ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab}) ({len(bad)} such ids)")
        return ids

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None


def _is_token(value: object) -> bool:
    try:
        operator.index(value)
        return True
    except TypeError:
        return False


def _as_list(prompt) -> Iterable:
    return prompt.tolist() if hasattr(prompt, "tolist") else prompt

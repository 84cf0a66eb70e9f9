"""Scheduler: chunked prefill under the token budget, mixed steps, limits, preemption, finishing."""
from __future__ import annotations

from collections import deque
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fullgraph_backend.engine.block_manager import BlockManager
from fullgraph_backend.engine.params import SamplingParams
from fullgraph_backend.engine.scheduler import Scheduler
from fullgraph_backend.engine.sequence import Sequence, Status


def make(num_blocks=64, max_num_seqs=8, budget=16, max_model_len=256, block_size=16):
    bm = BlockManager(num_blocks, block_size, num_reserved=2)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len), bm


def request(rid, prompt_len, max_tokens=4, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return Sequence(rid, list(range(1, prompt_len + 1)), params, 0.0)


def run_step(sched, token=7):
    """Schedule, pretend the model ran, sample ``token`` wherever a request samples."""
    batch = sched.schedule()
    sched.commit(batch)
    sampled = [token if s else None for s in batch.samples]
    finished = sched.update(batch, sampled, 0.0, frozenset())
    return batch, finished


def test_a_long_prompt_is_prefilled_in_chunks_then_decodes():
    sched, _ = make(budget=16)
    seq = request(0, 40)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        batch, _ = run_step(sched)
        chunks.append((batch.num_new, batch.samples))
    assert chunks == [([16], [False]), ([16], [False]), ([8], [True])]
    assert seq.output_token_ids == [7] and seq.num_computed == 40
    batch, _ = run_step(sched)
    assert batch.num_new == [1] and batch.is_decode and seq.num_computed == 41


def test_steps_mix_decodes_and_prefill_chunks_within_the_budget():
    sched, _ = make(budget=16)
    a = request(0, 10, max_tokens=8)
    sched.add(a)
    run_step(sched)  # a prefilled and sampled
    sched.add(request(1, 30))
    batch, _ = run_step(sched)
    assert [s.request_id for s in batch.seqs] == [0, 1] and batch.num_new == [1, 15]
    assert not batch.is_decode and batch.samples == [True, False] and batch.num_tokens == 16
    batch, _ = run_step(sched)
    assert batch.num_new == [1, 15] and batch.samples == [True, True]
    batch, _ = run_step(sched)
    assert batch.num_new == [1, 1] and batch.is_decode


def test_max_num_seqs_limits_running_requests():
    sched, _ = make(max_num_seqs=2, budget=64)
    for i in range(3):
        sched.add(request(i, 4))
    batch, _ = run_step(sched)
    assert [s.request_id for s in batch.seqs] == [0, 1] and len(sched.waiting) == 1


def test_a_request_waits_for_blocks_first_come_first_served():
    sched, bm = make(num_blocks=2 + 4, budget=256)  # 4 usable blocks
    sched.add(request(0, 48, max_tokens=2))  # 3 blocks
    sched.add(request(1, 40, max_tokens=2))  # 3 blocks: must wait
    sched.add(request(2, 4, max_tokens=2))  # would fit, but waits behind 1
    batch, _ = run_step(sched)
    assert [s.request_id for s in batch.seqs] == [0] and [s.request_id for s in sched.waiting] == [1, 2]
    _, finished = run_step(sched)
    assert [s.request_id for s in finished] == [0] and bm.num_free == 4
    batch, _ = run_step(sched)
    assert [s.request_id for s in batch.seqs] == [1, 2]


def test_preemption_frees_the_latest_request_and_recomputes_it():
    sched, bm = make(num_blocks=2 + 4, budget=256)
    a, b = request(0, 32, max_tokens=20), request(1, 31, max_tokens=20)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 2 blocks, b: 2 blocks; both sampled
    assert bm.num_free == 0 and a.num_tokens == 33
    batch, _ = run_step(sched)  # a needs a third block: b is preempted
    assert [s.request_id for s in batch.seqs] == [0]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.block_table == [] and b.num_preemptions == 1
    assert sched.waiting[0] is b and b.output_token_ids == [7]
    while a.status is not Status.FINISHED:
        run_step(sched)
    batch, _ = run_step(sched)  # b recomputes prompt + its first output, then samples again
    assert batch.seqs == [b] and batch.num_new == [32] and batch.samples == [True]


def test_a_request_that_can_never_fit_is_rejected_with_a_reason():
    sched, _ = make(num_blocks=2 + 4, max_model_len=1024)
    with pytest.raises(ValueError, match="can never fit in the KV cache.*80 tokens need 5 blocks"):
        sched.add(request(0, 60, max_tokens=21))
    sched.add(request(1, 60, max_tokens=5))  # 64 tokens cached at most: fits
    assert len(sched.waiting) == 1


@pytest.mark.parametrize("kw, token, outputs, reason", [
    ({"max_tokens": 3}, 7, 3, "length"),
    ({"max_tokens": 9}, 5, 1, "stop"),  # 5 is EOS
    ({"max_tokens": 9, "ignore_eos": True}, 5, 9, "length"),
    ({"max_tokens": 9, "stop_token_ids": (7,)}, 7, 1, "stop"),
])
def test_requests_finish_on_eos_stop_tokens_and_max_tokens(kw, token, outputs, reason):
    sched, bm = make()
    seq = request(0, 4, **kw)
    sched.add(seq)
    while seq.status is not Status.FINISHED:
        batch = sched.schedule()
        sched.commit(batch)
        sched.update(batch, [token if s else None for s in batch.samples], 0.0, frozenset({5}))
    assert len(seq.output_token_ids) == outputs and seq.finish_reason == reason
    assert bm.num_free == bm.num_usable and not sched.has_unfinished()


def test_generation_stops_at_max_model_len():
    sched, _ = make(max_model_len=20)
    seq = request(0, 18, max_tokens=50)
    sched.add(seq)
    while seq.status is not Status.FINISHED:
        run_step(sched)
    assert seq.num_tokens == 20 and seq.finish_reason == "length"


# ---- chunked prompts up to max_model_len ---------------------------------------------------------
def test_a_prompt_of_max_model_len_in_chunks_samples_its_one_token():
    """The regression: the scheduler took the unfinished prompt for a request whose last token
    was in flight, skipped its second chunk and got stuck."""
    sched, bm = make(budget=16, max_model_len=20)
    seq = request(0, 20, max_tokens=4)
    sched.add(seq)
    batches = [run_step(sched)[0] for _ in range(2)]
    assert [(b.num_new, b.samples) for b in batches] == [([16], [False]), ([4], [True])]
    assert seq.output_token_ids == [7] and seq.finish_reason == "length" and bm.num_free == bm.num_usable


SHORT_MODEL_LEN = 24


@pytest.mark.parametrize("prompt_len", range(1, SHORT_MODEL_LEN + 1))
@settings(max_examples=12, deadline=None)
@given(data=st.data(), depth=st.sampled_from([0, 1]))
def test_prompts_of_every_length_in_chunks_run_to_completion(prompt_len, data, depth):
    """A budget smaller than the prompt (so it is chunked), with and without a step in flight:
    the request finishes by length with ``max_tokens`` tokens, or as many as fit in
    ``max_model_len`` (at least one: a prompt of ``max_model_len`` still samples once)."""
    budget = data.draw(st.integers(1, max(1, prompt_len - 1)), label="budget")
    max_tokens = data.draw(st.integers(1, 2 * SHORT_MODEL_LEN), label="max_tokens")
    sched, bm = make(budget=budget, max_model_len=SHORT_MODEL_LEN, block_size=4)
    seq = request(0, prompt_len, max_tokens=max_tokens)
    sched.add(seq)
    in_flight = deque()
    for _ in range(-(-prompt_len // budget) + max_tokens + 1):  # chunks, decodes, one spare step
        engine_step(sched, in_flight, depth, lambda s: 7)
    assert seq.status is Status.FINISHED and seq.finish_reason == "length"
    assert len(seq.output_token_ids) == min(max_tokens, max(1, SHORT_MODEL_LEN - prompt_len))
    assert bm.num_free == bm.num_usable and not in_flight


# ---- one step in flight (asynchronous scheduling) ------------------------------------------------
def engine_step(sched, in_flight: deque, depth: int, token: Callable[[Sequence], int],
                eos=frozenset()) -> tuple:
    """What ``LLM.step`` does with the scheduler: schedule and commit a step, then update the steps
    in ``in_flight`` down to ``depth`` (all of them when nothing was scheduled or nothing is left),
    sampling ``token(seq)``. Returns the batch (or None) and the requests that finished."""
    batch = sched.schedule()
    if batch is not None:
        sched.commit(batch)
        in_flight.append(batch)
    finished = []
    while in_flight and (len(in_flight) > depth or batch is None or not sched.has_unfinished()):
        done = in_flight.popleft()
        finished += sched.update(done, [token(q) if s else None for q, s in zip(done.seqs, done.samples)], 0.0, eos)
    return batch, finished


def run_ahead(sched, steps, token=7, eos=frozenset()):
    """Drive the scheduler as the engine does with one step in flight: schedule and commit step k,
    then update step k - 1. Returns the batches and the requests finished, step by step."""
    in_flight = deque()
    steps = [engine_step(sched, in_flight, 1, lambda seq: token, eos) for _ in range(steps)]
    return [b for b, _ in steps], [f for _, f in steps]


def test_a_request_is_not_scheduled_past_its_last_token():
    sched, bm = make(budget=64)
    seq = request(0, 4, max_tokens=3)
    sched.add(seq)
    batches, finished = run_ahead(sched, 5)
    # prefill samples token 1, decodes sample 2 and 3; the step after would be spare: not scheduled
    assert [b.num_new if b else None for b in batches] == [[4], [1], [1], None, None]
    assert [[s.request_id for s in f] for f in finished] == [[], [], [], [0], []]
    assert seq.output_token_ids == [7, 7, 7] and seq.finish_reason == "length" and bm.num_free == bm.num_usable


def test_a_stop_token_found_one_step_late_wastes_one_step_and_drops_its_token():
    sched, bm = make(budget=64)
    seq = request(0, 4, max_tokens=9)
    sched.add(seq)
    batches, finished = run_ahead(sched, 3, token=5, eos=frozenset({5}))
    # step 1 (a decode of the pending EOS) was launched before step 0's EOS came back
    assert [b.num_new for b in batches[:2]] == [[4], [1]] and [s.request_id for s in finished[1]] == [0]
    assert seq.output_token_ids == [5] and seq.num_pending == 0 and seq.finish_reason == "stop"
    assert batches[2] is None and not finished[2] and bm.num_free == bm.num_usable and not sched.has_unfinished()


def test_pending_tokens_resolve_in_order():
    seq = request(0, 2)
    seq.append_pending()
    seq.append_pending()
    seq.resolve(11, 1.0)
    assert seq.token_ids == [1, 2, 11, -1] and seq.num_pending == 1
    seq.resolve(12, 2.0)
    assert seq.output_token_ids == [11, 12] and seq.token_times == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="no token in flight"):
        seq.resolve(13, 3.0)


def test_a_request_preempted_with_a_token_in_flight_waits_until_it_is_known():
    sched, bm = make(num_blocks=2 + 4, budget=256)
    a, b = request(0, 32, max_tokens=20), request(1, 31, max_tokens=20)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    sched.commit(first)  # both prefilled, both tokens pending; the cache is full
    second = sched.schedule()  # a needs a third block: b is preempted with its token in flight
    assert second.seqs == [a] and b.status is Status.WAITING and b.num_pending == 1
    sched.commit(second)
    sched.update(first, [7, 8], 0.0, frozenset())
    assert b.output_token_ids == [8] and b.num_pending == 0 and a.num_pending == 1



def test_abort_takes_a_request_out_with_its_token_in_flight():
    sched, bm = make(budget=64)
    a, b, c = request(0, 20), request(1, 4), request(2, 4)
    for seq in (a, b, c):
        sched.add(seq)
    first = sched.schedule()
    sched.commit(first)  # every token pending
    sched.abort([a, c])
    assert (a.status, a.finish_reason, a.num_pending, a.block_table) == (Status.FINISHED, "abort", 0, [])
    assert sched.running == [b] and bm.num_free == bm.num_usable - 1
    assert sched.update(first, [7, 8, 9], 0.0, frozenset()) == []  # the aborted requests' tokens are dropped
    assert a.output_token_ids == [] and b.output_token_ids == [8] and c.output_token_ids == []
    sched.abort([a])  # finished already: nothing to do
    assert a.finish_reason == "abort" and bm.num_free == bm.num_usable - 1

# ---- random workloads ----------------------------------------------------------------------------
EOS = frozenset({0})


@st.composite
def workloads(draw):
    """Scheduler limits, requests (arrival step, prompt length, max_tokens, ignore_eos, the step at
    which it is aborted or None) and how many steps stay in flight (the engine keeps at most one;
    with two, a request preempted with a token in flight can head the queue). The cache holds any
    one request, often not two: waits and preemptions."""
    block_size = draw(st.sampled_from([2, 4, 16]))
    max_model_len = draw(st.integers(4, 48))
    least = -(-max_model_len // block_size)
    limits = dict(budget=draw(st.integers(1, 40)), max_num_seqs=draw(st.integers(1, 6)), max_model_len=max_model_len,
                  block_size=block_size, num_blocks=2 + draw(st.integers(least, 3 * least)))
    requests = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(1, max_model_len), st.integers(1, 20),
                                       st.booleans(), st.none() | st.integers(0, 30)), min_size=1, max_size=8))
    return limits, requests, draw(st.sampled_from([0, 1, 2]))


def workload_token(seq: Sequence) -> int:
    """A token that depends on the request and the output's position only (EOS = 0 now and then)."""
    index = seq.num_tokens - seq.num_pending - seq.prompt_len  # the oldest pending token's
    return (7 * seq.request_id + 3 * index + 1) % 13


def drive(sched, requests, depth):
    """Add ``requests`` at their arrival steps, abort them at theirs, and run the engine's steps until
    all finished; yields each step's batch (None when nothing was scheduled) and every Sequence."""
    seqs = [request(i, length, max_tokens=m, ignore_eos=ignore) for i, (_, length, m, ignore, _) in enumerate(requests)]
    last_event = max(max(arrival, abort or 0) for arrival, *_, abort in requests)
    in_flight = deque()
    for step in range(2000):
        for seq, (arrival, *_, abort) in zip(seqs, requests):
            if arrival == step:
                sched.add(seq)
            if abort == step and arrival <= step:
                sched.abort([seq])
        if step > last_event and not sched.has_unfinished() and not in_flight:
            return
        yield engine_step(sched, in_flight, depth, workload_token, EOS)[0], seqs
    raise AssertionError(f"unfinished after 2000 steps: {sched.running} running, {list(sched.waiting)} waiting")


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_random_workloads_keep_the_limits_and_finish_every_request(workload):
    """Requests aborted before they finish end with reason "abort" and give their blocks back."""
    limits, requests, depth = workload
    sched, bm = make(**limits)
    for batch, seqs in drive(sched, requests, depth):
        assert batch is None or batch.num_tokens <= limits["budget"]
        assert len(sched.running) <= limits["max_num_seqs"]
        assert bm.num_free + sum(len(s.block_table) for s in seqs) == bm.num_usable  # no block leaked or shared
    assert bm.num_free == bm.num_usable
    for seq in seqs:
        out, limit = seq.output_token_ids, min(seq.params.max_tokens, max(1, limits["max_model_len"] - seq.prompt_len))
        assert seq.status is Status.FINISHED and seq.num_pending == 0
        stops = [i for i, t in enumerate(out) if t in EOS and not seq.params.ignore_eos]
        if seq.finish_reason == "stop":
            assert stops == [len(out) - 1] and len(out) <= limit, seq
        elif seq.finish_reason == "length":
            assert not stops and len(out) == limit, seq
        else:
            assert seq.finish_reason == "abort" and not stops and len(out) < limit, seq

"""The engine survives its users: an error or a KeyboardInterrupt at any phase of a step (schedule,
the forward context's prepare, the model call or a graph replay, sampling, commit, update), in
``generate`` or in step-driven use, with and without asynchronous scheduling, aborts the requests
the engine documents, leaks no block and leaves an engine that gives a fresh engine's tokens;
``abort_request`` drops a request wherever it is."""
from __future__ import annotations

import re

import pytest

from helpers import make_llm, mixed_prompts, sharp_model, write_hf_model
from fullgraph_backend.cuda_graph import EmulatedGraphs
from fullgraph_backend.engine import SamplingParams

PHASES = ("schedule", "prepare", "model", "sample", "commit", "update")
PROMPTS = mixed_prompts(6, seed=7, max_len=30)
# greedy and seeded requests: their tokens do not depend on what the engine ran before
PARAMS = [SamplingParams(temperature=0.0, max_tokens=8) if i % 2 else
          SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=i) for i in range(len(PROMPTS))]
KV_BLOCKS = 2 + 6  # about two requests at a time: requests wait and are preempted


class InjectedError(RuntimeError):
    pass


class Faults:
    """Raises ``error`` the ``nth`` time, counted from :meth:`arm`, that the engine reaches
    ``phase``, ``before`` or ``after`` the phase's own code runs. When it fires it notes the
    requests the engine's rule then aborts: the running ones and those with a token in flight."""

    def __init__(self) -> None:
        self.armed: tuple | None = None
        self.count = 0
        self.doomed: set[int] | None = None  # None until the armed fault fired
        self.llm = None

    def install(self, llm) -> "Faults":
        """Hook every phase of ``llm``'s steps (graph replays are hooked by :func:`hook_replays`)."""
        self.llm = llm
        sched, runner = llm.scheduler, llm.runner
        sched.schedule, sched.commit, sched.update = (Hooked(getattr(sched, name), self, name)
                                                      for name in ("schedule", "commit", "update"))
        runner.ctx.prepare = Hooked(runner.ctx.prepare, self, "prepare")
        runner.model = Hooked(runner.model, self, "model")
        runner.sampler = Hooked(runner.sampler, self, "sample")
        return self

    def arm(self, phase: str, when: str, error: type[BaseException], nth: int) -> None:
        self.armed, self.count, self.doomed = (phase, when, error, nth), 0, None

    def reached(self, phase: str, when: str) -> None:
        if self.armed is None or self.armed[:2] != (phase, when):
            return
        self.count += 1
        if self.count < self.armed[3]:
            return
        error, self.armed = self.armed[2], None
        sched = self.llm.scheduler
        self.doomed = {s.request_id for s in sched.running} | {s.request_id for s in sched.waiting if s.num_pending}
        raise error(f"injected {when} {phase}")


class Hooked:
    """``target`` (a function or a callable object) telling ``faults`` before and after each call;
    other attributes read through to it."""

    def __init__(self, target, faults: Faults, phase: str) -> None:
        self._target, self._faults, self._phase = target, faults, phase

    def __call__(self, *args, **kwargs):
        self._faults.reached(self._phase, "before")
        out = self._target(*args, **kwargs)
        self._faults.reached(self._phase, "after")
        return out

    def __getattr__(self, name: str):
        return getattr(self._target, name)


def hook_replays(monkeypatch, faults: Faults) -> None:
    """Every graph the CPU stand-in captures from now on tells ``faults`` about its replays."""
    capture = EmulatedGraphs.capture

    def hooked_capture(graphs, fn, args):
        call = capture(graphs, fn, args)
        call.replay = Hooked(call.replay, faults, "replay")
        return call

    monkeypatch.setattr(EmulatedGraphs, "capture", hooked_capture)


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return write_hf_model(tmp_path_factory.mktemp("sharp"), sharp_model())


@pytest.fixture(scope="module")
def expected(sharp_dir):
    """What a fresh engine gives for PROMPTS."""
    return tokens(make_llm(sharp_dir, num_kv_blocks=KV_BLOCKS).generate(PROMPTS, PARAMS))


def tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def assert_clean(llm) -> None:
    """Nothing queued, running or in flight; every block free; no per-request sampler state."""
    assert not llm.has_unfinished() and not llm.scheduler.has_unfinished() and not llm._in_flight
    assert llm.block_manager.num_free == llm.block_manager.num_usable
    assert not llm.runner.sampler._request_generators


def noted_ids(error: BaseException) -> set[int]:
    """The request ids the engine's note on ``error`` says it aborted."""
    notes = [n for n in getattr(error, "__notes__", ()) if "aborted" in n]
    return {int(i) for n in notes for i in re.findall(r"\d+", n.split(":", 2)[-1])}


# ---- generate ------------------------------------------------------------------------------------
# (where the fault fires, what it raises, at which time the phase is reached)
GENERATE_FAULTS = (("before", InjectedError, 1), ("after", KeyboardInterrupt, 3))


def fail_generate_then_rerun(llm, faults, phase, expected) -> None:
    for when, error, nth in GENERATE_FAULTS:
        faults.arm(phase, when, error, nth)
        with pytest.raises(error, match="injected"):
            llm.generate(PROMPTS, PARAMS)
        assert faults.doomed is not None
        assert_clean(llm)
        assert tokens(llm.generate(PROMPTS, PARAMS)) == expected, (when, error)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("phase", PHASES)
def test_a_fault_in_generate_aborts_its_requests_and_the_engine_runs_on(sharp_dir, expected, phase,
                                                                        async_scheduling):
    llm = make_llm(sharp_dir, num_kv_blocks=KV_BLOCKS, async_scheduling=async_scheduling)
    fail_generate_then_rerun(llm, Faults().install(llm), phase, expected)


def test_a_fault_inside_a_graph_replay(sharp_dir, expected, monkeypatch):
    """-O4 (full graphs, on CPU the emulated replay): the fault fires with the inputs staged."""
    faults = Faults()
    hook_replays(monkeypatch, faults)
    llm = make_llm(sharp_dir, 4, num_kv_blocks=KV_BLOCKS)
    fail_generate_then_rerun(llm, faults.install(llm), "replay", expected)


# ---- step by step --------------------------------------------------------------------------------
STEP_FAULTS = (("before", InjectedError, 4), ("after", KeyboardInterrupt, 9))


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("phase", PHASES)
def test_a_fault_in_step_aborts_the_running_requests_and_the_rest_finish(sharp_dir, expected, phase,
                                                                        async_scheduling):
    """The failed step aborts the running requests and those with a token in flight (the error's
    note lists them); every other request is handed back once, with a fresh engine's tokens."""
    llm = make_llm(sharp_dir, num_kv_blocks=KV_BLOCKS, async_scheduling=async_scheduling)
    faults = Faults().install(llm)
    for when, error, nth in STEP_FAULTS:
        prompt_of = {llm.add_request(p, sp): i for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))}
        faults.arm(phase, when, error, nth)
        outputs, noted = [], None
        while llm.has_unfinished():
            try:
                outputs += llm.step()
            except error as e:
                assert noted is None and "injected" in str(e)
                noted = noted_ids(e)
        assert noted is not None and noted == faults.doomed, (when, error)
        handed_back = [o.request_id for o in outputs]
        assert len(set(handed_back)) == len(handed_back) and set(handed_back) == set(prompt_of) - noted
        assert all(o.token_ids == expected[prompt_of[o.request_id]] for o in outputs)
        assert_clean(llm)


SHORT_AND_LONG = [SamplingParams(temperature=0.0, max_tokens=1), SamplingParams(temperature=0.0, max_tokens=8)]


def test_requests_that_finished_before_a_fault_are_handed_back_by_the_next_step(sharp_dir):
    llm = make_llm(sharp_dir, async_scheduling=False)
    faults = Faults().install(llm)
    short, long = (llm.add_request(p, sp) for p, sp in zip(PROMPTS, SHORT_AND_LONG))
    faults.arm("update", "after", InjectedError, 1)  # the update that finishes ``short``
    with pytest.raises(InjectedError) as failed:
        llm.step()
    assert noted_ids(failed.value) == {long}
    assert [o.request_id for o in llm.step()] == [short] and llm.step() == []
    assert_clean(llm)


def test_a_failed_generate_hands_back_nothing(sharp_dir):
    llm = make_llm(sharp_dir, async_scheduling=False)
    faults = Faults().install(llm)
    faults.arm("update", "after", InjectedError, 1)  # after one of its requests finished
    with pytest.raises(InjectedError):
        llm.generate(PROMPTS[:2], SHORT_AND_LONG)
    assert_clean(llm)
    assert llm.step() == []


# ---- abort_request -------------------------------------------------------------------------------
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_request_drops_a_request_wherever_it_is(sharp_dir, expected, async_scheduling):
    llm = make_llm(sharp_dir, num_kv_blocks=KV_BLOCKS, async_scheduling=async_scheduling)
    prompt_of = {llm.add_request(p, sp): i for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))}
    queued = llm.add_request(PROMPTS[0], PARAMS[0])
    assert llm.abort_request(queued)  # before any step
    outputs = llm.step() + llm.step() + llm.step()
    running, preempted = llm.scheduler.running[0], llm.scheduler.waiting[-1]
    assert running.num_pending == int(async_scheduling) and preempted.num_preemptions == 1
    assert llm.abort_request(running.request_id) and llm.abort_request(preempted.request_id)
    assert not llm.abort_request(running.request_id)  # aborted already
    assert not llm.abort_request(10**6)  # never issued
    while llm.has_unfinished():
        outputs += llm.step()
    assert {o.request_id for o in outputs} == set(prompt_of) - {running.request_id, preempted.request_id}
    assert all(o.token_ids == expected[prompt_of[o.request_id]] for o in outputs)
    assert not llm.abort_request(outputs[0].request_id)  # handed back already
    assert_clean(llm)


def test_aborting_every_request_leaves_no_step_in_flight(sharp_dir, expected):
    llm = make_llm(sharp_dir, num_kv_blocks=KV_BLOCKS, async_scheduling=True)
    ids = [llm.add_request(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    llm.step()
    assert llm._in_flight
    assert all(llm.abort_request(i) for i in ids)
    assert_clean(llm)
    assert tokens(llm.generate(PROMPTS, PARAMS)) == expected

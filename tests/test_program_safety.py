"""Programs we did not write: in-place state, inputs the graph writes, aliasing, CPU scalars, threads.

Every case compares ``backend="fullgraph"`` with eager, outputs and state after every call, over
shuffled batch sizes (captured, padded, beyond the largest capture size). The differential fuzzer
builds small random programs from the operations that went wrong before.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import random
import threading

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fullgraph_backend.graph_runner import RECAPTURES_BEFORE_COPYING, STABLE_REPLAYS
from helpers import RunnerCapture

CAPTURE = [1, 2, 4, 8]
DEVICE = torch.device("cpu")


def _compile(fn, compiler="eager", **options):
    backend = RunnerCapture(compiler=compiler, capture_sizes=CAPTURE, **options)
    return torch.compile(fn, backend=backend), backend


# ---- the cases a user reported ------------------------------------------------------------------
def test_write_to_an_input_reaches_the_caller():
    def f(x, cache):
        cache[:, :2].copy_(x[:, :2] * 2)
        return (cache * x).sum(-1)

    compiled, _ = _compile(f)
    with torch.inference_mode():
        for i, n in enumerate([5, 3, 8, 5, 2, 11]):
            x, cache = torch.randn(n, 3), torch.randn(n, 3)
            expected_cache = cache.clone()
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(cache, 0)
            expected = f(x, expected_cache)
            torch.testing.assert_close(compiled(x, cache), expected, msg=f"call {i}")
            torch.testing.assert_close(cache, expected_cache, msg=f"the caller's cache after call {i}")


_STATE = torch.zeros(2, 8, 3)


def test_global_written_in_place_keeps_the_write():
    global _STATE

    def f(x, pos):
        _STATE.index_copy_(1, pos, x)
        return _STATE.sum(1)

    compiled, _ = _compile(f)
    eager_state, state = torch.zeros(2, 8, 3), torch.zeros(2, 8, 3)
    with torch.inference_mode():
        for p in range(5):
            x, pos = torch.randn(2, 1, 3), torch.tensor([p])
            _STATE = eager_state
            expected = f(x, pos)
            _STATE = state
            torch.testing.assert_close(compiled(x, pos), expected)
            torch.testing.assert_close(state, eager_state, msg=f"the global after call {p}")


def test_batch_dependent_write_into_state_is_not_padded(caplog):
    """Padded rows would leak into a buffer written with a batch reduction: exact sizes instead."""

    class Stats(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("total", torch.zeros(4))

        def forward(self, x):
            self.total.add_(x.sum(0))
            return x * self.total

    eager = Stats()
    model = copy.deepcopy(eager)
    compiled, backend = _compile(model)
    with caplog.at_level(logging.WARNING, logger="fullgraph"), torch.inference_mode():
        for i, n in enumerate([5, 3, 7, 3]):
            x = torch.randn(n, 4)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), eager(x), msg=f"call {i}")
            torch.testing.assert_close(model.total, eager.total)
    assert not backend.runner.pad
    assert any("not padding" in r.getMessage() for r in caplog.records)


def test_inputs_sharing_memory_with_a_write_run_without_graphs(caplog):
    def f(a, b):
        a.mul_(2)
        return b + 1

    compiled, backend = _compile(f)
    with caplog.at_level(logging.WARNING, logger="fullgraph"), torch.inference_mode():
        for n in (4, 6):
            base, expected_base = torch.randn(n, 4), None
            expected_base = base.clone()
            expected = f(expected_base, expected_base[:, :2])
            torch.testing.assert_close(compiled(base, base[:, :2]), expected)
            torch.testing.assert_close(base, expected_base)
    assert not backend.runners[0].use_graphs
    assert any("share memory" in r.getMessage() for r in caplog.records)


def test_output_that_is_an_input_view_holds_the_written_values():
    def f(x, cache):
        cache.add_(x)
        return cache[:, :2], x * 2

    compiled, _ = _compile(f)
    with torch.inference_mode():
        for i, n in enumerate([5, 3, 8]):
            x, cache = torch.randn(n, 4), torch.randn(n, 4)
            expected_cache = cache.clone()
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(cache, 0)
            view, doubled = compiled(x, cache)
            expected_view, expected_doubled = f(x, expected_cache)
            torch.testing.assert_close(view, expected_view)
            torch.testing.assert_close(doubled, expected_doubled)
            torch.testing.assert_close(cache, expected_cache)


@pytest.mark.parametrize("device", [DEVICE, pytest.param(torch.device("cuda"), marks=pytest.mark.gpu)])
def test_earlier_output_fed_back_as_input(device):
    """``x = f(x)``: the input lives in memory the replay overwrites (on CUDA, where outputs are not
    copies); it must be read first. Fed-back outputs alternate with the caller's own tensors, new
    and used again, across sizes that capture new graphs: the runner remembers the addresses of its last
    call without such inputs, and must still see the next one that has them."""
    layer = nn.Linear(6, 6).to(device).eval().requires_grad_(False)
    compiled, _ = _compile(layer)
    plan = ["fresh 5", "fed", "fed", "same", "fresh 3", "fed", "same", "same", "fresh 5", "fed", "fresh 2",
            "fed", "fed", "fresh 3", "same", "fed"]
    with torch.inference_mode():
        own = torch.randn(5, 6, device=device)
        torch._dynamo.mark_dynamic(own, 0)
        out = None
        for i, what in enumerate(plan):
            if what.startswith("fresh") and i:
                own = torch.randn(int(what.split()[1]), 6, device=device)
            x = out if what == "fed" else own  # a fed-back output is unreadable after the next call
            expected = layer(x.clone())
            out = compiled(x)
            torch.testing.assert_close(out, expected, msg=f"call {i} ({what})")


# ---- threads -----------------------------------------------------------------------------------
def race(model, device, threads, calls, width, compiler, lock=None):
    """``threads`` threads call one compiled ``model`` with random sizes (cloning each output, under
    ``lock`` if given); returns how many outputs differed from eager."""
    compiled, _ = _compile(model, compiler)
    with torch.inference_mode():
        first = torch.randn(5, width, device=device)
        torch._dynamo.mark_dynamic(first, 0)
        compiled(first)
    rng = random.Random(threads)
    work = [[torch.randn(rng.choice([2, 3, 5, 7, 8]), width, device=device) for _ in range(calls)]
            for _ in range(threads)]
    wrong, errors = [], []

    def run(inputs):
        try:
            with torch.inference_mode():
                for x in inputs:
                    with lock or contextlib.nullcontext():
                        got = compiled(x).clone()
                    if not torch.allclose(got, model(x), atol=1e-4, rtol=1e-4):
                        wrong.append(x.shape[0])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    pool = [threading.Thread(target=run, args=(w,)) for w in work]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    return len(wrong)


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_calling_one_compiled_model_get_their_own_results(threads):
    """On CPU each call hands out its own outputs: no lock of the caller's is needed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval().requires_grad_(False)
    assert race(model, DEVICE, threads, calls=30, width=8, compiler="eager") == 0


# ---- differential fuzzer -------------------------------------------------------------------------
D = 8
_GLOBAL = torch.zeros(D)


def _elementwise(m, h, x, y, s):
    return torch.sin(h) * 1.5 + x


def _matmul(m, h, x, y, s):
    return h @ m.weight


def _row_norm(m, h, x, y, s):
    return h - h.mean(-1, keepdim=True)


def _view_flip(m, h, x, y, s):
    return h.view(h.shape[0], 2, D // 2).flip(-1).reshape(h.shape[0], D)


def _write_input(m, h, x, y, s):
    y.add_(h * 0.5)
    return h + y


def _write_input_view(m, h, x, y, s):
    y[:, :2].copy_(h[:, :2])
    return h * 0.5


def _write_buffer(m, h, x, y, s):
    m.buf.mul_(0.5).add_(1.0)
    return h + m.buf


def _write_buffer_from_batch(m, h, x, y, s):
    m.buf.add_(h.mean(0) * 0.01)
    return h - m.buf


def _write_global(m, h, x, y, s):
    _GLOBAL.add_(0.25)
    return h * _GLOBAL


def _cpu_scalar(m, h, x, y, s):
    return h * s.to(h.device)


OPS = [_elementwise, _matmul, _row_norm, _view_flip, _write_input, _write_input_view, _write_buffer,
       _write_buffer_from_batch, _write_global, _cpu_scalar]


class Program(nn.Module):
    """``ops`` applied in order to ``h = x``; returns ``h`` and, if asked, a view of the written input."""

    def __init__(self, ops, return_view: bool):
        super().__init__()
        self.ops, self.return_view = ops, return_view
        self.weight = nn.Parameter(torch.randn(D, D) / D ** 0.5, requires_grad=False)
        self.register_buffer("buf", torch.randn(D))

    def forward(self, x, y, s):
        h = x
        for op in self.ops:
            h = op(self, h, x, y, s)
        return (h, y[:, 1:3]) if self.return_view else h


def _run_program(ops, return_view, sizes, compiler, device):
    global _GLOBAL
    torch.manual_seed(0)
    eager = Program(ops, return_view).to(device)
    model = copy.deepcopy(eager)
    compiled, _ = _compile(model, compiler)
    globals_ = {"eager": torch.zeros(D, device=device), "compiled": torch.zeros(D, device=device)}
    gen = torch.Generator().manual_seed(len(sizes))
    with torch.inference_mode():
        for i, n in enumerate(sizes):
            x = torch.randn(n, D, generator=gen).to(device)
            y = torch.randn(n, D, generator=gen).to(device)
            s = torch.tensor(float(i + 1) / 3)  # a CPU scalar, whatever the device
            y_eager = y.clone()
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(y, 0)
            _GLOBAL = globals_["eager"]
            expected = eager(x, y_eager, s)
            _GLOBAL = globals_["compiled"]
            got = compiled(x, y, s)
            where = f"call {i} (batch {n}) of {[op.__name__ for op in ops]}"
            for g, e in zip(got if return_view else [got], expected if return_view else [expected]):
                torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4, msg=where)
            torch.testing.assert_close(y, y_eager, msg=f"written input after {where}")
            torch.testing.assert_close(model.buf, eager.buf, msg=f"buffer after {where}")
            torch.testing.assert_close(globals_["compiled"], globals_["eager"], msg=f"global after {where}")


programs = st.tuples(st.lists(st.sampled_from(OPS), min_size=1, max_size=5), st.booleans(),
                     st.lists(st.integers(1, 11), min_size=3, max_size=7))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
@example(program=([_write_input], True, [2, 1, 1]))  # see the CUDA variant below
def test_random_programs_match_eager(program):
    ops, return_view, sizes = program
    torch._dynamo.reset()
    _run_program(ops, return_view, [max(2, sizes[0]), *sizes[1:]], "eager", DEVICE)


@pytest.mark.parametrize("ops", [
    [_write_input, _matmul, _write_buffer, _write_global],
    [_row_norm, _write_input_view, _cpu_scalar, _write_buffer_from_batch],
])
def test_programs_with_inductor_match_eager(ops):
    _run_program(ops, True, [5, 3, 8, 2, 11, 5], "inductor", DEVICE)


# ---- on a GPU: captured CUDA graphs ----------------------------------------------------------------
def _cpu_scalar_operand(m, h, x, y, s):
    return h * s  # a CPU scalar tensor used by a CUDA op directly (no copy): the graph must not freeze it


CUDA = torch.device("cuda")


@pytest.mark.gpu
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
# found on the H200: a view of an adopted input was taken for graph memory, cloned away from the
# caller's tensor at the next call and marked unreadable
@example(program=([_write_input], True, [2, 1, 1]))
def test_random_programs_match_eager_in_cuda_graphs(program):
    ops, return_view, sizes = program
    torch._dynamo.reset()
    _run_program(ops, return_view, [max(2, sizes[0]), *sizes[1:]], "eager", CUDA)


@pytest.mark.parametrize("device", [DEVICE, pytest.param(CUDA, marks=pytest.mark.gpu)])
def test_a_view_of_a_copied_input_is_a_view_of_the_callers_tensor(device):
    def f(x, y):
        y.add_(x)
        return x * 2, y[:, 1:3]

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="fullgraph", options={"compiler": "eager"})
    with torch.inference_mode():
        for n in (3, 5, 2):
            x, y = torch.randn(n, 4, device=device), torch.randn(n, 4, device=device)
            _, view = compiled(x, y)
            assert view.data_ptr() == y[:, 1:3].data_ptr(), f"batch {n}: the output is not a view of y"
            torch.testing.assert_close(view, y[:, 1:3])


@pytest.mark.gpu
@pytest.mark.parametrize("ops", [
    [_cpu_scalar, _write_input, _write_global],
    [_cpu_scalar_operand, _write_buffer],
    [_write_input_view, _matmul, _write_buffer_from_batch, _view_flip],
])
def test_programs_with_inductor_in_cuda_graphs(ops):
    _run_program(ops, True, [5, 3, 8, 2, 11, 5], "inductor", CUDA)


@pytest.mark.gpu
def test_reading_an_overwritten_output_raises():
    model = nn.Linear(8, 8).to(CUDA).eval().requires_grad_(False)
    compiled, _ = _compile(model, "inductor")
    with torch.inference_mode():
        x = torch.randn(5, 8, device=CUDA)
        torch._dynamo.mark_dynamic(x, 0)
        first = compiled(x)
        kept = first.clone()
        compiled(torch.randn(6, 8, device=CUDA))
        with pytest.raises(RuntimeError, match="overwritten by a later call"):
            first.sum()
        torch.testing.assert_close(kept, model(x))


@pytest.mark.gpu
@pytest.mark.parametrize("threads", [2, 4])
def test_threads_on_cuda_clone_under_their_lock(threads):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(CUDA).eval().requires_grad_(False)
    assert race(model, CUDA, threads, calls=100, width=64, compiler="inductor", lock=threading.Lock()) == 0


def test_state_input_is_read_in_place_until_it_moves(caplog):
    """A tensor without a batch dim that the graph writes (a cache, a counter) is the graph's to read
    where the caller keeps it: no copies. A new tensor captures the key again; one that keeps moving
    is copied in and out instead, logged."""

    def f(x, state):
        state.add_(x.sum(-1)[:3])
        return x * state.sum()

    compiled, backend = _compile(f)
    state, eager_state = torch.zeros(3), torch.zeros(3)
    with caplog.at_level(logging.WARNING, logger="fullgraph"), torch.inference_mode():
        for i in range(8):
            if i >= 3:  # from the fourth call on, a new state tensor each call
                state, eager_state = state.clone(), eager_state.clone()
            x = torch.randn(4, 3)
            torch.testing.assert_close(compiled(x, state), f(x, eager_state), msg=f"call {i}")
            torch.testing.assert_close(state, eager_state, msg=f"state after call {i}")
            if i == 2:
                (recording,) = backend.runner.pieces[0].recordings.values()
                assert recording.staged.adopted, "the state is not read in place"
                assert all(t is not state for t in recording.reads.values()), "the state is copied"
                # the recording knows where the state is, and keeps no reference to it: the state may
                # be another graph's output, unreadable on CUDA once that graph replays again
                held = [v for v in vars(recording.staged).values()
                        for v in (v.values() if isinstance(v, dict) else [v])]
                assert all(v is not state for v in held), "the recording holds the adopted state"
    rows = len(backend.runner.capture_table)
    assert rows == 1 + 3, f"captured {rows} times: once, then again for each of the first moves"
    assert sum("moved" in r.getMessage() for r in caplog.records) == 1


def test_state_that_stays_put_for_a_while_is_captured_again_when_it_moves(caplog):
    """transformers' generate makes a new static cache per call and keeps it for every decode step:
    a state input that stayed put for STABLE_REPLAYS calls is read in place again after it moves
    (captured again, as cudagraph trees re-record), however often that happens; one moving sooner
    would be copied (test above)."""

    def f(x, state):
        state.add_(x.sum(-1)[:3])
        return x * state.sum()

    compiled, backend = _compile(f)
    epochs = RECAPTURES_BEFORE_COPYING + 2
    with caplog.at_level(logging.WARNING, logger="fullgraph"), torch.inference_mode():
        for epoch in range(epochs):
            state, eager_state = torch.full((3,), float(epoch)), torch.full((3,), float(epoch))
            for i in range(STABLE_REPLAYS + 1):
                x = torch.randn(4, 3)
                torch.testing.assert_close(compiled(x, state), f(x, eager_state), msg=f"epoch {epoch}, call {i}")
                torch.testing.assert_close(state, eager_state, msg=f"state after epoch {epoch}, call {i}")
            (recording,) = backend.runner.pieces[0].recordings.values()
            assert recording.staged.adopted and state.data_ptr() in recording.ptrs, \
                f"epoch {epoch}: the state is not read in place"
    assert len(backend.runner.capture_table) == epochs, "one capture per state tensor"
    assert not any("moved" in r.getMessage() for r in caplog.records)


def test_state_placed_where_a_dropped_recording_was_is_the_callers():
    """A recording captured again frees its buffers; a state tensor the caller later keeps at one of
    those addresses is the caller's own: read and written in place, not copied as if it were the
    runner's memory (on the H200, transformers' new static cache landed on a dropped decode graph's
    memory, and every decode step copied it)."""

    def f(x, state):
        state.add_(x.sum(-1)[:3])
        return x * state.sum()

    compiled, backend = _compile(f)
    freed = None
    with torch.inference_mode():
        for epoch in range(3):
            if epoch < 2:
                state, eager_state = torch.full((3,), float(epoch)), torch.full((3,), float(epoch))
            else:  # where the first recording staged x, which the runner dropped at epoch 1
                state, eager_state = freed.view(-1)[:3].fill_(2.0), torch.full((3,), 2.0)
            for i in range(STABLE_REPLAYS + 1):
                x = torch.randn(4, 3)
                torch.testing.assert_close(compiled(x, state), f(x, eager_state), msg=f"epoch {epoch}, call {i}")
                torch.testing.assert_close(state, eager_state, msg=f"state after epoch {epoch}, call {i}")
            (recording,) = backend.runner.pieces[0].recordings.values()
            if epoch == 0:
                (freed,) = [t for t in recording.reads.values() if t.shape == (4, 3)]
            assert recording.staged.adopted and state.data_ptr() in recording.ptrs, \
                f"epoch {epoch}: the state is not read in place"
    assert len(backend.runner.capture_table) == 3, "one capture per state tensor"


class Scaled(nn.Module):
    """A linear times a float attribute (as transformers' attention keeps ``self.scaling``)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.linear, self.scale = nn.Linear(8, 8), scale

    def forward(self, x):
        return self.linear(x) * self.scale


def test_a_module_float_dynamo_passes_as_a_tensor_is_read_at_every_call(caplog):
    """A second instance whose float attribute differs makes Dynamo pass the float as a new tensor at
    each call: an input to copy in, not a fixed-address one (which would be captured again and again)."""
    torch.manual_seed(0)
    models = [Scaled(0.5), Scaled(0.25)]
    with caplog.at_level(logging.INFO, logger="fullgraph"), torch.inference_mode():
        for model in models:
            compiled, _ = _compile(model)
            for n in (3, 1, 4, 2, 3):
                x = torch.randn(n, 8)
                torch.testing.assert_close(compiled(x), model(x))
    assert "moved since the capture" not in caplog.text

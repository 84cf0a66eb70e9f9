"""SamplingParams validation and the sampler's numerics at extreme temperatures and logits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fullgraph_backend.engine.params import GREEDY_TEMPERATURE, SamplingParams
from fullgraph_backend.engine.sampler import Sampler


def manual_seed_accepts(seed: int) -> bool:
    try:
        torch.Generator().manual_seed(seed)
    except (ValueError, RuntimeError, OverflowError):
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.integers(-2**64, 2**65), st.sampled_from([-2**63 - 1, -2**63, 2**64 - 1, 2**64])))
def test_a_seed_is_accepted_exactly_when_manual_seed_takes_it(seed):
    if manual_seed_accepts(seed):
        assert SamplingParams(seed=seed).seed == seed
    else:
        with pytest.raises(ValueError, match=r"seed must be None or an int in \[-2\*\*63, 2\*\*64 - 1\]"):
            SamplingParams(seed=seed)


@pytest.mark.parametrize("seed", [-2**63, 2**64 - 1])
def test_seeds_at_the_ends_of_the_range_sample(seed):
    sampler = Sampler(torch.device("cpu"), seed=0)
    tokens = sampler(torch.zeros(2, 8), [SamplingParams(seed=seed)] * 2, [0, 1])
    assert tokens.shape == (2,) and 0 <= int(tokens.min()) and int(tokens.max()) < 8


@pytest.mark.parametrize("kw, message", [
    ({"temperature": 10**400}, "temperature must be a finite number"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": "1.0"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": 2.0}, "top_k"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a sequence"),
    ({"stop_token_ids": None}, "stop_token_ids must be a sequence"),
    ({"stop_token_ids": ("5",)}, "stop_token_ids"),
    ({"seed": 1.0}, "seed"),
    ({"seed": True}, "seed"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_values_that_would_fail_later_are_rejected_up_front(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


@pytest.mark.parametrize("temperature", [0.0, 1e-300, 5e-324, 1e-6, GREEDY_TEMPERATURE / 2])
def test_tiny_temperatures_are_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    mixed = [params, SamplingParams(temperature=1.0)] * 8  # sampled rows beside force the sampling path
    tokens = Sampler(torch.device("cpu"), seed=0)(logits, mixed, list(range(16)))
    assert torch.equal(tokens[::2], logits[::2].argmax(-1))


def test_the_greedy_threshold_is_where_sampling_starts():
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE * (1 - 1e-9)).greedy


logit_rows = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=2, max_size=12)
temperatures = st.one_of(st.floats(0, 1e308), st.sampled_from([GREEDY_TEMPERATURE, 1e-5 * 1.0001, 1e300, 1e308]))


@settings(max_examples=300, deadline=None)
@given(logit_rows, temperatures, st.sampled_from([-1, 1, 3]), st.sampled_from([1.0, 0.5, 1e-6]))
def test_probabilities_are_finite_at_any_temperature(row, temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = Sampler.probabilities(torch.tensor([row]), [params])
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 9), st.floats(GREEDY_TEMPERATURE, 1e30))
def test_huge_logit_gaps_sample_the_largest_at_low_temperature(best, temperature):
    # gaps of >= 1e38 / 1e30: every other token has probability exp(-1e8) = 0 at these temperatures
    logits = torch.full((1, 10), -3e38)
    logits[0, 0] = -1e38  # token 0 is what a NaN row would give
    logits[0, best] = 3e38
    token = Sampler(torch.device("cpu"), seed=0)(logits, [SamplingParams(temperature=temperature)], [0])
    assert int(token) == best

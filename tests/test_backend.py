"""End to end: the tiny decoder compiled with Inductor through backend="fullgraph" against eager."""
from __future__ import annotations

import random

import pytest
import torch

from fullgraph_backend import NULL_BLOCK, use_forward_context
from fullgraph_backend.models import build_model, get_config

from helpers import RunnerCapture, eager_then_compiled, own_block_tables, random_batch

MODES = ["full", "piecewise"]


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    return config, build_model("tiny", seed=0)


def _ctx(config):
    return config.forward_context(dtype=torch.float32, max_num_seqs=8, max_num_tokens=64, max_model_len=128)


def _generate(model, ctx, prompts, steps, first_call_dynamic):
    """Prefill every prompt in one mixed step, then decode greedily; returns per-step logits and tokens."""
    tables = own_block_tables(ctx, len(prompts))
    lens = [len(p) for p in prompts]
    logits, tokens = [], []
    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare(lens, lens, tables)
        ids = torch.tensor([t for p in prompts for t in p])
        if first_call_dynamic:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        out = model(ids, positions).clone()
        logits.append(out)
        last = out[torch.tensor(lens).cumsum(0) - 1].argmax(-1)
        for step in range(steps):
            tokens.append(last.tolist())
            lens = [n + 1 for n in lens]
            positions = ctx.prepare([1] * len(prompts), lens, tables)
            out = model(last.clone(), positions).clone()
            logits.append(out)
            last = out.argmax(-1)
    return logits, tokens


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_prefill_then_decode_matches_eager(tiny, mode):
    config, model = tiny
    ctx = _ctx(config)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 2, 7)]
    initial = [c.clone() for c in ctx.kv_caches]
    eager_logits, eager_tokens = _generate(model, ctx, prompts, 6, first_call_dynamic=False)
    eager_caches = [c.clone() for c in ctx.kv_caches]
    for cache, saved in zip(ctx.kv_caches, initial):
        cache.copy_(saved)
    backend = RunnerCapture(cudagraph_mode=mode)
    compiled = torch.compile(model, backend=backend)
    got_logits, got_tokens = _generate(compiled, ctx, prompts, 6, first_call_dynamic=True)
    for step, (got, expected) in enumerate(zip(got_logits, eager_logits)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"{mode}: step {step}")
    assert got_tokens == eager_tokens
    for got, expected in zip(ctx.kv_caches, eager_caches):
        torch.testing.assert_close(got[:, NULL_BLOCK + 1:], expected[:, NULL_BLOCK + 1:], atol=1e-5, rtol=1e-5)
    runner = backend.runners[0]
    assert runner.pad and runner.use_graphs
    assert [r.size for r in runner.capture_table] == [64, 56, 48, 40, 32, 24, 16, 8, 4, 2, 1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_random_batches_in_shuffled_sizes_match_eager(tiny, mode):
    config, model = tiny
    ctx = _ctx(config)
    compiled = torch.compile(model, backend=RunnerCapture(cudagraph_mode=mode, capture_sizes=[1, 2, 4, 8, 16, 32]))
    rng = random.Random(mode)
    gen = torch.Generator().manual_seed(1)
    tables = own_block_tables(ctx, ctx.max_num_seqs)
    sizes = [1, 3, 7, 16, 33]
    rng.shuffle(sizes)
    with use_forward_context(ctx), torch.inference_mode():
        for i, n in enumerate([6, *sizes]):
            query, seq = random_batch(rng, n, ctx.max_num_seqs, ctx.max_model_len, 
                                       decode=n <= ctx.max_num_seqs and rng.random() < 0.4)
            for cache in ctx.kv_caches:
                cache.normal_(0, 0.5, generator=gen)
            positions = ctx.prepare(query, seq, tables[: len(query)])
            ids = torch.randint(0, config.vocab_size, (n,), generator=gen)
            if i == 0:
                torch._dynamo.mark_dynamic(ids, 0)
                torch._dynamo.mark_dynamic(positions, 0)
            expected, got, after_eager = eager_then_compiled(model, compiled, ctx, ids, positions)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"{mode}: {n} tokens {query}")
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            for cache, e in zip(ctx.kv_caches, after_eager):
                torch.testing.assert_close(cache[:, NULL_BLOCK + 1:], e[:, NULL_BLOCK + 1:], atol=1e-5, rtol=1e-5,
                                           msg=f"{mode}: KV cache after {n} tokens")

"""Decode SDPA over ``repeat_kv``'s per-head copies reads the shared key/value heads
(``passes/group_query_heads.py``): the copies leave the graph, the result is eager's, and calls
the rewrite does not fit (prefill, causal, per-head masks) keep their copies with a reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from passes import group_query_heads
from passes.group_query_heads import MIN_GROUPED_PAIRS
from passes.swap_attention import SDPA_TARGETS

KV_HEADS, GROUP, HEAD_DIM, CACHE = 2, 3, 8, 11


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """transformers' copy of each key/value head once per query head of its group."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, group, s, d).reshape(b, h * group, s, d)


def attend(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, GROUP), repeat_kv(v, GROUP), attn_mask=mask,
                                          dropout_p=0.0, scale=0.3, is_causal=False)


def attend_no_mask(q, k, v):
    return F.scaled_dot_product_attention(q, repeat_kv(k, GROUP), repeat_kv(v, GROUP))


def attend_causal(q, k, v):
    return F.scaled_dot_product_attention(q, repeat_kv(k, GROUP), repeat_kv(v, GROUP), is_causal=True)


def inputs(batch: int, queries: int = 1, mask_heads: int = 1, bool_mask: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, KV_HEADS * GROUP, queries, HEAD_DIM, generator=gen)
    k, v = (torch.randn(batch, KV_HEADS, CACHE, HEAD_DIM, generator=gen) for _ in range(2))
    filled = torch.rand(batch, mask_heads, queries, CACHE, generator=gen) < 0.7
    filled[..., 0] = True  # every row attends somewhere
    mask = filled if bool_mask else torch.zeros(filled.shape).masked_fill(~filled, float("-inf"))
    return q, k, v, mask


def rewritten(fn, args, min_pairs: int | None = 0, dynamic: bool = True):
    """``fn`` compiled by Dynamo with the pass over its graph (every input's batch dynamic, unless
    ``dynamic`` is False), called once on ``args``; with the graph and the pass's report. The pass
    groups at every batch unless ``min_pairs`` says otherwise (None: its default)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, group_query_heads(gm, min_pairs)))
        return gm.forward

    for x in args:
        if dynamic:
            torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    compiled(*args)
    ((gm, report),) = seen
    return compiled, gm, report


def sdpa_inputs(gm) -> list[tuple[int, ...]]:
    """The shapes of each SDPA's query, key and value, as traced."""
    return [tuple(tuple(a.meta["example_value"].shape) for a in n.args[:3])
            for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


@pytest.mark.parametrize("bool_mask", [False, True])
def test_decode_sdpa_reads_shared_heads_and_matches_eager(bool_mask):
    compiled, gm, report = rewritten(attend, inputs(3, bool_mask=bool_mask))
    assert len(report.grouped) == 1 and not report.skipped
    assert not any(n.target == "expand" and n.args[0].meta["example_value"].dim() == 5 for n in gm.graph.nodes)
    ((q, k, v),) = sdpa_inputs(gm)
    assert q[1:] == (KV_HEADS, GROUP, HEAD_DIM) and k[1:] == v[1:] == (KV_HEADS, CACHE, HEAD_DIM)
    for batch in (5, 1, 3):  # the batch is dynamic: other sizes, fresh values
        args = inputs(batch, bool_mask=bool_mask, seed=batch)
        torch.testing.assert_close(compiled(*args), attend(*args), rtol=1e-5, atol=1e-6)


def test_without_a_mask_too():
    compiled, _, report = rewritten(attend_no_mask, inputs(2)[:3])
    assert len(report.grouped) == 1
    args = inputs(4, seed=4)[:3]
    torch.testing.assert_close(compiled(*args), attend_no_mask(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn, args, reason", [
    (attend, inputs(2, queries=4), "more than one query position"),
    (attend, inputs(2, mask_heads=KV_HEADS * GROUP), "the mask is not one row per sequence"),
    (attend_causal, inputs(2)[:3], "is_causal"),
])
def test_calls_the_rewrite_does_not_fit_keep_their_copies(fn, args, reason):
    compiled, _, report = rewritten(fn, args)
    assert not report.grouped and len(report.skipped) == 1 and reason in report.skipped[0]
    assert reason in report.summary()
    torch.testing.assert_close(compiled(*args), fn(*args))


@pytest.mark.parametrize("batch, dynamic, reason", [
    (MIN_GROUPED_PAIRS // KV_HEADS, False, None),
    (MIN_GROUPED_PAIRS // KV_HEADS - 1, False, f"key/value heads < {MIN_GROUPED_PAIRS} pairs"),
    (MIN_GROUPED_PAIRS // KV_HEADS, True, "the batch is dynamic"),
])
def test_by_default_only_batches_known_to_give_enough_pairs_group(batch, dynamic, reason):
    """At batch 1 the grouped call ran slower than the copy it saves, at batch 8 faster (H200): the
    pass groups where batch x key/value heads is known to reach MIN_GROUPED_PAIRS, and says why not."""
    args = inputs(batch)
    compiled, _, report = rewritten(attend, args, min_pairs=None, dynamic=dynamic)
    if reason is None:
        assert len(report.grouped) == 1 and not report.skipped
    else:
        assert not report.grouped and len(report.skipped) == 1 and reason in report.skipped[0]
    torch.testing.assert_close(compiled(*args), attend(*args), rtol=1e-5, atol=1e-6)


def test_sdpa_over_unrepeated_heads_is_not_reported():
    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(2, KV_HEADS, 1, HEAD_DIM)
    _, _, report = rewritten(plain, (q, q.clone(), q.clone()))
    assert not report.grouped and not report.skipped
    assert report.summary() == "no SDPA over per-head copies of keys and values"

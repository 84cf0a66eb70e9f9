"""GPU: the compiled tiny decoder against eager at every capture size up to 128 and between them.

Run on the GPU machine: ``PYTHONPATH=. python -m pytest -m gpu tests/test_backend_gpu.py``.
"""
from __future__ import annotations

import random

import pytest
import torch

from fullgraph_backend import use_forward_context
from fullgraph_backend.attention.registry import get_impl
from fullgraph_backend.config import default_capture_sizes

from helpers import eager_then_compiled, own_block_tables, random_batch

pytestmark = pytest.mark.gpu

MAX_TOKENS = 128
SIZES = [s for s in default_capture_sizes() if s <= MAX_TOKENS] + [7, 25, 45, 123]


def _impls() -> list[str]:
    return [name for name in ("reference", "triton") if _runs(name)]


def _runs(name: str) -> bool:
    try:
        return get_impl(name).unavailable() is None
    except ValueError:
        return False


def _fresh(ctx):
    for cache in ctx.kv_caches:
        cache.normal_(0, 0.5)


@pytest.fixture()
def model_and_ctx():
    from fullgraph_backend.models import build_model, get_config

    torch._dynamo.reset()
    config = get_config("tiny")
    model = build_model(config, seed=0, dtype=torch.float32, device="cuda")
    yield model, config
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["full", "piecewise"])
@pytest.mark.parametrize("impl", _impls())
def test_compiled_matches_eager_at_every_size(model_and_ctx, mode, impl):
    model, config = model_and_ctx
    ctx = config.forward_context(dtype=torch.float32, device="cuda", max_num_seqs=64, max_num_tokens=MAX_TOKENS,
                                 max_model_len=256, attention_impl=impl)
    compiled = torch.compile(model, backend="fullgraph", options={"cudagraph_mode": mode})
    rng = random.Random(0)
    sizes = SIZES[:]
    rng.shuffle(sizes)
    sizes.insert(0, 64)  # the first call compiles: symbolic sizes need >= 2 tokens
    tables = own_block_tables(ctx, 64)
    with use_forward_context(ctx), torch.inference_mode():
        for n in sizes:
            query, seq = random_batch(rng, n, 64, 256, decode=n <= 64 and rng.random() < 0.5)
            _fresh(ctx)
            positions = ctx.prepare(query, seq, tables[: len(query)])
            ids = torch.randint(0, config.vocab_size, (n,), device="cuda")
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            expected, got, after_eager = eager_then_compiled(model, compiled, ctx, ids, positions)
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4, msg=f"size {n} ({mode}, {impl})")
            for c, e in zip(ctx.kv_caches, after_eager):  # padded lanes may only touch the null block
                torch.testing.assert_close(c[:, 1:], e[:, 1:], atol=1e-5, rtol=1e-5,
                                           msg=f"KV cache after size {n}")


def test_replay_with_moved_weights_reads_them_where_they_are(model_and_ctx):
    """A weight moved after capture (same values in new memory, the old memory changed): the graph is
    captured again for the new address, as cudagraph trees re-record, and the output is eager's."""
    model, config = model_and_ctx
    ctx = config.forward_context(dtype=torch.float32, device="cuda", max_num_seqs=8, max_num_tokens=16,
                                 max_model_len=64)
    compiled = torch.compile(model, backend="fullgraph")
    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([3, 1], [3, 5], [[1], [2]])
        ids = torch.randint(0, config.vocab_size, (4,), device="cuda")
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        compiled(ids, positions)
    weight = next(model.parameters())
    old = weight.data
    weight.data = weight.data.clone()  # outside inference mode, so Dynamo's guards still pass
    with torch.no_grad():
        old.mul_(0.5)  # what a stale replay would read
    with use_forward_context(ctx), torch.inference_mode():
        caches = [c.clone() for c in ctx.kv_caches]
        expected = model(ids, positions)
        for cache, kept in zip(ctx.kv_caches, caches):
            cache.copy_(kept)
        torch.testing.assert_close(compiled(ids, positions), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not _runs("triton"), reason="needs the triton attention impl")
def test_reduce_overhead_runs_our_attention_op(model_and_ctx, monkeypatch):
    """``torch.compile(mode="reduce-overhead")`` (cudagraph trees, not our backend) on a model that
    calls our attention op: the split-KV kernel's scratch, allocated at the first decode step of a
    shape, must not land in the trees' pool (they refuse pool tensors that are not outputs). A fresh
    scratch table makes this the first step of every shape, as in a new process."""
    from fullgraph_backend.attention import triton_paged

    monkeypatch.setattr(triton_paged, "_SCRATCH", {})
    model, config = model_and_ctx
    ctx = config.forward_context(dtype=torch.float32, device="cuda", max_num_seqs=8, max_num_tokens=16,
                                 max_model_len=256, attention_impl="triton")
    compiled = torch.compile(model, mode="reduce-overhead")
    tables = own_block_tables(ctx, 4)
    with use_forward_context(ctx), torch.inference_mode():
        for step in range(4):  # warm-up, record, then replays
            _fresh(ctx)
            positions = ctx.prepare([1] * 4, [90 + step, 17, 130, 5 + step], tables)
            ids = torch.randint(0, config.vocab_size, (4,), device="cuda")
            expected, got, after_eager = eager_then_compiled(model, compiled, ctx, ids, positions)
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4, msg=f"step {step}")
    assert triton_paged._SCRATCH, "the decode steps did not take the split-KV path"


def test_piecewise_matches_full(model_and_ctx):
    model, config = model_and_ctx
    ctx = config.forward_context(dtype=torch.float32, device="cuda", max_num_seqs=16, max_num_tokens=32,
                                 max_model_len=64)
    outputs = {}
    for mode in ("full", "piecewise"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fullgraph", options={"cudagraph_mode": mode})
        torch.manual_seed(1)
        for cache in ctx.kv_caches:
            cache.zero_()
        with use_forward_context(ctx), torch.inference_mode():
            positions = ctx.prepare([5, 7, 1], [5, 9, 20], [[1], [2], [3, 4]])
            ids = torch.randint(0, config.vocab_size, (13,), device="cuda")
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            outputs[mode] = compiled(ids, positions).clone()
    torch.testing.assert_close(outputs["piecewise"], outputs["full"], atol=1e-5, rtol=1e-5)


FUSIONS = {"default": {}, "fuse_norm": {"fuse_norm": True},
            "fuse_silu": {"fuse_silu": True, "fuse_silu_epilogue": False}, "none": {"fuse_silu_epilogue": False}}


@pytest.mark.parametrize("fuse", list(FUSIONS))
def test_one_row_linears_take_the_gemv_in_bf16_and_match_eager(monkeypatch, fuse):
    """bf16, full graphs: in the one-token graph the swapped linears run the Triton GEMV (launched
    while graphs are warmed up and captured, not on replay): by default gate_up with SiLU-mul in its
    epilogue, with ``fuse_norm`` too the other projections after an RMSNorm with the norm in their
    prologue, with ``fuse_silu`` down with SiLU-mul in its prologue instead, with neither fusion each
    plain; outputs stay within bf16 tolerance of eager at one token and more."""
    from fullgraph_backend import gemv as gemv_module
    from fullgraph_backend.models import build_model, get_config

    torch._dynamo.reset()
    calls = []
    real = gemv_module._launch  # (row, weight, bias, out, use_pdl[, norm prologue], up=..., paired=...): every GEMV
    monkeypatch.setattr(gemv_module, "_launch", lambda *args, **kwargs: calls.append(
        (tuple(args[1].shape), len(args) > 5 and args[5] is not None, kwargs.get("up") is not None,
         kwargs.get("paired", False))) or real(*args, **kwargs))
    config = get_config("tiny")
    model = build_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    ctx = config.forward_context(dtype=torch.bfloat16, device="cuda", max_num_seqs=8, max_num_tokens=16,
                                 max_model_len=64)
    options = {"cudagraph_mode": "full", **FUSIONS[fuse]}
    compiled = torch.compile(model, backend="fullgraph", options=options)
    per_step = []
    with use_forward_context(ctx), torch.inference_mode():
        for query, seq in (([3, 1], [3, 9]), ([1], [17]), ([1], [30]), ([1, 1, 1], [4, 8, 40])):
            _fresh(ctx)
            positions = ctx.prepare(query, seq, own_block_tables(ctx, len(query)))
            ids = torch.randint(0, config.vocab_size, (sum(query),), device="cuda")
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            before = len(calls)
            expected, got, _ = eager_then_compiled(model, compiled, ctx, ids, positions)
            torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2, msg=f"batch {query}")
            per_step.append(calls[before:])
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {call[0] for call in calls} == shapes  # the one-token graph ran every linear on the GEMV (one row only)
    layer = model.layers[0]
    after_norms = {tuple(m.weight.shape) for m in (layer.self_attn.qkv_proj, model.lm_head)}  # gate_up's stays
    assert {shape for shape, norm, _, _ in calls if norm} == (after_norms if fuse == "fuse_norm" else set())
    down = {tuple(layer.mlp.down_proj.weight.shape)}
    assert {shape for shape, _, gated, _ in calls if gated} == (down if fuse == "fuse_silu" else set())
    gate_up = {tuple(layer.mlp.gate_up_proj.weight.shape)}
    assert {shape for shape, _, _, paired in calls if paired} == (set() if fuse in ("fuse_silu", "none") else gate_up)
    assert per_step[2] == [] and per_step[3] == []  # graphs that exist replay: no Python, no new GEMV calls
    torch._dynamo.reset()


@pytest.mark.skipif(not _runs("triton"), reason="needs the triton attention impl")
def test_two_models_on_two_streams_keep_their_own_scratch():
    """Two compiled models (a draft and a target, say) replaying decode graphs at once on two
    streams: each runner's split-KV partials and tickets are its own, so every concurrent step
    gives the bits that model's step gives alone."""
    from helpers import RunnerCapture

    from fullgraph_backend.models import build_model, get_config

    torch._dynamo.reset()
    config = get_config("tiny")
    models = [build_model(config, seed=seed, dtype=torch.bfloat16, device="cuda") for seed in (0, 1)]
    ctxs = [config.forward_context(dtype=torch.bfloat16, device="cuda", max_num_seqs=16, max_num_tokens=32,
                                   max_model_len=512, attention_impl="triton") for _ in models]
    backends = [RunnerCapture() for _ in models]
    compiled = [torch.compile(m, backend=b) for m, b in zip(models, backends)]
    lens = [200 + 17 * i for i in range(16)]  # two 128-token chunks or more a request: split-KV segments

    def step(i: int) -> torch.Tensor:
        with use_forward_context(ctxs[i]), torch.inference_mode():
            positions = ctxs[i].prepare([1] * 16, lens, own_block_tables(ctxs[i], 16))
            ids = torch.arange(16, device="cuda") + i
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
            return compiled[i](ids, positions).clone()

    for ctx in ctxs:
        _fresh(ctx)
    alone = [step(0), step(1)]  # each model by itself (compiles, captures, replays once)
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in models]
    for _ in range(50):
        outs = []
        for i, stream in enumerate(streams):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                outs.append(step(i))
        torch.cuda.synchronize()
        for i in (0, 1):
            assert torch.equal(outs[i], alone[i]), f"model {i}"
    owned = [{t.data_ptr() for table in b.runner._scratch.values() for bufs in table.values() for t in bufs}
             for b in backends]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    torch._dynamo.reset()

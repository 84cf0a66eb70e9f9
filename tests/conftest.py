"""Shared fixtures and tiny in-process models for the CPU test suite."""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in its interpreter; set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402

import fullgraph_backend  # noqa: E402
from fullgraph_backend.backend import RecordingBackend  # noqa: E402
from fullgraph_backend.forward_context import ForwardContext  # noqa: E402


# ---- markers ------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip without CUDA (another helper may add the same; the skip is idempotent)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not any(m.name == "skip" for m in item.iter_markers()):
            item.add_marker(skip)


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def dynamo_reset():
    """Every test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture()
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


class RunnerCapture(RecordingBackend):
    """The recording backend with options as keywords, and the last runner at hand."""

    def __init__(self, **options) -> None:
        super().__init__(options)

    @property
    def runner(self):
        assert len(self.runners) >= 1, "nothing was compiled"
        return self.runners[-1]


@pytest.fixture()
def capture_backend():
    return RunnerCapture


def make_ctx(num_layers=2, num_kv_heads=2, head_dim=8, *, max_num_seqs=8, max_num_tokens=64, max_model_len=64,
             block_size=16, **kw) -> ForwardContext:
    return ForwardContext(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=torch.float32,
                          max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens, max_model_len=max_model_len,
                          block_size=block_size, **kw)


def own_block_tables(ctx: ForwardContext, num_reqs: int) -> list[list[int]]:
    """Request ``i`` owns its own contiguous run of blocks, enough for max_model_len."""
    w = ctx.max_blocks_per_seq
    assert 1 + num_reqs * w <= ctx.num_blocks
    return [list(range(1 + i * w, 1 + (i + 1) * w)) for i in range(num_reqs)]


def random_batch(rng, num_tokens: int, max_seqs: int, max_len: int, decode: bool = False):
    """``query_lens, seq_lens`` of a batch of ``num_tokens`` new tokens with random cached context."""
    if decode:
        query = [1] * num_tokens
    else:
        reqs = rng.randint(1, min(num_tokens, max_seqs))
        cuts = sorted(rng.sample(range(1, num_tokens), reqs - 1)) if reqs > 1 else []
        query = [b - a for a, b in zip([0, *cuts], [*cuts, num_tokens])]
    seq = [q + rng.randint(0, max_len - q) for q in query]
    return query, seq


def eager_then_compiled(model, compiled, ctx: ForwardContext, ids: torch.Tensor, positions: torch.Tensor):
    """``(expected, got, caches_after_eager)``: the step in eager mode, then compiled from the same KV
    caches (restored in between), so both outputs and both caches can be compared."""
    before = [c.clone() for c in ctx.kv_caches]
    expected = model(ids, positions)
    after_eager = [c.clone() for c in ctx.kv_caches]
    for cache, saved in zip(ctx.kv_caches, before):
        cache.copy_(saved)
    return expected, compiled(ids, positions), after_eager


# ---- tiny models calling fullgraph attention ----------------------------------------------------
class TinyAttention(nn.Module):
    """Embedding -> ``layers`` x (qkv, fullgraph attention, out proj, residual, MLP) -> head, packed tokens."""

    def __init__(self, vocab=64, hidden=32, heads=4, kv_heads=2, head_dim=8, layers=2, sliding_window=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, head_dim, sliding_window
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(heads * head_dim, hidden) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
                                 for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        angle = positions.float()[:, None, None] * 0.01
        n = input_ids.shape[0]
        for i, (qkv, out, mlp) in enumerate(zip(self.qkv, self.out, self.mlp)):
            q, k, v = qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                    self.kv_heads * self.head_dim], dim=-1)
            q = q.view(n, self.heads, self.head_dim) * torch.cos(angle)
            k = k.view(n, self.kv_heads, self.head_dim) + torch.sin(angle)
            v = v.view(n, self.kv_heads, self.head_dim)
            a = fullgraph_backend.attention(q, k, v, i, sliding_window=self.window)
            x = x + out(a.reshape(n, -1))
            x = x + mlp(x)
        return self.head(x)


def tiny_attention_model(seed=0, **kw) -> TinyAttention:
    torch.manual_seed(seed)
    model = TinyAttention(**kw).eval().requires_grad_(False)
    return model


def ctx_for(model: TinyAttention, **kw) -> ForwardContext:
    return make_ctx(num_layers=len(model.qkv), num_kv_heads=model.kv_heads, head_dim=model.head_dim, **kw)


def naive_attention(q, k_cache, v_cache, query_lens, seq_lens, block_tables, block_size, scale, window=0):
    """Per request: gather its keys from its block table, causal (+window) mask, softmax. fp64."""
    outs = []
    start = 0
    q_heads = q.shape[1]
    for ql, sl, blocks in zip(query_lens, seq_lens, block_tables):
        pos = torch.arange(sl)
        slots = torch.tensor(blocks)[pos // block_size] * block_size + pos % block_size
        keys = k_cache.flatten(0, 1)[slots].double()  # [sl, kv_heads, d]
        values = v_cache.flatten(0, 1)[slots].double()
        group = q_heads // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        qr = q[start:start + ql].double()  # [ql, h, d]
        scores = torch.einsum("qhd,khd->hqk", qr, keys) * scale
        qpos = torch.arange(sl - ql, sl)[:, None]
        mask = pos[None, :] <= qpos
        if window:
            mask &= pos[None, :] > qpos - window
        scores = scores.masked_fill(~mask[None], -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
        start += ql
    return torch.cat(outs).float()


# ---- Dynamo graphs for pass and padding tests ----------------------------------------------------
def dynamo_graph(fn, *args, dynamic=((0, 0),)):
    """The one FX graph Dynamo hands a backend for ``fn(*args)``, with its example inputs.

    ``dynamic`` lists ``(arg index, dim)`` pairs marked dynamic before the call.
    """
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    for i, d in dynamic:
        torch._dynamo.mark_dynamic(args[i], d)
    with torch.inference_mode():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]

"""Models without fullgraph attention: padded to capture sizes where safe, exact sizes where not."""
from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import RunnerCapture

ORDER = [5, 1, 3, 7, 16, 33, 2, 16, 9]  # the first call compiles (symbolic: >= 2 rows)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x):
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)  # eval: running statistics, per sample
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x):  # [B, 3, 8, 8]
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 1)
        return self.fc(x.flatten(1)).log_softmax(-1)


class Block(nn.Module):
    """Pre-norm transformer block, attention per sample over a static sequence: [B, S, D]."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, scale):
        y = self.lin(x) * scale
        return y, y.sum(-1), scale * 2


def _inputs(name, n, gen):
    if name == "conv":
        return (torch.randn(n, 3, 8, 8, generator=gen),)
    if name == "block":
        return (torch.randn(n, 7, 16, generator=gen),)
    if name == "two_outputs":
        return torch.randn(n, 6, generator=gen), torch.randn(6, generator=gen)
    if name in ("centered", "flat"):
        return (torch.randn(n, 8, generator=gen),)
    return (torch.randn(n, 16, generator=gen),)


MODELS = {"mlp": MLP, "conv": ConvNet, "block": Block, "two_outputs": TwoOutputs}


def _run(model, backend, name, sizes, atol=1e-5):
    torch.manual_seed(0)
    compiled = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for i, n in enumerate(sizes):
            args = _inputs(name, n, gen)
            if i == 0:
                torch._dynamo.mark_dynamic(args[0], 0)
            got, expected = compiled(*args), model(*args)
            torch.testing.assert_close(got, expected, atol=atol, rtol=atol, msg=f"{name} at batch {n}")


@pytest.mark.parametrize("mode", ["full", "none"])
@pytest.mark.parametrize("name", list(MODELS))
def test_generic_model_matches_eager(name, mode):
    torch.manual_seed(0)
    model = MODELS[name]().eval().requires_grad_(False)
    backend = RunnerCapture(compiler="eager", cudagraph_mode=mode, capture_sizes=[1, 2, 4, 8, 16, 32])
    sizes = ORDER[:]
    random.Random(name).shuffle(sizes)
    sizes.remove(5)
    _run(model, backend, name, [5, *sizes])
    # (Dynamo may split the range of sizes over several graphs: the conv's fake impl guards on batch < 16)
    dynamic = [r for r in backend.runners if r.sig.symbol is not None]
    assert dynamic and all(r.pad for r in dynamic)
    if mode == "full":  # without a forward context, a key is captured on its first use (size 1: a static graph)
        keys = {next(s for s in (1, 2, 4, 8, 16, 32) if s >= n) for n in [5, *sizes] if 1 < n <= 32}
        captured = [r.size for runner in dynamic for r in runner.capture_table]
        assert set(captured) == keys  # (the conv's two graphs may both pad to 16)


def test_generic_block_with_inductor():
    torch.manual_seed(0)
    model = Block().eval().requires_grad_(False)
    backend = RunnerCapture(capture_sizes=[2, 4, 8, 16])
    _run(model, backend, "block", [5, 3, 16, 1, 7, 20], atol=1e-4)


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y - y.mean(0)


def test_batch_mixing_model_is_not_padded(caplog):
    model = Centered().eval().requires_grad_(False)
    backend = RunnerCapture(compiler="eager", capture_sizes=[2, 4, 8, 16, 32, 64])
    sizes = [5, 3, 7, 16, 33, 3, 7]
    with caplog.at_level(logging.WARNING, logger="fullgraph"):
        _run(model, backend, "centered", sizes)
    why = [r.getMessage() for r in caplog.records if "not padding this graph" in r.getMessage()]
    assert len(why) == 1, [r.getMessage() for r in caplog.records]
    assert "mean" in why[0] and "batch dim" in why[0]
    runner = backend.runner
    assert not runner.pad
    # one key per distinct exact size, each captured on first sight
    assert [r.size for r in runner.capture_table] == [5, 3, 7, 16, 33]
    assert set(runner.pieces[0].recordings) == {(n, k) for n, k in [(5, "mixed"), (3, "mixed"), (7, "mixed"),
                                                               (16, "mixed"), (33, "mixed")]}


@pytest.mark.parametrize("fn", [
    pytest.param(lambda x: x[-1] * 2, id="last_row"),
    pytest.param(lambda x: torch.einsum("bi,bj->ij", x, x), id="einsum_gram"),
    pytest.param(lambda x: F.normalize(x, dim=0), id="normalize_over_batch"),
])
def test_batch_mixing_functions_match_eager(fn):
    """Padding these would read stale rows of the static buffer: compiled must still equal eager."""
    backend = RunnerCapture(compiler="eager", capture_sizes=[4, 8, 16])
    compiled = torch.compile(fn, backend=backend)
    with torch.inference_mode():
        for i, n in enumerate([5, 16, 3, 7, 6]):
            x = torch.randn(n, 8)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), fn(x), msg=f"batch {n}")


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x).reshape(-1)  # [4 * B]: a batch dim that is not B itself


def test_derived_batch_dim_output_matches_eager():
    model = Flat().eval().requires_grad_(False)
    backend = RunnerCapture(compiler="eager", capture_sizes=[2, 4, 8, 16])
    _run(model, backend, "flat", [5, 3, 7, 16])
    assert not backend.runner.pad


class Flagged(nn.Module):
    """Sets a flag buffer in place on every call (idempotent: as many calls as you like give the same state)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("ready", torch.zeros(8))

    def forward(self, x):
        self.ready.fill_(1.0)
        return self.lin(x) + self.ready


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_in_place_buffer_update_is_kept(compiler):
    model = Flagged().eval().requires_grad_(False)
    compiled = torch.compile(model, backend=RunnerCapture(compiler=compiler, capture_sizes=[2, 4, 8]))
    with torch.inference_mode():
        for i, n in enumerate([5, 3, 8]):
            x = torch.randn(n, 8)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
            got = compiled(x)
            assert torch.equal(model.ready, torch.ones(8)), f"the in-place buffer update was lost (call {i})"
            torch.testing.assert_close(got, model(x), msg=f"call {i}")


class Counter(nn.Module):
    """Counts calls in a buffer, updated in place (as a step counter would be)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(8))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x) + self.calls


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_non_idempotent_state_update_runs_once_per_call(compiler):
    """Warm-up and capture runs leave the buffer as they found it: one call, one update."""
    eager, model = Counter().eval().requires_grad_(False), Counter().eval().requires_grad_(False)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, backend=RunnerCapture(compiler=compiler, capture_sizes=[2, 4, 8]))
    with torch.inference_mode():
        for i, n in enumerate([5, 3, 8, 5]):
            x = torch.randn(n, 8)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), eager(x), msg=f"call {i}")
            torch.testing.assert_close(model.calls, eager.calls, msg=f"buffer after call {i}")


def test_two_dynamic_sizes_run_without_graphs(caplog):
    fn = lambda x, y: (x * 2, y + 1)  # noqa: E731
    backend = RunnerCapture(compiler="eager")
    compiled = torch.compile(fn, backend=backend)
    with caplog.at_level(logging.WARNING, logger="fullgraph"), torch.inference_mode():
        for i, (a, b) in enumerate([(3, 4), (5, 2), (7, 9)]):
            x, y = torch.randn(a, 3), torch.randn(b, 3)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(y, 0)
            gx, gy = compiled(x, y)
            torch.testing.assert_close(gx, x * 2)
            torch.testing.assert_close(gy, y + 1)
    assert not backend.runner.use_graphs
    assert any("no CUDA graphs" in r.getMessage() for r in caplog.records)


def test_training_mode_call_is_a_clear_error():
    model = MLP()  # parameters require grad, grad mode on
    compiled = torch.compile(model, backend="fullgraph", options={"compiler": "eager"})
    x = torch.randn(3, 16)
    torch._dynamo.mark_dynamic(x, 0)
    with pytest.raises(Exception, match="compiles inference"):
        compiled(x)


def test_no_grad_call_works():
    model = MLP()
    compiled = torch.compile(model, backend="fullgraph", options={"compiler": "eager", "capture_sizes": [4, 8]})
    with torch.no_grad():
        for i, n in enumerate([3, 8, 5]):
            x = torch.randn(n, 16)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), model(x))

"""FX passes: attention swap, piecewise split, batch-mixing analysis (on real Dynamo graphs)."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fullgraph_backend import compat, use_forward_context
from fullgraph_backend.attention.registry import get_impl
from fullgraph_backend.padding import BatchSignature
from passes import PassManager, find_batch_mixing, split_at_attention, swap_attention, swap_linear
from passes.swap_attention import ATTENTION_TARGET
from passes.swap_linear import LINEAR_TARGETS
from fullgraph_backend.gemv import linear as LINEAR_OP

from helpers import ctx_for, dynamo_graph, tiny_attention_model

IMPL = get_impl("reference")
IMPL_TARGET = IMPL.op
METADATA = ["fg_query_start_loc", "fg_seq_lens", "fg_block_table", "fg_slot_mapping"]


def _targets(gm):
    return collections.Counter(n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def _attention_graph(layers=3):
    model = tiny_attention_model(layers=layers)
    ctx = ctx_for(model, max_num_tokens=16)
    with use_forward_context(ctx):
        positions = ctx.prepare([3, 2], [3, 7], [[1], [2]])
        ids = torch.randint(0, 64, (5,))
        gm, example_inputs = dynamo_graph(model, ids, positions, dynamic=((0, 0), (1, 0)))
        with torch.inference_mode():
            expected = model(ids, positions)
    return model, ctx, gm, example_inputs, (ids, positions), expected


def test_swap_replaces_every_attention_node_and_only_them():
    model, ctx, gm, *_ = _attention_graph(layers=3)
    before = _targets(gm)
    assert before[ATTENTION_TARGET] == 3 and before[IMPL_TARGET] == 0
    report = swap_attention(gm, ctx, IMPL)
    after = _targets(gm)
    assert after[ATTENTION_TARGET] == 0 and after[IMPL_TARGET] == 3
    del before[ATTENTION_TARGET], after[IMPL_TARGET]
    assert before == after  # nothing else touched
    assert [s.layer_idx for s in report.swapped] == [0, 1, 2]
    assert all(s.impl == "reference" for s in report.swapped)
    for s in report.swapped:
        assert s.reads == [f"fg_kv_cache_{s.layer_idx}", *METADATA]
        node = next(n for n in gm.graph.nodes if n.name == s.node)
        assert node.target is IMPL_TARGET
        assert [a.name for a in node.args[3:8]] == s.reads
    assert not report.left_alone
    summary = report.summary()
    assert summary.count("swapped") == 3 and "(layer 2)" in summary and "fg_kv_cache_2" in summary


def test_swap_adds_context_buffers_as_placeholders():
    model, ctx, gm, example_inputs, *_ = _attention_graph(layers=2)
    n_before = len([n for n in gm.graph.nodes if n.op == "placeholder"])
    report = swap_attention(gm, ctx, IMPL)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    added = placeholders[n_before:]
    assert added == list(report.inputs)  # appended after Dynamo's own, in report order
    assert sorted(added) == sorted(["fg_kv_cache_0", "fg_kv_cache_1", *METADATA])
    assert report.inputs["fg_kv_cache_0"] is ctx.kv_caches[0]
    assert report.inputs["fg_kv_cache_1"] is ctx.kv_caches[1]
    for name in METADATA:
        assert report.inputs[name] is getattr(ctx.metadata, name[3:])
    for node in gm.graph.nodes:
        if node.name in report.inputs:
            assert node.meta["fullgraph_input"] == node.name
            assert tuple(node.meta["example_value"].shape) == tuple(report.inputs[node.name].shape)


def test_swapped_graph_computes_eager_result():
    model, ctx, gm, example_inputs, args, expected = _attention_graph(layers=2)
    cache_after_eager = [c.clone() for c in ctx.kv_caches]
    for c in ctx.kv_caches:
        c.zero_()
    report = swap_attention(gm, ctx, IMPL)
    # Dynamo's inputs: the real values of its example inputs (weights, sizes, ids, positions)
    values = [args[0].shape[0] if isinstance(ex, (torch.SymInt, int)) else ex for ex in example_inputs]
    with torch.inference_mode():
        out = gm(*values, *report.inputs.values())
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, expected)
    for c, e in zip(ctx.kv_caches, cache_after_eager):
        torch.testing.assert_close(c, e)


def test_swap_linear_replaces_every_linear_and_computes_the_same():
    model, ctx, gm, example_inputs, args, expected = _attention_graph(layers=2)
    attention = swap_attention(gm, ctx, IMPL)
    before = _targets(gm)
    linears = sum(before[t] for t in set(LINEAR_TARGETS))
    assert linears == sum(isinstance(m, nn.Linear) for m in model.modules())
    report = swap_linear(gm)
    after = _targets(gm)
    assert after[LINEAR_OP] == linears == len(report.swapped)
    assert not any(after[t] for t in LINEAR_TARGETS)
    weights = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {shape for _, shape in report.swapped} == weights
    assert f"swapped {linears} linear nodes" in report.summary()
    for c in ctx.kv_caches:
        c.zero_()
    values = [args[0].shape[0] if isinstance(ex, (torch.SymInt, int)) else ex for ex in example_inputs]
    with torch.inference_mode():
        out = gm(*values, *attention.inputs.values())
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, expected)


def test_swap_linear_leaves_autocast_graphs_alone():
    class Autocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.proj(x)

    gm, _ = dynamo_graph(Autocast(), torch.randn(2, 8))
    before = gm.code
    report = swap_linear(gm)
    assert not report.swapped and gm.code == before
    assert "autocast" in report.summary()


@pytest.mark.parametrize("device, options, names", [
    ("cuda", {}, ["move_host_inputs", "swap_linear", "fuse_silu_epilogue"]),
    ("cuda", {"fuse_norm": True}, ["move_host_inputs", "swap_linear", "fuse_silu_epilogue", "fuse_norm_linear"]),
    ("cuda", {"cudagraph_mode": "piecewise", "fuse_norm": True},
     ["move_host_inputs", "swap_linear", "fuse_silu_epilogue", "fuse_norm_linear"]),
    ("cuda", {"fuse_silu": True, "fuse_silu_epilogue": False}, ["move_host_inputs", "swap_linear", "fuse_silu_linear"]),
    ("cuda", {"cudagraph_mode": "none"}, ["move_host_inputs"]),  # no capture: dispatch per call
    ("cuda", {"gemv": False}, ["move_host_inputs"]),
    ("cpu", {}, []),
])
def test_linear_swap_runs_only_for_graphs_captured_on_cuda(device, options, names):
    """And CPU inputs leave graphs on CUDA only (on CPU they are where the graph computes); the
    attention swap, the grouping of query heads and the merge of linears run everywhere, the merge
    before the linear swap; SiLU-mul folds into gate_up after it, then the norms into the linears they feed."""
    from fullgraph_backend.backend import graph_passes
    from fullgraph_backend.config import FullgraphConfig

    passes = graph_passes(FullgraphConfig.from_options(options), torch.device(device), None, IMPL, [])
    assert [name for name, _ in passes] == ["swap_attention", "group_query_heads", "merge_linears", *names]


def test_query_heads_stay_copied_where_asked():
    from fullgraph_backend.backend import graph_passes
    from fullgraph_backend.config import FullgraphConfig

    passes = graph_passes(FullgraphConfig(group_query_heads=False), torch.device("cpu"), None, IMPL, [])
    assert [name for name, _ in passes] == ["swap_attention", "merge_linears"]


def test_swap_through_a_custom_backend_matches_eager():
    model = tiny_attention_model(layers=2)
    ctx = ctx_for(model, max_num_tokens=16)
    reports = []

    def backend(gm, example_inputs):
        gm = compat.copy_dynamo_graph(gm)  # Dynamo keeps reading its own graph
        report = swap_attention(gm, ctx, IMPL)
        reports.append(report)
        extra = tuple(report.inputs.values())
        return lambda *args: gm(*args, *extra)

    compiled = torch.compile(model, backend=backend)
    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([4, 1], [4, 9], [[1], [2]])
        ids = torch.randint(0, 64, (5,))
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        saved = [c.clone() for c in ctx.kv_caches]
        expected = model(ids, positions)
        for c, s in zip(ctx.kv_caches, saved):
            c.copy_(s)
        got = compiled(ids, positions)
    assert len(reports[0].swapped) == 2
    torch.testing.assert_close(got, expected)


class _SDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x):  # [B, S, 8] -> per-sample attention over S
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_plain_sdpa_left_alone_with_reason():
    gm, _ = dynamo_graph(_SDPA().eval(), torch.randn(3, 5, 8))
    before = _targets(gm)
    report = swap_attention(gm, None, IMPL)  # no context needed: nothing to swap
    assert _targets(gm) == before
    assert not report.swapped and not report.inputs
    assert len(report.left_alone) == 1
    node, why = report.left_alone[0]
    assert "scaled_dot_product_attention" in node and "SDPA" in why
    assert f"left {node}" in report.summary()


def test_no_context_with_attention_is_a_clear_error():
    model, ctx, gm, *_ = _attention_graph(layers=1)
    with pytest.raises(RuntimeError, match="no ForwardContext is active at compile time"):
        swap_attention(gm, None, IMPL)


def test_no_context_through_torch_compile_is_a_clear_error():
    model = tiny_attention_model(layers=1)
    compiled = torch.compile(model, backend="fullgraph", options={"compiler": "eager"})
    ids, positions = torch.randint(0, 64, (4,)), torch.arange(4)
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(positions, 0)
    with torch.inference_mode(), pytest.raises(Exception, match="no ForwardContext is active at compile time"):
        compiled(ids, positions)


def test_layer_out_of_range_is_an_error():
    model, ctx, gm, *_ = _attention_graph(layers=3)
    small = ctx_for(tiny_attention_model(layers=2), max_num_tokens=16)
    with pytest.raises(IndexError, match="layer_idx 2"):
        swap_attention(gm, small, IMPL)


def test_pass_manager_dumps_and_summaries(tmp_path):
    model, ctx, gm, *_ = _attention_graph(layers=2)
    results = PassManager([("swap_attention", lambda g: swap_attention(g, ctx, IMPL)),
                           ("count", lambda g: f"{len(g.graph.nodes)} nodes")], str(tmp_path)).run(gm)
    assert [r.name for r in results] == ["swap_attention", "count"]
    assert results[1].summary.endswith(" nodes")
    assert "fg_kv_cache_1" in results[0].summary
    files = {p.name for p in tmp_path.iterdir()}
    assert {"00_dynamo_graph.py", "01_swap_attention.py", "02_count.py", "passes.txt"} <= files
    assert "fullgraph.attention" in (tmp_path / "00_dynamo_graph.py").read_text()
    assert "reference_attention" in (tmp_path / "01_swap_attention.py").read_text()
    assert "== swap_attention" in (tmp_path / "passes.txt").read_text()


# ---- split ---------------------------------------------------------------------------------
def test_split_puts_each_attention_alone_and_keeps_order():
    model, ctx, gm, example_inputs, args, expected = _attention_graph(layers=3)
    report = swap_attention(gm, ctx, IMPL)
    split, parts = split_at_attention(gm, lambda n: n.op == "call_function" and n.target is IMPL_TARGET)
    calls = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert len(parts) == 3
    assert calls == [f"submod_{i}" for i in range(7)]  # pre, attn, mid, attn, mid, attn, post
    assert parts == ["submod_1", "submod_3", "submod_5"]
    for layer, name in enumerate(parts):
        sub = getattr(split, name)
        ops = [n for n in sub.graph.nodes if n.op not in ("placeholder", "output")]
        assert len(ops) == 1 and ops[0].target is IMPL_TARGET
        # the layer's own cache goes into the layer's attention part
        outer = next(n for n in split.graph.nodes if n.op == "call_module" and n.target == name)
        names = [a.name for a in outer.args]
        assert f"fg_kv_cache_{layer}" in names
    for name in calls:
        if name not in parts:
            assert not any(n.target is IMPL_TARGET for n in getattr(split, name).graph.nodes)
    # the split module computes what the whole graph does
    values = [args[0].shape[0] if isinstance(ex, (torch.SymInt, int)) else ex for ex in example_inputs]
    saved = [c.clone() for c in ctx.kv_caches]
    with torch.inference_mode():
        whole = gm(*values, *report.inputs.values())
        for c, s in zip(ctx.kv_caches, saved):
            c.copy_(s)
        pieces = split(*values, *report.inputs.values())
    torch.testing.assert_close(pieces[0], whole[0])
    torch.testing.assert_close(whole[0], expected)


# ---- batch mixing --------------------------------------------------------------------------
def _mixing(fn, *shape, dim=0):
    x = torch.randn(*shape)
    gm, _ = dynamo_graph(fn, x, dynamic=((0, dim),))
    sig = BatchSignature.of(gm)
    assert sig.symbol is not None
    return find_batch_mixing(gm, sig.symbol)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda x: x - x.mean(0), id="mean0"),
    pytest.param(lambda x: x.sum(dim=0), id="sum_dim0_kw"),
    pytest.param(lambda x: torch.sum(x, 0), id="torch_sum0"),
    pytest.param(lambda x: x.sum() + x, id="sum_all"),
    pytest.param(lambda x: x.mean(-2), id="mean_neg_dim"),
    pytest.param(lambda x: torch.softmax(x, 0), id="softmax0"),
    pytest.param(lambda x: F.softmax(x, dim=0), id="F_softmax0"),
    pytest.param(lambda x: x.T @ x, id="xT_at_x"),
    pytest.param(lambda x: torch.mm(x.t(), x), id="mm_xTx"),
    pytest.param(lambda x: F.layer_norm(x.t(), (x.shape[0],)), id="layer_norm_over_batch"),
    pytest.param(lambda x: F.layer_norm(x, x.shape), id="layer_norm_whole"),
    pytest.param(lambda x: F.batch_norm(x, None, None, training=True), id="batch_norm_train"),
    pytest.param(lambda x: x / x.shape[0], id="divide_by_batch"),
    pytest.param(lambda x: x * x.size(0), id="mul_by_batch"),
    pytest.param(lambda x: x.cumsum(0), id="cumsum0"),
    pytest.param(lambda x: x.flip(0), id="flip0"),
    pytest.param(lambda x: x.max(dim=0).values, id="max0"),
    pytest.param(lambda x: x.argsort(0), id="argsort0"),
])
def test_flags_batch_mixing(fn):
    reasons = _mixing(fn, 5, 6)
    assert reasons, "padding would change this model's results but nothing was flagged"
    assert all(": " in r for r in reasons)


@pytest.mark.parametrize("fn", [
    pytest.param(lambda x: x[-1] * 2, id="last_row"),  # the padded last row, not the real one
    pytest.param(lambda x: x[x.shape[0] - 1], id="row_at_batch_size"),
    pytest.param(lambda x: torch.einsum("bi,bj->ij", x, x), id="einsum_over_batch"),
    pytest.param(lambda x: torch.tensordot(x, x, dims=([0], [0])), id="tensordot_over_batch"),
    pytest.param(lambda x: F.normalize(x, dim=0), id="F_normalize0"),
    pytest.param(lambda x: torch.linalg.vector_norm(x, dim=0), id="vector_norm0"),
    pytest.param(lambda x: torch.quantile(x, 0.5, dim=0), id="quantile0"),
    pytest.param(lambda x: F.instance_norm(x.t()[None]), id="instance_norm_over_batch"),
])
def test_flags_batch_mixing_in_common_ops(fn):
    """Ops seen in real models whose padded result differs from eager (each checked end to end in
    test_generic_models or by hand): padding must not be applied silently."""
    assert _mixing(fn, 5, 6), "padding would change this model's results but nothing was flagged"


def test_flags_batch_norm_module_in_training():
    bn = nn.BatchNorm1d(6, track_running_stats=False).train()
    assert _mixing(bn, 5, 6)


def test_flags_sdpa_across_batch():
    # the batch dim is the sequence dim of a packed [1, h, B, d] attention
    fn = lambda x: F.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None])  # noqa: E731
    assert any("attends across the batch" in r for r in _mixing(fn, 5, 8))


def test_flags_batch_dim_not_first():
    assert _mixing(lambda x: x.sum(1), 3, 5, 4, dim=1)
    assert not _mixing(lambda x: x.sum(0), 3, 5, 4, dim=1)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = _SDPA()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):  # [B, S, 8]
        h = self.attn(self.norm(x)).transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)
        return x + self.fc(h).softmax(-1)


@pytest.mark.parametrize("fn, shape", [
    pytest.param(nn.Linear(6, 4), (5, 6), id="linear"),
    pytest.param(lambda x: torch.softmax(x, -1), (5, 6), id="row_softmax"),
    pytest.param(lambda x: F.log_softmax(x, dim=1), (5, 6), id="row_log_softmax"),
    pytest.param(nn.LayerNorm(6), (5, 6), id="row_layer_norm"),
    pytest.param(lambda x: x.sum(-1, keepdim=True) * x.mean(1, keepdim=True), (5, 6), id="row_reductions"),
    pytest.param(lambda x: x @ torch.ones(6, 3), (5, 6), id="matmul_weights"),
    pytest.param(lambda x: torch.bmm(x, x.transpose(1, 2)), (5, 3, 4), id="per_sample_bmm"),
    pytest.param(lambda x: F.batch_norm(x, torch.zeros(6), torch.ones(6), training=False), (5, 6), id="bn_eval"),
    pytest.param(lambda x: x * x.shape[1] + x.max(-1).values[:, None], (5, 6), id="static_size_value"),
    pytest.param(_SDPA(), (5, 7, 8), id="per_sample_sdpa"),
    pytest.param(_Block(), (5, 7, 8), id="transformer_block"),
    pytest.param(lambda x: torch.maximum(x, x.flip(1)), (5, 6), id="elementwise_max_flip_row"),
])
def test_does_not_flag_per_row_ops(fn, shape):
    if isinstance(fn, nn.Module):
        fn = fn.eval().requires_grad_(False)
    assert _mixing(fn, *shape) == []

"""Regional compile (fullgraph_backend/regions.py, passes/split_regions.py): repeated regions are
compiled once each, and the result computes and writes what the whole graph does.

The fast tests hand Dynamo graphs to a :class:`RegionalCompiler` over a stand-in for Inductor that
returns each region's graph as it is: reusing one region's code for another that differs would
then compute something else, so they check the cut and the reuse without Inductor's compile time.
The slow ones compile with Inductor: the decoder (8 layers, the fewest with 3 alike regions: its
regions alternate between two kinds, see the split's module doc) against the whole-graph compile,
and the engine at -O4 and -O2 against eager greedy decoding.
"""
from __future__ import annotations

import copy
import io
import logging
import random
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

from fullgraph_backend import NULL_BLOCK, compat, use_forward_context
from fullgraph_backend.attention.registry import resolve_impl
from fullgraph_backend.backend import _compiler
from fullgraph_backend.config import FullgraphConfig
from fullgraph_backend.dump import load_dump, print_overview
from fullgraph_backend.dump.writer import GraphDump
from fullgraph_backend.engine import SamplingParams
from fullgraph_backend.models import build_model, get_config
from fullgraph_backend.regions import RegionalCompiler, region_key, run_on_fakes
from passes import swap_attention
from passes.split_regions import InlineLimits, split_at_repeats

from helpers import (SHARP, RunnerCapture, dynamo_graph, eager_then_compiled, make_llm, mixed_prompts,
                     own_block_tables, random_batch, reference_greedy, sharp_model, write_hf_model)

LIMITS = InlineLimits(shared_reads=4, reads=8)


class Block(nn.Module):
    """A residual MLP block that writes its input's rows into a buffer of its own (state a program
    keeps, as a cache), its update scaled by ``scale`` (a constant in the graph)."""

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.register_buffer("seen", torch.zeros(16, dim))

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.seen.index_copy_(0, rows, x)
        return x + self.down(F.silu(self.up(x))) * self.scale


class Blocks(nn.Module):
    def __init__(self, layers: int, dim: int = 8, scales: tuple[float, ...] = (0.5,)) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim, scales[i % len(scales)]) for i in range(layers))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, rows)
        return self.head(x)


def blocks(layers: int, **kw) -> Blocks:
    torch.manual_seed(0)
    return Blocks(layers, **kw).eval().requires_grad_(False)


def block_inputs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen), torch.randperm(16, generator=gen)[:n]


def through_regions(model: nn.Module, *args, compile_once=None) -> tuple:
    """``model``'s Dynamo graph (dynamic in the batch) through a :class:`RegionalCompiler` over
    ``compile_once`` (default: each graph as it is, counted). Returns ``(compiled, example inputs,
    reports, compiled graphs)``; the example inputs are the model's own tensors and ``args``."""
    reports, compiled_graphs = [], []

    def as_is(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm

    def read(gm, example_inputs):
        compiler = RegionalCompiler(compile_once or as_is, {}, on_report=reports.append)
        return compiler(gm, example_inputs), example_inputs

    with torch.inference_mode():
        fn, example_inputs = dynamo_graph(model, *args, dynamic=((0, 0), (1, 0)), read=read)
    return fn, example_inputs, reports, compiled_graphs


# ---- the cut and the reuse (no Inductor) ---------------------------------------------------------
def test_repeated_blocks_compile_once_each_and_write_in_place():
    model = blocks(6)
    eager = copy.deepcopy(model)
    x, rows = block_inputs(5)
    fn, example_inputs, (report,), compiled = through_regions(model, x, rows)
    with torch.inference_mode():
        (got,) = fn(*example_inputs)
        expected = eager(x, rows)
    torch.testing.assert_close(got, expected)
    for block, reference in zip(model.blocks, eager.blocks):
        assert torch.equal(block.seen, reference.seen)  # each region's write reached the model's buffer
    distinct = {i for _, i in report.regions}
    assert report.why_not is None and len(report.regions) >= 6 and len(compiled) == len(distinct) < len(report.regions)
    assert "reuse" in report.summary()


def test_alternating_layers_give_two_distinct_middle_regions():
    """Layers alike but for a constant (Gemma's alternating windows): one period a layer, compared
    strictly, so the two kinds compile apart and the reuse never crosses them."""
    model = blocks(9, scales=(0.5, 2.0))
    eager = copy.deepcopy(model)
    x, rows = block_inputs(4)
    fn, example_inputs, (report,), compiled = through_regions(model, x, rows)
    with torch.inference_mode():
        torch.testing.assert_close(fn(*example_inputs)[0], eager(x, rows))
    constants = {a for gm in compiled for n in gm.graph.nodes for a in n.args if isinstance(a, float)}
    assert {0.5, 2.0} <= constants
    middle = [i for _, i in report.regions[1:-1]]
    assert len(set(middle)) >= 2 and max(middle.count(i) for i in set(middle)) >= 3
    assert len(compiled) == len(set(i for _, i in report.regions))


def test_graph_without_repetition_is_compiled_whole(caplog):
    model = blocks(2)
    x, rows = block_inputs(3)
    with caplog.at_level(logging.INFO, logger="fullgraph"):
        fn, example_inputs, (report,), compiled = through_regions(model, x, rows)
    assert len(compiled) == 1 and report.regions == [("whole", 0)] and "repeats 3 times" in report.why_not
    lines = [r.getMessage() for r in caplog.records if "regional compile" in r.getMessage()]
    assert len(lines) == 1 and "compiled whole" in lines[0]


def test_split_cuts_after_barriers_and_recomputes_what_inductor_would():
    """The decoder's layers (the engine's graph: logits at request ends): one region a layer, from the
    previous layer's residual add to the down projection. The residual stream crosses a cut as
    Inductor keeps it in the whole graph, every second layer: in between, a region gets the sum's
    terms (the matmuls' outputs) and adds them again itself."""
    config = get_config("tiny").replace(num_layers=6)
    model = build_model(config, seed=0)
    ctx = config.forward_context(dtype=torch.float32, max_num_seqs=4, max_num_tokens=16, max_model_len=64)
    with use_forward_context(ctx):
        positions = ctx.prepare([3], [3], own_block_tables(ctx, 1))
        gm, _ = dynamo_graph(lambda ids, pos: model(ids, pos, request_ends=True), torch.tensor([1, 2, 3]), positions,
                             dynamic=((0, 0), (1, 0)))
    cut = split_at_repeats(gm, 3, LIMITS)
    assert cut.repeats == 5 and cut.barriers_per_region == 5  # qkv, attention, o_proj, gate_up, down
    matmul_outputs = []
    for name in cut.regions[1:-1]:
        region = cut.split.get_submodule(name)
        calls = [n for n in region.graph.nodes if n.op in ("call_function", "call_method")]
        assert calls[-1].target is torch._C._nn.linear and calls[-1].args[1].name.endswith("down_proj_parameters_weight_")
        matmul_outputs.append(sum(n.name.startswith("linear") for n in region.graph.find_nodes(op="placeholder")))
    assert matmul_outputs[1:] == [1, 3, 1, 3] and cut.recomputed > 0  # (the first also adds the embedding again)


def test_alike_regions_run_once_on_fakes(monkeypatch):
    """``run_on_fakes(keyed=True)`` runs one region of each key and gives the others new fakes of
    its outputs' shapes: every region gets the key and outputs a full run gives it (the decoder's
    graph as the backend cuts it, after the attention swap: every layer's KV cache a size of its own)."""
    config = get_config("tiny").replace(num_layers=6)
    model = build_model(config, seed=0)
    ctx = config.forward_context(dtype=torch.float32, max_num_seqs=4, max_num_tokens=16, max_model_len=64)
    interpret = torch.fx.Interpreter.call_module

    def both_runs(gm, example_inputs):
        gm = compat.copy_dynamo_graph(gm)
        example_inputs = [*example_inputs, *swap_attention(gm, ctx, resolve_impl("reference", ctx.device)).inputs.values()]
        cut = split_at_repeats(gm, 3, LIMITS)
        full = run_on_fakes(cut.split, example_inputs)
        ran = []
        monkeypatch.setattr(torch.fx.Interpreter, "call_module",
                            lambda self, target, *a: ran.append(target) or interpret(self, target, *a))
        keyed = run_on_fakes(cut.split, example_inputs, keyed=True)
        monkeypatch.undo()
        return full, keyed, ran

    with use_forward_context(ctx):
        positions = ctx.prepare([3], [3], own_block_tables(ctx, 1))
        full, keyed, ran = dynamo_graph(lambda ids, pos: model(ids, pos, request_ends=True), torch.tensor([1, 2, 3]),
                                        positions, dynamic=((0, 0), (1, 0)), read=both_runs)
    assert [c.key for c in keyed] == [region_key(c.module, c.args) for c in full]
    shapes = lambda calls: [[(o.shape, o.stride(), o.dtype) for o in compat.outputs_as_tuple(c.out)]  # noqa: E731
                            for c in calls]
    assert shapes(keyed) == shapes(full)
    assert len(ran) == len({c.key for c in keyed}) < len(keyed)


def test_region_key_compares_structure_and_inputs_not_names():
    def graph(scale: float):
        def f(a, b):
            return torch.nn.functional.linear(a * scale, b)
        return torch.fx.symbolic_trace(f)

    a, b = torch.randn(4, 8), torch.randn(3, 8)
    assert region_key(graph(0.5), [a, b]) == region_key(graph(0.5), [a.clone(), b.clone()])
    assert region_key(graph(0.5), [a, b]) != region_key(graph(2.0), [a, b])  # a constant
    assert region_key(graph(0.5), [a, b]) != region_key(graph(0.5), [a.t().contiguous().t(), b])  # strides
    assert region_key(graph(0.5), [a, b]) != region_key(graph(0.5), [a.double(), b])  # dtype
    shared = torch.randn(8, 8)
    assert region_key(graph(0.5), [shared[:4], shared[4:7]]) != region_key(graph(0.5), [a, b])  # storage shared
    assert region_key(graph(-0.0), [a, b]) != region_key(graph(0.0), [a, b])


def test_max_autotune_compiles_whole(caplog):
    config = FullgraphConfig.from_options({"inductor_config": {"max_autotune": True}})
    with caplog.at_level(logging.INFO, logger="fullgraph"):
        _compiler(config, False, GraphDump(None, None, {}))
    assert any("regional compile: off" in r.getMessage() and "max_autotune" in r.getMessage() for r in caplog.records)


# ---- with Inductor --------------------------------------------------------------------------------
@pytest.fixture()
def inductor_compiles(monkeypatch):
    """Counts Inductor compiles (``compat.compile_fx`` calls)."""
    calls = []
    compile_fx = compat.compile_fx

    def counted(gm, example_inputs, patches=None):
        calls.append(gm)
        return compile_fx(gm, example_inputs, patches)

    monkeypatch.setattr(compat, "compile_fx", counted)
    return calls


def regional_summaries(caplog) -> list[tuple[int, int]]:
    """``(regions, compiles)`` of each graph the log says was cut into regions."""
    found = [re.search(r"regional compile: (\d+) regions, (\d+) distinct", r.getMessage()) for r in caplog.records]
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


@pytest.mark.slow
def test_decoder_regions_compute_what_the_whole_graph_does(inductor_compiles, caplog):
    """Logits and KV caches of the regional compile against the whole graph's (the same kernels:
    equal bit for bit), at random mixed and decode batches in shuffled sizes; one Inductor compile
    per distinct region."""
    config = get_config("tiny").replace(num_layers=8)
    model = build_model(config, seed=0)
    ctx = config.forward_context(dtype=torch.float32, max_num_seqs=8, max_num_tokens=64, max_model_len=128)
    compiled = {regional: torch.compile(model, backend=RunnerCapture(regional_compile=regional,
                                                                     capture_sizes=[1, 2, 4, 8, 16, 32]))
                for regional in (False, True)}
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 7, 16, 33, 2]  # not 1: Dynamo would compile that size apart
    rng.shuffle(sizes)
    with use_forward_context(ctx), torch.inference_mode(), caplog.at_level(logging.INFO, logger="fullgraph"):
        for i, n in enumerate([6, *sizes]):
            query, seq = random_batch(rng, n, ctx.max_num_seqs, ctx.max_model_len,
                                      decode=n <= ctx.max_num_seqs and rng.random() < 0.4)
            for cache in ctx.kv_caches:
                cache.normal_(0, 0.5, generator=gen)
            positions = ctx.prepare(query, seq, own_block_tables(ctx, len(query)))
            ids = torch.randint(0, config.vocab_size, (n,), generator=gen)
            if i == 0:
                torch._dynamo.mark_dynamic(ids, 0)
                torch._dynamo.mark_dynamic(positions, 0)
            whole, regional, caches_whole = eager_then_compiled(compiled[False], compiled[True], ctx, ids, positions)
            assert torch.equal(regional, whole), f"{n} tokens {query}"
            for cache, expected in zip(ctx.kv_caches, caches_whole):
                assert torch.equal(cache[:, NULL_BLOCK + 1:], expected[:, NULL_BLOCK + 1:]), f"KV cache, {n} tokens"
    ((regions, distinct),) = regional_summaries(caplog)
    assert regions == 9 and distinct < regions and len(inductor_compiles) == 1 + distinct


@pytest.fixture(scope="module")
def deep_sharp_dir(tmp_path_factory):
    """The tests' sharp model with 8 layers, as a Hugging Face directory."""
    config = SHARP.replace(num_layers=8, name="sharp-deep")
    return write_hf_model(tmp_path_factory.mktemp("sharp8"), sharp_model(config)), sharp_model(config)


@pytest.mark.slow
@pytest.mark.parametrize("level, pieces", [(4, None), (2, 9)])
def test_engine_greedy_tokens_equal_eager(deep_sharp_dir, inductor_compiles, caplog, level, pieces):
    """-O4: one graph cut into regions; -O2: the 9 pieces between attention calls, the 7 alike
    compiled once. fp32 greedy tokens equal eager decoding's, batch by batch in shuffled sizes."""
    model_dir, eager = deep_sharp_dir
    with caplog.at_level(logging.DEBUG, logger="fullgraph"):
        llm = make_llm(model_dir, level, compile_options={"capture_sizes": (1, 2, 4, 8, 16, 32)})
    for batch, seed in ((7, 3), (1, 2), (3, 5)):
        prompts = mixed_prompts(batch, seed=seed)
        params = SamplingParams(temperature=0.0, max_tokens=4)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == [reference_greedy(eager, p, 4) for p in prompts], f"batch {batch}"
    reports = [r.getMessage() for r in caplog.records if "regional compile" in r.getMessage()]
    if pieces is None:
        ((regions, distinct),) = regional_summaries(caplog)
        assert regions == 9 and len(inductor_compiles) == distinct < regions
    else:
        assert len(reports) == pieces and len(inductor_compiles) == 3  # first, middle (x7), last
        assert sum("reused" in r for r in reports) == pieces - 3


@pytest.mark.slow
def test_inductor_regions_write_a_programs_buffers_in_place(tmp_path):
    """Blocks that write their input's rows into buffers of their own, compiled with Inductor through
    the backend (graph runner, emulated graphs, shuffled sizes): outputs and buffers as eager;
    the dump says which regions reused a compile."""
    model = blocks(7)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=RunnerCapture(capture_sizes=(2, 4, 8), dump_dir=str(tmp_path)))
    sizes = [5, 2, 8, 3, 12, 6]  # not 1: Dynamo would compile that size apart
    with torch.inference_mode():
        for i, n in enumerate(sizes):
            x, rows = block_inputs(n, seed=i)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(rows, 0)
            torch.testing.assert_close(compiled(x, rows), eager(x, rows), atol=1e-5, rtol=1e-5, msg=f"batch {n}")
            for block, reference in zip(model.blocks, eager.blocks):
                torch.testing.assert_close(block.seen, reference.seen, atol=1e-5, rtol=1e-5, msg=f"buffer, batch {n}")
    dump = load_dump(str(tmp_path))
    (graph,) = dump.graphs
    (report,) = graph.record["regions"]
    compiles = {i for _, i in report["regions"]}
    assert len(graph.record["pieces"]) == len(compiles) < len(report["regions"]) and "reuse" in report["summary"]
    console = Console(file=io.StringIO(), width=200)
    print_overview(dump, console)
    assert f"regional compile: {report['summary']}" in console.file.getvalue()


def test_transformers_gemma3_alternating_windows_compile_two_kinds_of_layer():
    """transformers' Gemma 3 code (a sliding window on one layer of two), its attention swapped as
    the backend does: the layers' regions hold two graphs (the window is a constant of the swapped
    op), each compiled once, and the regions compute what the model does. Its request ends, computed
    first, are computed again where the head reads them (their size is the context's buffer's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fullgraph_backend.attention.registry import resolve_impl
    from fullgraph_backend.models.hf import ATTN_IMPLEMENTATION, TransformersDecoder, inspect_model
    from passes import swap_attention

    hf_config = AutoConfig.for_model("gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=24,
                                     layer_types=["sliding_attention", "full_attention"] * 4)
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTN_IMPLEMENTATION)
    model = TransformersDecoder(hf_model, inspect_model(hf_config, "gemma3", torch.float32)).eval().requires_grad_(False)
    ctx = model.config.forward_context(max_num_seqs=4, max_num_tokens=32, max_model_len=64)
    reports, compiled_graphs = [], []

    def read(gm, example_inputs):
        gm = compat.copy_dynamo_graph(gm)
        swap = swap_attention(gm, ctx, resolve_impl("reference", torch.device("cpu")))
        inputs = [*example_inputs, *swap.inputs.values()]
        compiler = RegionalCompiler(lambda g, _: compiled_graphs.append(g) or g, {}, on_report=reports.append)
        return compiler(gm, inputs), inputs

    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([5, 9], [5, 9], own_block_tables(ctx, 2))
        ids = torch.arange(14) * 7 % 256
        caches = [c.clone() for c in ctx.kv_caches]
        compat.mark_unbacked(ids, 0)  # as the engine does (mark_dynamic specializes with transformers 5.17)
        compat.mark_unbacked(positions, 0)
        step = lambda i, p: model(i, p, request_ends=True)  # noqa: E731  (the engine's step: logits at request ends)
        fn, inputs = dynamo_graph(step, ids, positions, dynamic=(), read=read)
        for cache, saved in zip(ctx.kv_caches, caches):
            cache.copy_(saved)
        (got,) = fn(*[len(ids) if isinstance(x, torch.SymInt) else x for x in inputs])  # its sizes: the token count
        torch.testing.assert_close(got, step(ids, positions), atol=1e-5, rtol=1e-5)
    (report,) = reports
    middle = [i for _, i in report.regions[1:-1]]
    assert report.why_not is None and len(set(middle)) >= 2 and len(compiled_graphs) == len(set(i for _, i in report.regions))
    windows = {n.args[-1] for g in compiled_graphs for n in g.graph.nodes if n.target is resolve_impl(
        "reference", torch.device("cpu")).op}
    assert windows == {0, 8}

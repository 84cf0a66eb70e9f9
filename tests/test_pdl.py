"""Programmatic dependent launch: which launches take it (CPU), and on a Hopper GPU that the option
reaches the launch, that stream capture keeps the programmatic edges, and that graphs replay the
same bits with it as without (``PYTHONPATH=. python -m pytest -m gpu tests/test_pdl.py``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fullgraph_backend import backend, compat, few_rows, gemv, pdl
from fullgraph_backend.config import FullgraphConfig
from fullgraph_backend.dump.writer import GraphDump
from helpers import dynamo_graph


try:
    import triton
    import triton.language as tl

    from fullgraph_backend.pdl import gdc_launch_dependents
except ImportError:  # triton is optional; the GPU tests below skip without it
    triton = None

if triton is not None:
    @triton.jit
    def _primary(flag, seen, SPINS: tl.constexpr):
        """Lets dependents launch, then spins (at most SPINS reads) until ``flag`` is set."""
        gdc_launch_dependents()
        value = tl.atomic_add(flag, 0)
        spins = 0
        while (value == 0) & (spins < SPINS):
            value = tl.atomic_add(flag, 0)
            spins += 1
        tl.store(seen, value)

    @triton.jit
    def _secondary(flag):
        """Sets ``flag`` without waiting for the kernel before it."""
        tl.atomic_xchg(flag, 1)


def _hopper() -> bool:
    return torch.cuda.is_available() and pdl.supported(torch.device("cuda"))


needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a CUDA device of compute capability 9.0+")


def test_launches_ask_for_pdl_only_inside_the_block_and_only_where_supported():
    cpu = torch.device("cpu")
    assert not pdl.enabled(cpu)
    with pdl.launches():
        assert pdl._PDL.get() and not pdl.enabled(cpu)  # asked for, but no CPU launch takes it
        with pdl.launches(False):
            assert not pdl._PDL.get()
        assert pdl._PDL.get()
    assert not pdl._PDL.get()
    assert not pdl.supported(cpu)
    # the kernels' PDL path: on CPU (the interpreter) it runs with no-op waits; off where not asked
    assert pdl.kernel_flag(True, cpu) and not pdl.kernel_flag(False, cpu)


def test_with_launches_wraps_only_when_asked():
    seen = []

    def fn(x):
        seen.append(pdl._PDL.get())
        return x + 1

    assert pdl.with_launches(fn, False) is fn
    assert pdl.with_launches(fn, True)(1) == 2 and seen == [True]
    assert not pdl._PDL.get()


def test_interpreter_has_no_gdc_ops():
    """Under TRITON_INTERPRET=1 (the CPU tests) Triton's gdc ops cannot run: ours are no-ops then."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        assert not compat.triton_has_pdl()


def test_pdl_option_wraps_the_compiled_call_and_turns_on_inductors_pdl(monkeypatch):
    """With pdl the compiled call runs under pdl.launches and Inductor compiles its kernels with
    PDL and combo kernels, unless the options' own patches say otherwise; without pdl (not asked for, or no sm_90
    device, or no graphs), neither."""
    calls = []
    monkeypatch.setattr(compat, "compile_fx", lambda gm, inputs, patches: calls.append(patches) or gm)
    monkeypatch.setattr(compat, "copy_dynamo_graph", lambda gm: gm)  # the stub compile leaves it as it is

    def graph():
        return pdl._PDL.get()

    no_dump = GraphDump(None, None, {})
    on = backend._compiler(FullgraphConfig(pdl=True), True, no_dump)(graph, [])
    assert on() is True and calls[-1] == {"triton.enable_pdl": True, "combo_kernels": True}
    off = backend._compiler(FullgraphConfig(pdl=True), False, no_dump)(graph, [])
    assert off() is False and calls[-1] == {}
    options = FullgraphConfig(pdl=True, inductor_config={"triton.enable_pdl": False, "combo_kernels": False})
    backend._compiler(options, True, no_dump)(graph, [])
    assert calls[-1] == {"triton.enable_pdl": False, "combo_kernels": False}


def linear_graph(rows: int, dynamic: bool, fuse_silu: bool = False, dtype: torch.dtype = torch.bfloat16):
    """Dynamo's graph of a linear (of ``silu(gate) * up`` with ``fuse_silu``) over ``rows`` rows,
    after the passes that put our GEMV's ops in."""
    from passes import fuse_silu_linear, swap_linear

    def gated(gate, up, weight):
        return F.linear(F.silu(gate) * up, weight)

    torch._dynamo.reset()  # a size seen before would make the batch dynamic
    rows_in = [torch.randn(rows, 16, dtype=dtype) for _ in range(2 if fuse_silu else 1)]
    gm, _ = dynamo_graph(gated if fuse_silu else F.linear, *rows_in, torch.randn(8, 16, dtype=dtype),
                         dynamic=[(i, 0) for i in range(len(rows_in))] if dynamic else ())
    swap_linear(gm)
    if fuse_silu:
        fuse_silu_linear(gm)
    return gm


@pytest.mark.parametrize("rows, dynamic, fuse_silu, expected", [
    (1, False, False, True), (8, False, False, True), (17, False, False, False), (17, True, False, True),
    (1, False, True, True), (8, False, True, True), (17, False, True, False)])
def test_may_launch_a_kernel_of_ours_where_a_linear_can_have_few_rows(rows, dynamic, fuse_silu, expected):
    assert few_rows.MAX_ROWS == 16
    assert gemv.may_launch_linear_kernel(linear_graph(rows, dynamic, fuse_silu).graph) is expected


def test_no_few_row_kernel_means_one_row_only(monkeypatch):
    monkeypatch.setattr(few_rows, "MAX_ROWS", 1)
    assert not gemv.may_launch_linear_kernel(linear_graph(8, False).graph)
    assert gemv.may_launch_linear_kernel(linear_graph(1, False).graph)


def test_float32_linears_never_launch_the_gemv():
    """float32 stays on cuBLAS (eager's exact products), so such a graph runs none of our kernels."""
    assert not gemv.may_launch_linear_kernel(linear_graph(1, False, dtype=torch.float32).graph)
    assert not gemv.may_launch_linear_kernel(linear_graph(8, True, dtype=torch.float32).graph)


def test_graphs_without_our_kernels_go_without_pdl(monkeypatch, caplog):
    """Asked for and supported, PDL is taken where a GEMV, the few-row kernel or our attention may
    run; a graph of 17-row linears alone goes without, and the log says why."""
    monkeypatch.setattr(backend, "pdl_supported", lambda device: True)
    config, cuda = FullgraphConfig(), torch.device("cuda")
    assert backend._takes_pdl(config, cuda, True, linear_graph(1, False), has_attention=False)
    assert backend._takes_pdl(config, cuda, True, linear_graph(8, False), has_attention=False)
    assert backend._takes_pdl(config, cuda, True, linear_graph(17, False), has_attention=True)
    with caplog.at_level("INFO", logger="fullgraph"):
        assert not backend._takes_pdl(config, cuda, True, linear_graph(17, False), has_attention=False)
    assert "PDL off for this graph: none of our kernels runs in it" in caplog.text
    assert not backend._takes_pdl(FullgraphConfig(pdl=False), cuda, True, linear_graph(1, False), False)
    assert not backend._takes_pdl(config, cuda, False, linear_graph(1, False), False)

WAITS = "@triton_heuristics.pointwise(triton_meta={'launch_pdl': True})\n    tl.extra.cuda.gdc_wait()\n    x = tl.load(p)"
FILL = "@triton_heuristics.pointwise(triton_meta={'launch_pdl': True})\n    tl.store(out, 0.0)"
PLAIN_FILL = "@triton_heuristics.pointwise(triton_meta={'launch_pdl': False})\n    tl.store(out, 0.0)"


def combo(*parts: str) -> str:
    """A combo kernel's source with PDL as Inductor writes it: one branch of programs per part."""
    lines = ["@triton_heuristics.foreach(triton_meta={'launch_pdl': True})", "def triton_combo(...):",
             "    pid = tl.program_id(0)", "    num_xblocks_0 = tl.cdiv(xnumel_0, XBLOCK)"]
    for i, part in enumerate(parts):
        lines += [f"    {'el' if i else ''}if pid < num_xblocks_{i}:", "        pid_offset = pid",
                  f"        {part}"]
    return "\n".join(lines + ["    else:", "        pass"])


def test_unwaited_names_the_pdl_kernels_that_never_wait():
    assert pdl.unwaited([("triton_poi_0", WAITS), ("triton_poi_fill_1", FILL), ("triton_poi_2", PLAIN_FILL)]) == [
        "triton_poi_fill_1"]


def test_unwaited_asks_every_part_of_a_combo_kernel_to_wait():
    """A combo kernel's parts run in programs of their own: one part that never waits (a fill) is
    enough to name the kernel, though another part waits."""
    wait_then_load, fill = "tl.extra.cuda.gdc_wait(); x = tl.load(p)", "tl.store(out, 0.0)"
    assert pdl.unwaited([("triton_combo_0", combo(wait_then_load, wait_then_load)),
                         ("triton_combo_1", combo(wait_then_load, fill)),
                         ("triton_combo_2", combo(fill, wait_then_load))]) == ["triton_combo_1", "triton_combo_2"]


def test_inductor_triton_sources_records_each_kernel_inside_the_block_only(monkeypatch):
    from torch._inductor.async_compile import AsyncCompile

    monkeypatch.setattr(AsyncCompile, "triton", lambda self, name, source, device_str="cuda": f"compiled {name}")
    assert AsyncCompile.triton(None, "outside", "src") == "compiled outside"
    with compat.inductor_triton_sources() as sources:
        assert AsyncCompile.triton(None, "k0", WAITS) == "compiled k0"  # the wrapper returns what it wraps
        AsyncCompile.triton(None, "k1", FILL, device_str="cuda")
    AsyncCompile.triton(None, "after", "src")
    assert sources == [("k0", WAITS), ("k1", FILL)]


@pytest.mark.parametrize("kernel", [WAITS, FILL])
def test_a_kernel_that_never_waits_compiles_the_graph_again_without_inductors_pdl(monkeypatch, caplog, kernel):
    """Inductor's code is stubbed: a compile with its PDL on 'loads' one kernel. One that waits is
    kept; a fill that never waits makes the graph compile again, from a copy, with PDL off."""
    calls = []

    def compile_fx(gm, inputs, patches):
        calls.append((gm, dict(patches)))
        if patches.get("triton.enable_pdl"):
            compat._TRITON_SOURCES.get().append(("triton_poi_0", kernel))
        return gm

    monkeypatch.setattr(compat, "compile_fx", compile_fx)
    monkeypatch.setattr(compat, "copy_dynamo_graph", lambda gm: ("copy of", gm))
    with caplog.at_level("WARNING", logger="fullgraph"):
        compiled = backend._inductor("graph", [], {"triton.enable_pdl": True, "combo_kernels": True})
    if kernel is WAITS:
        assert calls == [("graph", {"triton.enable_pdl": True, "combo_kernels": True})] and compiled == "graph"
        assert not caplog.records
    else:
        assert calls[1] == (("copy of", "graph"), {"triton.enable_pdl": False, "combo_kernels": True})
        assert compiled == ("copy of", "graph")
        assert "Inductor's PDL off for this graph" in caplog.text and "triton_poi_0" in caplog.text


def test_pdl_option_is_checked():
    assert FullgraphConfig().pdl and not FullgraphConfig(pdl=False).pdl
    with pytest.raises(ValueError, match="pdl must be True or False"):
        FullgraphConfig(pdl="yes")


# ---- GPU (sm_90+) -----------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_hopper
def test_the_option_reaches_the_gemv_launch():
    from fullgraph_backend import gemv as gemv_module

    w = torch.randn(256, 1536, device="cuda", dtype=torch.bfloat16)
    row = torch.randn(1536, device="cuda", dtype=torch.bfloat16)
    for use in (False, True):
        out = torch.empty(256, device="cuda", dtype=torch.bfloat16)
        kernel = gemv_module._launch(row, w, None, out, use)
        assert kernel.metadata.launch_pdl is use
        assert ("griddepcontrol.wait" in kernel.asm["ptx"]) is use


@pytest.mark.gpu
@needs_hopper
def test_stream_capture_keeps_the_programmatic_edge():
    """A primary that lets dependents launch, then spins until a flag is set; a secondary launched
    with PDL that sets it without waiting. Replayed from a CUDA graph, the primary sees the flag
    only if the secondary ran while it was still running: the edge is programmatic."""
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    seen = torch.zeros(1, dtype=torch.int32, device="cuda")

    def step(launch_pdl: bool):
        flag.zero_()
        _primary[(1,)](flag, seen, SPINS=1 << 18)
        _secondary[(1,)](flag, launch_pdl=launch_pdl)

    for launch_pdl, expected in ((True, 1), (False, 0)):
        step(launch_pdl)  # compile outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(launch_pdl)
        for _ in range(3):
            seen.fill_(-1)
            graph.replay()
            torch.cuda.synchronize()
            assert seen.item() == expected, f"launch_pdl={launch_pdl}"


@pytest.mark.gpu
@needs_hopper
def test_a_captured_gemv_chain_replays_the_same_bits_with_pdl():
    """Each GEMV reads the one before it, so a read before the wait would show; 30 replays with
    new inputs, PDL against plain launches, bit for bit."""
    from fullgraph_backend.gemv import gemv

    torch.manual_seed(0)
    k = 1536
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for n in (k, k, k, k)]
    x = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)

    def chain(use):
        y = x
        for w in weights * 4:
            y = gemv(y, w, pdl=use)
        return y

    graphs = {}
    for use in (False, True):
        chain(use)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(use)
        graphs[use] = graph, out
    for step in range(30):
        x.copy_(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
        results = {}
        for use, (graph, out) in graphs.items():
            graph.replay()
            results[use] = out.clone()
        assert torch.equal(results[True], results[False]), f"replay {step}"
    assert torch.equal(results[False], chain(False))


@pytest.mark.gpu
@needs_hopper
def test_backend_pdl_graphs_match_plain_graphs():
    """The tiny decoder in bf16, full graphs: pdl=True (our GEMV and split-KV decode kernels and
    Inductor's with PDL) gives the same logits as pdl=False, step after step."""
    from fullgraph_backend import use_forward_context
    from fullgraph_backend.models import build_model, get_config

    from helpers import own_block_tables

    config = get_config("tiny")
    model = build_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    logits = {}
    for use in (False, True):
        torch._dynamo.reset()
        ctx = config.forward_context(dtype=torch.bfloat16, device="cuda", max_num_seqs=8, max_num_tokens=16,
                                     max_model_len=64)
        compiled = torch.compile(model, backend="fullgraph", options={"cudagraph_mode": "full", "pdl": use})
        logits[use] = []
        with use_forward_context(ctx), torch.inference_mode():
            torch.manual_seed(1)
            for cache in ctx.kv_caches:
                cache.normal_(0, 0.5)
            for step, (query, seq) in enumerate([([1], [17])] * 6 + [([1, 1, 1], [4, 8, 40])] * 4):
                positions = ctx.prepare(query, [s + step for s in seq], own_block_tables(ctx, len(query)))
                ids = torch.randint(0, config.vocab_size, (len(query),), device="cuda")
                torch._dynamo.mark_dynamic(ids, 0)
                torch._dynamo.mark_dynamic(positions, 0)
                logits[use].append(compiled(ids, positions).clone())
    for step, (plain, with_pdl) in enumerate(zip(logits[False], logits[True])):
        assert torch.equal(plain, with_pdl), f"step {step}"
    torch._dynamo.reset()


def _compile_double_and_arange(options: dict, caplog) -> None:
    """Compile ``x * 2`` and an ``arange`` (a Triton kernel with no load) with our backend and
    ``options``, warnings captured, and check both outputs."""
    def f(x):
        return x * 2, torch.arange(x.shape[0] * 3, device=x.device)

    torch._dynamo.reset()
    x = torch.randn(8, 16, device="cuda")
    with caplog.at_level("WARNING", logger="fullgraph"), torch.inference_mode():
        doubled, iota = torch.compile(f, backend="fullgraph", options=options)(x)
        assert torch.equal(doubled, x * 2) and torch.equal(iota, torch.arange(24, device="cuda"))


@pytest.mark.gpu
@needs_hopper
def test_a_graph_with_a_kernel_that_never_waits_runs_without_inductors_pdl(caplog):
    """An ``arange`` returned on its own is a Triton kernel with no load: compiled with Inductor's PDL
    (asked for directly: no kernel of ours runs in this graph, so the backend leaves PDL off) it
    would never wait, so the graph is compiled again without it (logged), and its outputs are right;
    the tiny decoder's graphs have no such kernel and keep it."""
    from fullgraph_backend import use_forward_context
    from fullgraph_backend.models import build_model, get_config

    from helpers import own_block_tables

    no_combo = {**backend.PDL_PATCHES, "combo_kernels": False}  # the arange a kernel of its own, after x * 2's
    _compile_double_and_arange({"inductor_config": no_combo}, caplog)
    assert "Inductor's PDL off for this graph" in caplog.text
    caplog.clear()
    torch._dynamo.reset()
    config = get_config("tiny")
    model = build_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    ctx = config.forward_context(dtype=torch.bfloat16, device="cuda", max_num_seqs=8, max_num_tokens=16,
                                 max_model_len=64)
    with caplog.at_level("WARNING", logger="fullgraph"), use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([1, 1], [17, 9], own_block_tables(ctx, 2))
        ids = torch.randint(0, config.vocab_size, (2,), device="cuda")
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        torch.compile(model, backend="fullgraph")(ids, positions)
    assert "PDL off" not in caplog.text
    torch._dynamo.reset()


@pytest.mark.gpu
@needs_hopper
def test_combo_kernels_are_cut_into_their_parts_and_every_part_waits(monkeypatch, caplog):
    """With combo kernels (the default with PDL, asked for directly here) Inductor launches x * 2 and
    the arange as one kernel: the check sees its parts in the source Inductor really writes, and either
    every part waits (the combo is the graph's first kernel: each access waits) or the graph compiled
    again without Inductor's PDL; the outputs are right either way."""
    seen = []
    real = backend.pdl_unwaited
    monkeypatch.setattr(backend, "pdl_unwaited", lambda sources: seen.append(list(sources)) or real(sources))

    _compile_double_and_arange({"inductor_config": backend.PDL_PATCHES}, caplog)
    sources = [source for compiled in seen for _, source in compiled if "'launch_pdl': True" in source]
    combos = [source for source in sources if len(pdl._program_parts(source)) >= 2]
    assert combos, "no combo kernel found; the PDL kernels:\n" + "\n----\n".join(s[-1500:] for s in sources)
    waits = all("gdc_wait()" in part for source in combos for part in pdl._program_parts(source))
    assert waits != ("Inductor's PDL off for this graph" in caplog.text), combos[0][-2000:]
    torch._dynamo.reset()

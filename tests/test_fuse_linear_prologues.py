"""The fuse_norm_linear and fuse_silu_linear passes: RMSNorms and SiLU-muls folded into the linears
after them; and fuse_silu_epilogue: SiLU-muls folded into the gate_up linear before them. On our
decoder and on transformers' Llama and Qwen2 code, run as the backend runs them on graphs captured
on CUDA."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

from fullgraph_backend import compat, use_forward_context
from fullgraph_backend.attention.registry import get_impl
from fullgraph_backend.backend import graph_passes
from fullgraph_backend.config import FullgraphConfig
from fullgraph_backend.gemv import add_rms_norm_linear, linear, linear_silu_mul, rms_norm_linear, silu_mul_linear
from fullgraph_backend.models import build_model, get_config
from fullgraph_backend.models.hf import ATTN_IMPLEMENTATION, TransformersDecoder, inspect_model
from fullgraph_backend.regions import RegionalCompiler
from passes import PassManager, fuse_norm_linear, fuse_silu_epilogue, fuse_silu_linear, swap_linear

from helpers import dynamo_graph

LAYERS = 3
HF_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)


# option sets that turn one SiLU fusion on alone
SILU_ONLY = {"fuse_norm": False, "fuse_silu": True}
EPILOGUE_ONLY = {"fuse_norm": False, "fuse_silu_epilogue": True}


def build(impl: str, dtype: torch.dtype, layers: int = LAYERS) -> nn.Module:
    """Our decoder ("fullgraph") or transformers' code of a family, tiny, random."""
    torch.manual_seed(0)
    if impl == "fullgraph":
        return build_model(get_config("tiny").replace(num_layers=layers), dtype=dtype)
    hf_config = AutoConfig.for_model(impl, **{**HF_TINY, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    for name, p in model.named_parameters():  # norms away from 1, so a norm weight that went astray shows
        if "norm" in name:
            p.data.normal_(1.0, 0.2)
    return TransformersDecoder(model, inspect_model(hf_config, impl, dtype))


def step(model: nn.Module, dtype: torch.dtype, options: dict | None = None, compiler=lambda gm, inputs: gm):
    """A mixed step (3 + 1 tokens, logits where requests end) of ``model``'s Dynamo graph through the
    backend's passes for a graph captured on CUDA, then ``compiler`` (inside Dynamo's call, as the
    backend's); returns ``(compiled graph, pass reports, its inputs, eager logits, context)``."""
    ctx = model.config.forward_context(dtype=dtype, max_num_seqs=4, max_num_tokens=16, max_model_len=64)
    impl = get_impl("reference")

    def read(gm, example_inputs):
        gm = compat.copy_dynamo_graph(gm)
        config = FullgraphConfig.from_options({"fuse_norm": True, "fuse_silu_epilogue": False, **(options or {})})
        passes = graph_passes(config, torch.device("cuda"), ctx, impl, example_inputs)
        results = {r.name: r for r in PassManager(passes, None).run(gm)}
        inputs = [*example_inputs, *results["swap_attention"].report.inputs.values()]
        return compiler(gm, inputs), results, inputs

    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([3, 1], [5, 9], [[1], [2]])
        ids = torch.tensor([3, 7, 11, 5])
        cache = [c.clone() for c in ctx.kv_caches]
        expected = model(ids, positions, request_ends=True)
        for c, before in zip(ctx.kv_caches, cache):
            c.copy_(before)  # the graph stores the step's K / V again, as eager did
        fn = lambda i, p: model(i, p, request_ends=True)  # noqa: E731
        (gm, results, inputs), _ = dynamo_graph(fn, ids, positions, dynamic=((0, 0), (1, 0)),
                                                read=lambda gm, ex: (read(gm, ex), ex))
    values = [ids.shape[0] if isinstance(x, (torch.SymInt, int)) else x for x in inputs]
    return gm, results, values, expected, ctx


def run(gm, values, ctx):
    with use_forward_context(ctx), torch.inference_mode():
        out = gm(*values)
    return out[0] if isinstance(out, (tuple, list)) else out


def targets(gm) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


@pytest.mark.parametrize("impl, dtype", [("fullgraph", torch.bfloat16), ("fullgraph", torch.float16),
                                         ("llama", torch.bfloat16), ("qwen2", torch.bfloat16)])
def test_every_norm_before_a_linear_is_fused_and_the_step_computes_the_same(impl, dtype):
    """Each layer's two norms, and our decoder's final one (transformers' code gathers the rows of
    ending requests after its final norm, so the LM head reads the gather): every one after the
    first with the residual add before it (the first layer's reads the embedding); logits as
    eager's (on CPU the ops run eager's own ops)."""
    gm, results, values, expected, ctx = step(build(impl, dtype), dtype)
    report = results["fuse_norm_linear"].report
    norms = 2 * LAYERS + (impl == "fullgraph")  # transformers' code gathers the rows after the final norm
    assert len(report.fused) == norms and sum(r for _, r in report.fused) == 2 * LAYERS - 1, report
    assert not report.skipped
    assert f"fused {norms} RMSNorm" in report.summary()
    after = targets(gm)
    assert after[add_rms_norm_linear] == 2 * LAYERS - 1 and after[rms_norm_linear] == norms - 2 * LAYERS + 1
    assert after[linear] == 2 * LAYERS + (impl != "fullgraph")  # o_proj, down (and transformers' LM head)
    assert after[torch.rsqrt] + after["rsqrt"] == (impl != "fullgraph")  # transformers' final norm
    torch.testing.assert_close(run(gm, values, ctx), expected)


@pytest.mark.parametrize("impl", ["fullgraph", "llama", "qwen2"])
def test_float32_graphs_keep_inductors_norms(impl):
    """No GEMV runs in float32 (fullgraph::linear keeps cuBLAS, for eager's greedy tokens), so
    nothing is fused and the graph keeps eager's numerics as Inductor computes them."""
    gm, results, values, expected, ctx = step(build(impl, torch.float32), torch.float32)
    report = results["fuse_norm_linear"].report
    assert not report.fused and report.skipped and all("float32: no GEMV" in s for s in report.skipped)
    torch.testing.assert_close(run(gm, values, ctx), expected)


def test_the_option_turns_the_pass_off():
    gm, results, values, expected, ctx = step(build("fullgraph", torch.bfloat16), torch.bfloat16, {"fuse_norm": False})
    assert "fuse_norm_linear" not in results and not targets(gm)[add_rms_norm_linear]
    torch.testing.assert_close(run(gm, values, ctx), expected)


def test_fused_decoder_graph_is_cut_into_regions_and_computes_the_same():
    """The fused op returns two tensors (the projection and the sum): the regional compile cuts after
    their items, so tensors cross the cuts, not the tuple. The first layer's norm reads the
    embedding (no add to fuse), so layers 2 to 5 are the alike ones."""
    reports = []
    compiler = RegionalCompiler(lambda g, example_inputs: g, {}, on_report=reports.append)
    compiled, _, values, expected, ctx = step(build("fullgraph", torch.bfloat16, layers=5), torch.bfloat16,
                                              compiler=compiler)
    (report,) = reports
    assert report.why_not is None and len(report.regions) >= 4, report.summary()
    torch.testing.assert_close(run(compiled, values, ctx), expected)


@pytest.mark.parametrize("impl, options", [("fullgraph", {}), ("qwen2", EPILOGUE_ONLY)])
def test_inductor_compiles_the_fused_graph_to_eagers_logits(impl, options):
    """Inductor (CPU) calls the ops as extern kernels (their fallback: eager's ops), and computes
    the rest in its own kernels (bfloat16 rounding where they differ from eager's): the norm
    prologues' graph, and the SiLU epilogue's."""
    compiled, _, values, expected, ctx = step(build(impl, torch.bfloat16), torch.bfloat16, options,
                                              compiler=lambda gm, inputs: compat.compile_fx(gm, inputs, {}))
    torch.testing.assert_close(run(compiled, values, ctx), expected, atol=1e-2, rtol=2e-2)  # logits ~0.1


def bf16_randn(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.randn(shape, dtype=torch.bfloat16) for shape in shapes]


def swapped(model: nn.Module, *inputs: torch.Tensor) -> tuple[torch.fx.GraphModule, list]:
    """``model`` in bf16, inference only (changed in place), its Dynamo graph on ``inputs`` (static
    shapes) after ``swap_linear``, and the graph's example inputs."""
    gm, example_inputs = dynamo_graph(model.requires_grad_(False).to(torch.bfloat16), *inputs, dynamic=())
    swap_linear(gm)
    return gm, example_inputs


class _Norm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size) + 0.5)

    def forward(self, x):
        h = x.to(torch.float32)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


class _Skips(nn.Module):
    """Three norms: one whose normed value is read again after its linear (left alone), one whose
    sum is read before its linear (fused without the add), one plain."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList(_Norm(16) for _ in range(3))
        self.projs = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x, r):
        n = self.norms[0](x)
        y = self.projs[0](n) + n
        h = y + r
        early = h * 2
        z = self.projs[1](self.norms[1](h))
        return self.projs[2](self.norms[2](z + early)), h


def test_norms_read_elsewhere_are_left_and_sums_read_before_the_linear_stay_adds():
    model, (x, r) = _Skips(), bf16_randn((3, 16), (3, 16))
    gm, example_inputs = swapped(model, x, r)
    report = fuse_norm_linear(gm)
    assert [residual for _, residual in report.fused] == [False, True]
    assert len(report.skipped) == 1 and "the normed value has 2 readers" in report.skipped[0]
    assert "skipped 1" in report.summary()
    with torch.inference_mode():
        for got, want in zip(gm(*example_inputs), model(x, r)):
            torch.testing.assert_close(got, want)


# ---- fuse_silu_linear and fuse_silu_epilogue: SiLU-mul into the down projection, or into gate_up ----
# each SiLU fusion's options, op and what its report calls a fused pair
SILU_FUSIONS = {"fuse_silu_linear": (SILU_ONLY, silu_mul_linear, "SiLU-mul -> fullgraph::linear"),
                "fuse_silu_epilogue": (EPILOGUE_ONLY, linear_silu_mul, "fullgraph::linear -> SiLU-mul")}


@pytest.mark.parametrize("impl, dtype", [("fullgraph", torch.bfloat16), ("fullgraph", torch.float16),
                                         ("llama", torch.bfloat16), ("qwen2", torch.bfloat16)])
@pytest.mark.parametrize("fusion", ["fuse_silu_linear", "fuse_silu_epilogue"])
def test_every_silu_mul_of_the_mlp_is_fused_and_the_step_computes_the_same(fusion, impl, dtype):
    """One per layer (the halves of the merged gate_up projection: our decoder's chunk, transformers'
    merged split), into down's prologue or gate_up's epilogue; no SiLU left, three plain linears a
    layer and the LM head; logits as eager's (on CPU the op runs eager's own ops)."""
    options, op, pairs = SILU_FUSIONS[fusion]
    gm, results, values, expected, ctx = step(build(impl, dtype), dtype, options)
    report = results[fusion].report
    assert len(report.fused) == LAYERS and not report.skipped, report.summary()
    assert f"fused {LAYERS} {pairs} pairs" in report.summary()
    after = targets(gm)
    assert after[op] == LAYERS and not after[torch.nn.functional.silu]
    assert after[linear] == 3 * LAYERS + 1
    torch.testing.assert_close(run(gm, values, ctx), expected)


def test_both_prologue_passes_together_fuse_every_pair():
    gm, results, values, expected, ctx = step(build("qwen2", torch.bfloat16), torch.bfloat16, {"fuse_silu": True})
    assert len(results["fuse_silu_linear"].report.fused) == LAYERS
    assert len(results["fuse_norm_linear"].report.fused) == 2 * LAYERS
    after = targets(gm)
    assert after[linear] == LAYERS + 1 and after[silu_mul_linear] == LAYERS  # o_proj and the LM head stay plain
    torch.testing.assert_close(run(gm, values, ctx), expected)


@pytest.mark.parametrize("fusion, impl", [("fuse_silu_linear", "llama"), ("fuse_silu_epilogue", "qwen2")])
def test_float32_graphs_keep_inductors_silu_mul(fusion, impl):
    options, op, _ = SILU_FUSIONS[fusion]
    gm, results, values, expected, ctx = step(build(impl, torch.float32), torch.float32, options)
    report = results[fusion].report
    assert not report.fused and len(report.skipped) == LAYERS and all("float32: no GEMV" in s for s in report.skipped)
    assert not targets(gm)[op]
    torch.testing.assert_close(run(gm, values, ctx), expected)


def test_the_silu_prologue_option_is_off_by_default():
    gm, results, values, expected, ctx = step(build("fullgraph", torch.bfloat16), torch.bfloat16, {"fuse_norm": False})
    assert "fuse_silu_linear" not in results and not targets(gm)[silu_mul_linear]


class _GatedSkips(nn.Module):
    """Four SiLU-muls before linears: one whose SiLU is read again (left alone), one whose product
    is read again (left alone), one that broadcasts ``up`` (left alone), one plain with ``up``
    first (fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.projs = nn.ModuleList(nn.Linear(16, 8) for _ in range(4))

    def forward(self, gate, up, row):
        s = nn.functional.silu(gate)
        a = self.projs[0](s * up) + s[..., :8]
        p = nn.functional.silu(gate + 1) * up
        b = self.projs[1](p) + p[..., :8]
        c = self.projs[2](nn.functional.silu(gate) * row)
        d = self.projs[3](up * nn.functional.silu(gate - 1))
        return a + b + c + d


def test_silu_muls_read_elsewhere_or_broadcast_are_left_alone():
    model, (gate, up, row) = _GatedSkips(), bf16_randn((3, 16), (3, 16), (16,))
    gm, example_inputs = swapped(model, gate, up, row)
    report = fuse_silu_linear(gm)
    assert len(report.fused) == 1 and len(report.skipped) == 3, report.summary()
    assert sum("readers besides the product" in s for s in report.skipped) == 1
    assert sum("readers besides the linear" in s for s in report.skipped) == 1
    assert sum("a broadcast" in s for s in report.skipped) == 1
    with torch.inference_mode():
        torch.testing.assert_close(gm(*example_inputs)[0], model(gate, up, row))


# ---- fuse_silu_epilogue: SiLU-mul into the gate_up projection ----


def test_epilogue_before_the_norm_prologues_leaves_gate_ups_norm_to_inductor():
    """With ``fuse_norm`` too, the norms before qkv (and the final one) go into their GEMVs; the one
    before gate_up stays (the op has no norm prologue)."""
    gm, results, values, expected, ctx = step(build("fullgraph", torch.bfloat16), torch.bfloat16,
                                              {"fuse_silu_epilogue": True})
    assert len(results["fuse_silu_epilogue"].report.fused) == LAYERS
    assert len(results["fuse_norm_linear"].report.fused) == LAYERS + 1
    torch.testing.assert_close(run(gm, values, ctx), expected)


def test_the_epilogue_option_is_on_by_default_and_fuse_silu_needs_it_off():
    assert FullgraphConfig().fuse_silu_epilogue  # test_passes checks where the backend runs it
    with pytest.raises(ValueError, match="pass fuse_silu_epilogue=False with it"):
        FullgraphConfig.from_options({"fuse_silu": True})
    assert FullgraphConfig.from_options({"fuse_silu": True, "fuse_silu_epilogue": False}).fuse_silu


class _EpilogueSkips(nn.Module):
    """Eight SiLU-muls: halves read again, SiLU on the second half, the projection's output read
    again, halves of no projection, a projection's thirds (each left alone); ``up * silu(gate)``,
    ``split(n)`` halves with the product read twice (each fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.projs = nn.ModuleList(nn.Linear(16, 32) for _ in range(5))
        self.wide = nn.Linear(16, 48)

    def forward(self, x, t):
        g0, u0 = self.projs[0](x).chunk(2, dim=-1)
        a = nn.functional.silu(g0) * u0 + g0
        g1, u1 = self.projs[1](x).chunk(2, dim=-1)
        b = nn.functional.silu(u1) * g1
        y = self.projs[2](x)
        g2, u2 = y.chunk(2, dim=-1)
        c = nn.functional.silu(g2) * u2 + y[..., :16]
        g3, u3 = t.chunk(2, dim=-1)
        d = nn.functional.silu(g3) * u3
        g4, u4, _ = self.wide(x).split([16, 16, 16], dim=-1)
        e = nn.functional.silu(g4) * u4
        g5, u5 = self.projs[3](x).chunk(2, dim=-1)
        f = u5 * nn.functional.silu(g5)
        g6, u6 = self.projs[4](x).split(16, dim=-1)
        p = nn.functional.silu(g6) * u6
        return a + b + c + d + e + f + p + p.cos()


def test_silu_muls_whose_halves_are_read_elsewhere_or_not_a_linears_halves_are_left_alone():
    model, (x, t) = _EpilogueSkips(), bf16_randn((3, 16), (3, 32))
    gm, example_inputs = swapped(model, x, t)
    report = fuse_silu_epilogue(gm)
    assert len(report.fused) == 2 and len(report.skipped) == 5, report.summary()
    reasons = sorted(reason.split(": ", 1)[1] for reason in report.skipped)
    assert reasons == ["gate and up are not the first and second halves of one output"] * 2 + [
        "the halves do not come from a fullgraph::linear", "the halves have readers besides SiLU-mul",
        "the projection's output has readers besides its split"]
    assert targets(gm)[linear_silu_mul] == 2
    with torch.inference_mode():
        torch.testing.assert_close(gm(*example_inputs)[0], model(x, t))

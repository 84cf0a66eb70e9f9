"""Fold each 16-bit ``silu(gate) * up`` whose halves come from one ``fullgraph::linear`` into that
linear (``fullgraph::linear_silu_mul``): the gated MLP's merged gate_up projection of Llama, Qwen2,
Mistral and our decoder.

At batch 1 the op computes SiLU-mul in the GEMV's epilogue (each program sums a gate row and its up
row), so the pointwise kernel Inductor emits between the gate_up and down projections goes and the
down GEMV follows gate_up directly. The backend runs this pass after ``swap_linear`` (graphs
captured on CUDA) and before the prologue fusions: a gate_up projection it takes keeps no norm in
its prologue, and its SiLU-mul is no longer down's to fold (the config refuses ``fuse_silu`` with it).

The pattern, as Dynamo traces our decoder (``gate_up_proj(x).chunk(2, dim=-1)``) and transformers'
Llama and Qwen2 (``gate_proj`` and ``up_proj``, merged by ``merge_linears`` into one linear and a
``torch.split``): a ``fullgraph::linear`` read only by a split of its last dim into two equal halves,
each half read once, SiLU on the first, the product of the two (read by anything).
"""
from __future__ import annotations

import operator

import torch

from fullgraph_backend.gemv import linear, linear_silu_mul
from passes.fuse_silu_linear import silu_mul_operands
from passes.swap_linear import FusionReport, linear_args

SPLIT_TARGETS = (torch.split, torch.chunk, torch.Tensor.split, torch.Tensor.chunk)


class SiluEpilogueReport(FusionReport):
    """The fused ops by node name, and why each other SiLU-mul was left alone."""

    PAIRS = "fullgraph::linear -> SiLU-mul pairs"


def fuse_silu_epilogue(gm: torch.fx.GraphModule) -> SiluEpilogueReport:
    """Replace each ``silu(gate) * up`` of ``gm`` whose ``gate`` and ``up`` are the two halves of one
    ``fullgraph::linear``'s output, read nowhere else, by one ``fullgraph::linear_silu_mul`` node;
    returns the report. Run after ``swap_linear``."""
    report = SiluEpilogueReport()
    graph = gm.graph
    for product in list(graph.nodes):
        found = silu_mul_operands(product)
        if found is None:
            continue
        source = found if isinstance(found, str) else _gate_up(found[0], found[1])
        if isinstance(source, str):
            report.skipped.append(f"{product.name}: {source}")
            continue
        (gate, up, silu), (halves, gate_up) = found, source
        with graph.inserting_before(product):
            fused = graph.call_function(linear_silu_mul, linear_args(gate_up))
        fused.meta.update(product.meta)
        product.replace_all_uses_with(fused)
        for dead in (product, silu, gate, up, halves, gate_up):
            graph.erase_node(dead)
        report.fused.append(fused.name)
    graph.lint()
    gm.recompile()
    return report


def _gate_up(gate: torch.fx.Node, up: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | str:
    """``(split node, linear node)`` if ``gate`` and ``up`` are the first and second halves of one
    ``fullgraph::linear``'s output, read only by the SiLU-mul; why not, otherwise."""
    halves = gate.args[0] if _is_item(gate, 0) else None
    if halves is None or not _is_item(up, 1) or up.args[0] is not halves or not _is_halving(halves):
        return "gate and up are not the first and second halves of one output"
    if set(halves.users) != {gate, up} or len(gate.users) != 1 or len(up.users) != 1:
        return "the halves have readers besides SiLU-mul"
    source = halves.args[0]
    if not (isinstance(source, torch.fx.Node) and source.op == "call_function" and source.target is linear):
        return "the halves do not come from a fullgraph::linear"
    if len(source.users) != 1:
        return "the projection's output has readers besides its split"
    return halves, source


def _is_item(node: torch.fx.Node, index: int) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and node.args[1] == index


def _is_halving(node: object) -> bool:
    """Whether ``node`` splits a tensor's last dim into two equal halves: ``chunk(2, -1)`` or
    ``split([n, n], -1)`` / ``split(n, -1)``, as a method or a function."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method" and node.target in ("chunk", "split"):
        target = getattr(torch.Tensor, node.target)
    elif node.op == "call_function" and node.target in SPLIT_TARGETS:
        target = node.target
    else:
        return False
    value = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or len(node.args) < 2:
        return False
    sizes = node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    width = value.shape[-1]
    if dim not in (-1, value.dim() - 1):
        return False
    if target in (torch.chunk, torch.Tensor.chunk):
        return sizes == 2 and width % 2 == 0
    return list(sizes) == [width // 2] * 2 if isinstance(sizes, (list, tuple)) else sizes * 2 == width

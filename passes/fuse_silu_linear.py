"""Fold each 16-bit ``silu(gate) * up`` that only feeds a ``fullgraph::linear`` into it
(``fullgraph::silu_mul_linear``): the gated MLP's down projection of Llama, Qwen2, Mistral and our decoder.

At batch 1 the op computes SiLU-mul in the GEMV's prologue, so the pointwise kernel Inductor emits
before the down projection goes, and down runs on our GEMV instead of cuBLAS's split-K and its
reduce kernel (docs/perf-notes.md, section 36). The backend runs this pass after ``swap_linear``,
so only on graphs captured on CUDA: there the op's choice between the fused GEMV and a SiLU-mul
kernel + ``fullgraph::linear`` is made once per captured size.

The pattern, as Dynamo traces ``F.silu(gate) * up`` (our decoder) and transformers'
``act_fn(gate_proj(x)) * up_proj(x)``: a ``silu`` node (``F.silu`` with ``inplace=False``, or
``torch.nn.functional.silu``'s ATen op) read only by a ``mul`` of two tensors of one shape and
dtype, either operand order, the product read only by the linear.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from fullgraph_backend.gemv import GEMV_DTYPES, silu_mul_linear
from passes.swap_linear import FusionReport, linears_fed_by

SILU_TARGETS = (F.silu, torch.ops.aten.silu.default)
MUL_TARGETS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


class SiluFusionReport(FusionReport):
    """The fused ops by node name, and why each other SiLU-mul feeding a linear was left alone."""

    PAIRS = "SiLU-mul -> fullgraph::linear pairs"


def fuse_silu_linear(gm: torch.fx.GraphModule) -> SiluFusionReport:
    """Replace each ``linear(silu(gate) * up, weight, bias)`` of ``gm`` whose product and SiLU have
    no other reader by one ``fullgraph::silu_mul_linear`` node; returns the report. Run after
    ``swap_linear``."""
    report = SiluFusionReport()
    graph = gm.graph
    for node, weight, bias, (gate, up, product, silu) in linears_fed_by(graph, _silu_mul, report.skipped):
        with graph.inserting_before(node):
            fused = graph.call_function(silu_mul_linear, (gate, up, weight, bias))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        for dead in (node, product, silu):
            graph.erase_node(dead)
        report.fused.append(fused.name)
    graph.lint()
    gm.recompile()
    return report


def _is_silu(node: object) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in SILU_TARGETS
            and len(node.args) == 1 and not node.kwargs.get("inplace", False))


def _silu_mul(product: object) -> tuple[torch.fx.Node, ...] | str | None:
    """``(gate, up, product node, silu node)`` if ``product`` is ``silu(gate) * up`` the fused op
    computes; None if it is no SiLU-mul; why not, for one that does not fit."""
    found = silu_mul_operands(product)
    if found is None or isinstance(found, str):
        return found
    if len(product.users) != 1:
        return "the product has readers besides the linear"
    gate, up, silu = found
    return gate, up, product, silu


def silu_mul_operands(product: object) -> tuple[torch.fx.Node, ...] | str | None:
    """``(gate, up, silu node)`` if ``product`` is ``silu(gate) * up`` of two 16-bit tensors of one
    shape whose SiLU has no other reader; None if it is no SiLU-mul; why not, for one that does not
    fit our kernels (float32, a broadcast, SiLU read elsewhere)."""
    if not (isinstance(product, torch.fx.Node) and product.op == "call_function" and product.target in MUL_TARGETS
            and len(product.args) == 2 and not product.kwargs):
        return None
    first, second = product.args
    silu, up = (first, second) if _is_silu(first) else (second, first)
    if not _is_silu(silu) or not isinstance(up, torch.fx.Node) or up is silu:
        return None
    gate = silu.args[0]
    values = [n.meta.get("example_value") if isinstance(n, torch.fx.Node) else None for n in (gate, up)]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return "the graph has no example values for SiLU-mul's inputs"
    if values[0].dtype not in GEMV_DTYPES:  # as fullgraph::linear keeps cuBLAS there: float32 keeps eager's numerics
        return f"{values[0].dtype}: no GEMV runs, Inductor keeps SiLU-mul"
    if values[0].shape != values[1].shape or values[0].dtype != values[1].dtype:
        return f"gate {tuple(values[0].shape)} and up {tuple(values[1].shape)} differ in shape or dtype (a broadcast)"
    if len(silu.users) != 1:
        return "SiLU has readers besides the product"
    return gate, up, silu

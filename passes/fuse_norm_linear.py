"""Fold each 16-bit RMSNorm that only feeds a ``fullgraph::linear`` into it (``fullgraph::rms_norm_linear``), and
the residual add before the norm too (``fullgraph::add_rms_norm_linear``, which returns the sum for
the next residual).

At batch 1 the op runs the norm in the GEMV's prologue, so the add + RMSNorm kernel Inductor emits
before every GEMV that follows a norm (qkv, gate_up, the LM head) is gone (docs/perf-notes.md,
section 32). The backend runs this pass right after ``swap_linear``, so only on graphs captured on
CUDA: there the op's choice between the fused GEMV and a norm kernel + ``fullgraph::linear`` is made
once per captured size.

The pattern is the RMSNorm of Llama and Qwen2 as their transformers code and our decoder write it,
as Dynamo traces it: ``h = x.float()`` (or ``.to(torch.float32)``), ``h * rsqrt(h.pow(2).mean(-1,
keepdim=True) + eps)``, cast back to x's dtype, times the norm weight (either operand order).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import permutations

import torch

from fullgraph_backend.gemv import GEMV_DTYPES, add_rms_norm_linear, rms_norm_linear
from passes.swap_linear import linears_fed_by, skipped_tail

# call_function targets by the method name Dynamo records for the same op (receiver first)
_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add", torch.rsqrt: "rsqrt",
              torch.pow: "pow", operator.pow: "pow", torch.mean: "mean"}


@dataclass
class NormFusionReport:
    """The fused ops, by node name, with whether the residual add before the norm went in too; and
    why each other norm feeding a linear was left alone (by the linear's name)."""

    fused: list[tuple[str, bool]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many RMSNorm -> linear pairs were fused, how many kept their add, what was skipped."""
        with_add = sum(residual for _, residual in self.fused)
        line = (f"fused {len(self.fused)} RMSNorm -> fullgraph::linear pairs ({with_add} with the residual add before)"
                if self.fused else "no RMSNorm -> fullgraph::linear pairs fused")
        return line + skipped_tail(self.skipped)


@dataclass
class _Norm:
    """A matched RMSNorm: its input, weight, eps, and its nodes from the normed value back."""

    x: torch.fx.Node
    weight: torch.fx.Node
    eps: float
    nodes: list[torch.fx.Node]


def fuse_norm_linear(gm: torch.fx.GraphModule) -> NormFusionReport:
    """Replace each RMSNorm whose only reader is a ``fullgraph::linear`` (and the add that feeds the
    norm, where every other reader of the sum comes after the linear) by one fused op; returns the
    report. Run after ``swap_linear``."""
    report = NormFusionReport()
    graph = gm.graph
    for node, weight, bias, norm in linears_fed_by(graph, _rms_norm, report.skipped):
        residual = _residual_add(norm.x, norm.nodes, node)
        with graph.inserting_before(node):
            if residual is None:
                fused = out = graph.call_function(rms_norm_linear, (norm.x, norm.weight, norm.eps, weight, bias))
            else:
                fused = graph.call_function(add_rms_norm_linear, (*residual, norm.weight, norm.eps, weight, bias))
                out = graph.call_function(operator.getitem, (fused, 0))
                total = graph.call_function(operator.getitem, (fused, 1))
                total.meta.update(norm.x.meta)
        fused.meta.update(node.meta)
        out.meta.update(node.meta)
        if residual is not None:
            fused.meta["example_value"] = (node.meta.get("example_value"), norm.x.meta.get("example_value"))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        for n in norm.nodes:
            graph.erase_node(n)
        if residual is not None:
            norm.x.replace_all_uses_with(total)
            graph.erase_node(norm.x)
        report.fused.append((fused.name, residual is not None))
    graph.lint()
    gm.recompile()
    return report


def _kind(node: object) -> str | None:
    """The op a node computes, by its method name (``mul``, ``to``, ...), for method and function calls."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_method":
        return node.target
    return _FUNCTIONS.get(node.target) if node.op == "call_function" else None


def _dtype_cast(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype ``node`` casts to, if it is a cast (``.float()``, ``.to(dtype)``)."""
    if _kind(node) == "float":
        return torch.float32
    if _kind(node) == "to":
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
        return dtype if isinstance(dtype, torch.dtype) and len(node.args) <= 2 else None
    return None


def _rms_norm(normed: object) -> _Norm | str | None:
    """The RMSNorm computing ``normed``; None if it is none; why not, for one that does not fit."""
    if _kind(normed) != "mul" or len(normed.args) != 2:
        return None
    for weight, cast in permutations(normed.args):
        if not isinstance(weight, torch.fx.Node) or _dtype_cast(cast) is None or _kind(cast.args[0]) != "mul":
            continue
        scaled = cast.args[0]
        for h, rsqrt in permutations(scaled.args):
            norm = _statistics(h, rsqrt)
            if norm is None:
                continue
            x, eps, nodes = norm
            nodes = [normed, cast, scaled, *nodes]
            return _checked(_Norm(x, weight, eps, nodes), _dtype_cast(cast))
    return None


def _statistics(h: object, rsqrt: object) -> tuple[torch.fx.Node, float, list[torch.fx.Node]] | None:
    """``(x, eps, nodes)`` if ``rsqrt`` is ``rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)`` and ``h``
    is ``x`` cast to float32; the nodes in order from ``rsqrt`` back to ``h``."""
    if _kind(rsqrt) != "rsqrt" or _kind(rsqrt.args[0]) != "add" or _dtype_cast(h) is not torch.float32:
        return None
    add = rsqrt.args[0]
    mean, eps = add.args if isinstance(add.args[1], (int, float)) else add.args[::-1]
    if _kind(mean) != "mean" or not isinstance(eps, (int, float)) or add.kwargs:
        return None
    dims = mean.kwargs.get("dim", mean.args[1] if len(mean.args) > 1 else None)
    keepdim = mean.kwargs.get("keepdim", mean.args[2] if len(mean.args) > 2 else False)
    square = mean.args[0]
    if dims not in (-1, [-1], (-1,)) or keepdim is not True or _kind(square) != "pow" or square.args[1:] != (2,):
        return None
    if square.args[0] is not h:
        return None
    return h.args[0], float(eps), [rsqrt, add, mean, square, h]


def _checked(norm: _Norm, cast_back: torch.dtype) -> _Norm | str:
    """``norm`` if the fused op computes what it does, else why not."""
    x = norm.x.meta.get("example_value")
    weight = norm.weight.meta.get("example_value")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return "the graph has no example values for the norm's input or weight"
    if x.dtype not in GEMV_DTYPES:  # as fullgraph::linear keeps cuBLAS there: float32 stays eager's numerics
        return f"{x.dtype}: no GEMV runs, Inductor keeps the norm"
    if cast_back != x.dtype or weight.shape != x.shape[-1:]:
        return f"the norm casts back to {cast_back} (input {x.dtype}) or has a weight of shape {tuple(weight.shape)}"
    if len(norm.nodes[0].users) != 1:
        return f"the normed value has {len(norm.nodes[0].users)} readers (linears left apart by merge_linears: fp32)"
    if {u for n in norm.nodes[1:] for u in n.users} - set(norm.nodes):
        return "a step of the norm has readers besides the norm"
    return norm


def _residual_add(x: torch.fx.Node, norm_nodes: list[torch.fx.Node],
                  linear_node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """The two tensors ``x`` adds, if the fused op can take the add as well: two tensors of x's
    shape and dtype, and every reader of the sum but the norm after the linear (they will read the
    op's copy of it)."""
    if _kind(x) != "add" or len(x.args) != 2 or x.kwargs:
        return None
    total = x.meta.get("example_value")
    parts = [a.meta.get("example_value") if isinstance(a, torch.fx.Node) else None for a in x.args]
    if not all(isinstance(p, torch.Tensor) and p.shape == total.shape and p.dtype == total.dtype for p in parts):
        return None
    # FX nodes compare by their place in the graph, kept as the pass inserts (torch 2.11 and 2.13)
    if any(u < linear_node for u in x.users if u not in norm_nodes):
        return None
    return x.args

"""Swap each ``F.linear`` node for ``fullgraph::linear``, which runs 16-bit products of one row on
a GEMV and of 2 to 16 rows on the few-row kernel.

The backend runs this pass only for graphs it captures in CUDA graphs on a CUDA device: there
the op's choice between our kernels and cuBLAS is made once per captured size. The op computes
what ``F.linear`` does either way (see :mod:`fullgraph_backend.gemv` for when it takes which).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fullgraph_backend.gemv import linear

LINEAR_TARGETS = (F.linear, torch.ops.aten.linear.default)  # F.linear is torch._C._nn.linear
AUTOCAST_ENTER = torch.amp.autocast_mode._enter_autocast


@dataclass
class LinearSwapReport:
    """The swapped nodes, by name, with their weight shapes ``(N, K)`` where the graph knows them,
    or why none was swapped."""

    swapped: list[tuple[str, tuple[int, ...] | None]] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> str:
        """One line: how many linears now dispatch through ``fullgraph::linear``."""
        if self.skipped:
            return f"left every linear on F.linear: {self.skipped}"
        shapes = sorted({str(shape) for _, shape in self.swapped})
        return (f"swapped {len(self.swapped)} linear nodes -> fullgraph::linear (weights {', '.join(shapes)})"
                if self.swapped else "no linear nodes")


def swap_linear(gm: torch.fx.GraphModule) -> LinearSwapReport:
    """Replace every ``F.linear(x, weight, bias)`` node of ``gm`` in place; returns the report.

    Under autocast (inside the graph or around the compiled call) it swaps nothing: the op has no
    autocast rule, so it would neither cast its inputs nor return autocast's dtype.
    """
    report = LinearSwapReport()
    graph = gm.graph
    if torch.is_autocast_enabled("cuda") or any(n.target is AUTOCAST_ENTER for n in graph.nodes):
        report.skipped = "autocast is active, and fullgraph::linear has no autocast rule"
        return report
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS]:
        x, weight, bias = linear_args(node)
        with graph.inserting_before(node):
            new = graph.call_function(linear, (x, weight, bias))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        example = weight.meta.get("example_value") if isinstance(weight, torch.fx.Node) else None
        report.swapped.append((new.name, tuple(example.shape) if example is not None else None))
    graph.lint()
    gm.recompile()
    return report


def linears_fed_by(graph: torch.fx.Graph, match: Callable[[object], object], skipped: list[str]) -> Iterator[tuple]:
    """``(linear node, weight, bias, what match returned)`` for each ``fullgraph::linear`` of ``graph``
    whose input ``match`` recognises: it returns a match, None for an input that is not its pattern,
    or a string saying why one that is cannot be fused (appended to ``skipped``, named by the linear).
    Lazy, over the linears the graph had at the start: a pass may rewrite the graph between items."""
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is linear]:
        x, weight, bias = linear_args(node)
        found = match(x)
        if isinstance(found, str):
            skipped.append(f"{node.name}: {found}")
        elif found is not None:
            yield node, weight, bias, found


@dataclass
class FusionReport:
    """A fusion pass's report: the fused ops by node name, and why each other candidate was left
    alone; a subclass names what one fused op stands for (``PAIRS``)."""

    fused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    PAIRS = "pairs"

    def summary(self) -> str:
        """One line: how many were fused, what was skipped and why."""
        line = f"fused {len(self.fused)} {self.PAIRS}" if self.fused else f"no {self.PAIRS} fused"
        return line + skipped_tail(self.skipped)


def skipped_tail(skipped: list[str]) -> str:
    """The end of a prologue fusion's one-line summary: ``"; skipped N: <each distinct reason>"``, or
    nothing when none was skipped."""
    return f"; skipped {len(skipped)}: {'; '.join(sorted(set(skipped)))}" if skipped else ""


def linear_args(node: torch.fx.Node) -> tuple:
    """A linear node's ``(input, weight, bias)``, passed by position or keyword (bias None if absent)."""
    names = ("input", "weight", "bias")
    values = list(node.args) + [node.kwargs.get(name) for name in names[len(node.args):]]
    return tuple(values) + (None,) * (3 - len(values))

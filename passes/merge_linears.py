"""Merge linears that read one input, where their weights are row blocks of one tensor, into one.

transformers' modeling code projects q, k and v (and gate and up) with one linear each, on the
same input. ``fullgraph_backend/models/packing.py`` lays each such group's weights (and biases) out
as consecutive row blocks of one tensor. This pass runs such a group as one ``F.linear`` over a
view spanning the blocks and splits its output: at batch 1 on a GPU, one GEMV instead of three
(``swap_linear``, which runs later, turns the merged linear into one ``fullgraph::linear``).

The view is ``as_strided(first_weight, (rows, K), (K, 1), 0)``, so the first block must start its
tensor's storage: an explicit offset of 0 means the same in eager, in Inductor 2.13 (which takes
the offset from the storage's start) and in 2.11 (from the input's own start), and Inductor
compiles it to a ``reinterpret_tensor`` of the weight: no copy. Dynamo (2.11 and 2.13) passes
parameters as placeholders with the real tensors among the example inputs; that is where the
pass reads the layout.

Only 16-bit linears merge: float32 ones stay as traced, so float32 greedy tokens keep matching
eager's exactly (a wider product may run another kernel, which sums in another order).
"""
from __future__ import annotations

import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor

from passes.swap_linear import LINEAR_TARGETS, linear_args

MERGED_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class LinearMerge:
    """One merged group: the linear nodes it replaced, in row order, and the merged weight's shape."""

    nodes: list[str]
    shape: tuple[int, int]


@dataclass
class LinearMergeReport:
    """The merged groups, and the linears that read one input but were left apart, with why."""

    merged: list[LinearMerge] = field(default_factory=list)
    left: list[tuple[list[str], str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the merges by size and weight shape, and the groups left apart."""
        counts = Counter((len(m.nodes), m.shape) for m in self.merged)
        lines = [f"merged {n} groups of {k} linears -> weight {list(shape)}" for (k, shape), n in counts.items()]
        lines += [f"left {', '.join(nodes)} apart: {why}" for nodes, why in self.left]
        return "\n".join(lines) or "no linears that read one input"


class _Linear(NamedTuple):
    node: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


def merge_linears(gm: torch.fx.GraphModule, example_inputs: list) -> LinearMergeReport:
    """Merge, in place, every run of linears in ``gm`` that read one input and whose weights (and
    biases) are consecutive row blocks of one 16-bit tensor, the first at its start; returns the
    report. ``example_inputs`` are the real tensors of ``gm``'s placeholders, in order."""
    report = LinearMergeReport()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = {n: x for n, x in zip(placeholders, example_inputs) if isinstance(x, torch.Tensor)}
    by_input: dict[torch.fx.Node, list[_Linear]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            x, weight, bias = linear_args(node)
            if weight in tensors and (bias is None or bias in tensors):
                by_input[x].append(_Linear(node, tensors[weight], tensors.get(bias)))
    for x, linears in by_input.items():
        if len(linears) < 2:
            continue
        names = [lin.node.name for lin in linears]
        if linears[0].weight.dtype not in MERGED_DTYPES:
            report.left.append((names, f"{linears[0].weight.dtype} linears stay as traced"))
            continue
        runs = _runs(linears)
        merged = {lin.node.name for run in runs for lin in run}
        for run in runs:
            report.merged.append(LinearMerge([lin.node.name for lin in run],
                                             (sum(lin.weight.shape[0] for lin in run), run[0].weight.shape[1])))
            _merge(gm.graph, x, run)
        apart = [name for name in names if name not in merged]
        if len(apart) > 1:
            report.left.append((apart, "their weights or biases are not row blocks of one tensor"))
    gm.graph.lint()
    gm.recompile()
    return report


def _runs(linears: list[_Linear]) -> list[list[_Linear]]:
    """The runs of two or more linears whose weights, in storage order, are one block, and whose
    biases are one block too (or all absent)."""
    ordered = sorted(linears, key=lambda lin: (lin.weight.untyped_storage().data_ptr(), lin.weight.storage_offset()))
    runs, run = [], []
    for lin in ordered:
        if run and _one_block([r.weight for r in run + [lin]]):
            run.append(lin)
        else:
            runs.append(run)
            run = [lin]
    runs.append(run)
    return [run for run in runs if len(run) > 1 and _one_block([r.weight for r in run]) and _biases_fit(run)]


def _biases_fit(run: list[_Linear]) -> bool:
    biases = [lin.bias for lin in run]
    return all(b is None for b in biases) or (all(b is not None for b in biases) and _one_block(biases))


def _one_block(parts: list[torch.Tensor]) -> bool:
    """Whether ``parts`` follow each other in one storage from its start, contiguous, with one
    dtype and one row shape: then one view of the first spans them all."""
    first, offset = parts[0], 0
    for part in parts:
        if (part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or part.dtype != first.dtype
                or part.shape[1:] != first.shape[1:] or not part.is_contiguous() or part.storage_offset() != offset):
            return False
        offset += part.numel()
    return True


def _merge(graph: torch.fx.Graph, x: torch.fx.Node, run: list[_Linear]) -> None:
    """``linear(x, w_i, b_i)`` for each of ``run`` -> one linear over the spanning view, split by rows."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    first = min((lin.node for lin in run), key=order.__getitem__)
    rows = [lin.weight.shape[0] for lin in run]
    in_features = run[0].weight.shape[1]
    _, weight, bias = linear_args(run[0].node)
    with graph.inserting_before(first):
        weight = _add(graph, torch.as_strided, weight, (sum(rows), in_features), (in_features, 1), 0)
        if bias is not None:
            bias = _add(graph, torch.as_strided, bias, (sum(rows),), (1,), 0)
        merged = _add(graph, F.linear, x, weight, bias)
        merged.meta.update({k: v for k, v in first.meta.items() if k != "example_value"})  # provenance
        parts = _add(graph, torch.split, merged, rows, -1)
        for i, lin in enumerate(run):
            lin.node.replace_all_uses_with(_add(graph, operator.getitem, parts, i))
    for lin in run:
        graph.erase_node(lin.node)


def _add(graph: torch.fx.Graph, target, *args) -> torch.fx.Node:
    """A new node, with the example value Dynamo would have given it where its inputs have theirs
    (fake tensors of Dynamo's own fake mode, not the backend's: the symbolic token count included):
    later analyses read them."""
    node = graph.call_function(target, args)
    inputs = [a.meta.get("example_value") for a in node.all_input_nodes]
    fake_modes = {id(v.fake_mode): v.fake_mode for v in pytree.tree_leaves(inputs) if isinstance(v, FakeTensor)}
    if len(fake_modes) == 1 and all(v is not None for v in inputs):
        # as Dynamo traces: composite ops (linear -> matmul) on symbolic sizes need the Python
        # dispatcher in 2.11 ("Cannot call numel() on tensor with symbolic sizes/strides")
        with next(iter(fake_modes.values())), enable_python_dispatcher():
            node.meta["example_value"] = target(*torch.fx.node.map_arg(args, lambda a: a.meta["example_value"]))
    return node

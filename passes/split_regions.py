"""Cut a graph into its repeated regions (a decoder's layers), so each distinct one compiles once.

Inductor's compile time grows with the graph, and a decoder's graph is one layer N times. This pass
finds the repetition from the ops alone (no module names): it cuts the node list after every
fusion barrier (an op Inductor runs as an extern kernel: a matmul, a linear, an opaque custom op
such as the attention implementations or ``fullgraph::linear``), gives each segment between two
cuts a signature (its ops in order), and looks for the longest run of one period of segments
repeated. The regions are then a prologue (the nodes before the run), one region per period of the
run, and an epilogue (the rest). Of the phases that give the same run, the latest is taken: the
epilogue then holds only what follows the last repeated period. In the engine's decoder graph a
region is "the previous layer's residual add, this layer's norm ... down projection" (where the
final norm and head match a layer's first segment, the run takes them in as its last period,
which then compiles apart).

The signature leaves out constants and how nodes are wired, so layers that differ only in a
constant (alternating sliding windows) still fall into one period each; the compiler compares
regions strictly (:func:`fullgraph_backend.regions.region_key`) and compiles each distinct one.

A region's outputs are buffers, so whatever crosses a cut is written to memory. Values the whole
graph keeps in memory anyway cost nothing: a barrier's output, and a pointwise result Inductor
realizes (one read by several ops that reads more than a few buffers). The others are recomputed
in each region that reads them, from the buffers they read, as Inductor recomputes them in each
kernel of the whole graph. The one that matters is the residual stream: Inductor keeps it every
second layer of a Llama-style decoder, and a region passing it on would keep it every layer (half
a kernel more per layer). :class:`InlineLimits` carries Inductor's thresholds for that rule. Where
the rule guesses wrong, a region writes one buffer more or fewer than the whole graph, never a
wrong value (what is recomputed is a pure function of what it reads). Gathers (RoPE's cos / sin
from its table) are passed on: torch 2.11 writes them once in the whole graph too, 2.13 computes
them in each layer's kernels, so under 2.13 the prologue writes them (one kernel a step more, the
layers' kernels unchanged).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fullgraph_backend import compat
from fullgraph_backend.request_ends import ENDS_OF
from passes.split_attention import split_by
from passes.swap_linear import LINEAR_TARGETS

BARRIER_FUNCTIONS = (*LINEAR_TARGETS, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
                     operator.matmul, F.scaled_dot_product_attention)
BARRIER_METHODS = ("matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__")
FUSABLE_NAMESPACES = ("aten", "prims")
# what Inductor computes inside its consumers' kernels unless it realizes it: arithmetic, casts, views,
# an embedding, and the request ends (the swap pass's ``fullgraph::ends_of``, whose row count is a size of the
# forward context's buffer that no node binds: split_module cannot pass it across a cut); pure, so
# recomputing it changes nothing
INLINED_FUNCTIONS = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.getitem,
                     torch.add, torch.sub, torch.mul, torch.neg, F.embedding, ENDS_OF)
INLINED_METHODS = ("add", "sub", "mul", "neg", "float", "half", "bfloat16", "to", "view", "reshape", "unsqueeze",
                   "squeeze", "flatten", "unflatten", "chunk", "split", "transpose", "permute", "expand")


@dataclass(frozen=True)
class InlineLimits:
    """When Inductor realizes a pointwise result instead of computing it inside each consumer: it
    is read by more than one op and reads more than ``shared_reads`` buffers, or it reads more
    than ``reads`` (``torch._inductor.config``'s realize thresholds, ``compat.realize_thresholds``)."""

    shared_reads: int
    reads: int


@dataclass
class RegionSplit:
    """The graph cut into regions (``split``'s submodules, in order), or why it was not."""

    split: torch.fx.GraphModule | None = None
    regions: list[str] = field(default_factory=list)
    repeats: int = 0  # regions in the repeated run
    barriers_per_region: int = 0
    recomputed: int = 0  # nodes recomputed in a later region rather than written by an earlier one
    why_not: str | None = None


def is_fusion_barrier(node: torch.fx.Node) -> bool:
    """Whether Inductor runs ``node`` as an extern kernel, so nothing fuses across it: matmuls and
    linears (cuBLAS), and ops outside aten and prims that do not decompose (custom ops, which
    Inductor calls as they are)."""
    if node.op == "call_method":
        return node.target in BARRIER_METHODS
    if node.op != "call_function":
        return False
    if node.target in BARRIER_FUNCTIONS:
        return True
    op = node.target
    if isinstance(op, torch._ops.OpOverload) and op.namespace not in FUSABLE_NAMESPACES:
        return not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
    return False


def split_at_repeats(gm: torch.fx.GraphModule, min_repeats: int, limits: InlineLimits) -> RegionSplit:
    """Cut a copy of ``gm`` into prologue, the regions of its longest repeated run, and epilogue
    (``gm`` is left as it is).

    Returns a :class:`RegionSplit` without ``split`` (and with ``why_not``) when no period of
    segments repeats ``min_repeats`` times.
    """
    gm = compat.copy_dynamo_graph(gm)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    cuts = [0, *(_barrier_end(nodes, i) for i, n in enumerate(nodes) if is_fusion_barrier(n))]
    if cuts[-1] != len(nodes):
        cuts.append(len(nodes))
    if len(cuts) - 1 < min_repeats:
        return RegionSplit(why_not=f"too few fusion barriers (matmuls, linears, custom ops) to repeat "
                                   f"{min_repeats} times: {len(cuts) - 2}")
    interned: dict[tuple, int] = {}
    signatures = [interned.setdefault(tuple((n.op, n.target) for n in nodes[a:b]), len(interned))
                  for a, b in zip(cuts, cuts[1:])]
    run = _longest_run(signatures, min_repeats)
    if run is None:
        return RegionSplit(why_not=f"no sequence of ops between fusion barriers repeats {min_repeats} times")
    start, period, repeats = run
    region_of = {n: _region(segment, start, period, repeats)
                 for segment, (a, b) in enumerate(zip(cuts, cuts[1:])) for n in nodes[a:b]}
    recomputed = _recompute_in_readers(gm.graph, region_of, _kept_in_memory(gm.graph, limits))
    split = split_by(gm, lambda n: region_of[n])
    names = [n.target for n in split.graph.find_nodes(op="call_module")]
    return RegionSplit(split, names, repeats, period, recomputed)


def _barrier_end(nodes: list[torch.fx.Node], i: int) -> int:
    """Where the segment ending in barrier ``nodes[i]`` ends: after the barrier and the items of its
    outputs taken right after it (``fullgraph::add_rms_norm_linear`` returns two), so that a cut
    passes the items, tensors, and not the tuple."""
    end = i + 1
    while end < len(nodes) and _is_item_of_barrier(nodes[end]) and nodes[end].args[0] is nodes[i]:
        end += 1
    return end


def _is_item_of_barrier(node: torch.fx.Node) -> bool:
    """One output of an op with several, taken from an extern kernel's outputs: a buffer of its own."""
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
            and is_fusion_barrier(node.args[0]))


def _region(segment: int, start: int, period: int, repeats: int) -> int:
    """The region of a segment: 0 the prologue, 1..repeats the run's periods, then the epilogue."""
    if segment < start:
        return 0
    return min((segment - start) // period + 1, repeats + 1)


def _longest_run(signatures: list[int], min_repeats: int) -> tuple[int, int, int] | None:
    """``(start, period, repeats)`` of the run covering the most segments with ``repeats >=
    min_repeats`` copies of ``signatures[start:start + period]`` back to back; the shorter period
    on a tie, and the latest start that still fits as many copies (see the module doc)."""
    best = None
    for period in range(1, len(signatures) // min_repeats + 1):
        t = 0  # where the stretch in hand starts
        for same, stretch in itertools.groupby(a == b for a, b in zip(signatures, signatures[period:])):
            length = sum(1 for _ in stretch)  # signatures[t:t + length + period] has period ``period``
            repeats = length // period + 1
            if same and repeats >= min_repeats and (best is None or repeats * period > best[1] * best[2]):
                best = (t + length % period, period, repeats)
            t += length
    return best


def _inlined(node: torch.fx.Node) -> bool:
    """Whether Inductor may compute ``node`` inside the kernels of its consumers (see the module doc);
    ``to`` only as a cast (a move to another device is a copy); indexing by a tensor (a gather) not,
    as torch 2.11 realizes RoPE's cos / sin gathered from its table (once, in the whole graph)."""
    if _is_item_of_barrier(node):
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        index: list[torch.fx.Node] = []
        torch.fx.node.map_arg(node.args[1], index.append)
        return all(_is_symbolic(n) for n in index)
    if node.op == "call_function":
        return node.target in INLINED_FUNCTIONS
    if node.op != "call_method" or node.target not in INLINED_METHODS:
        return False
    return node.target != "to" or all(isinstance(a, (torch.fx.Node, torch.dtype)) for a in node.args)


def _kept_in_memory(graph: torch.fx.Graph, limits: InlineLimits) -> dict[torch.fx.Node, bool]:
    """Per node, whether the whole graph's compiled code writes it to memory (see the module doc):
    inputs, extern kernels' outputs and anything not :func:`_inlined`; an inlined tensor when an
    extern kernel reads it, or when the buffers it reads (through the inlined nodes it reads)
    pass :class:`InlineLimits`. Never an inlined tuple (a chunk's views): its items are what is read."""
    kept: dict[torch.fx.Node, bool] = {}
    reads: dict[torch.fx.Node, frozenset] = {}
    for node in graph.nodes:
        if not _inlined(node):
            kept[node], reads[node] = True, frozenset([node])
            continue
        read = frozenset().union(*(reads[a] for a in node.all_input_nodes if not _is_symbolic(a)))
        kept[node] = isinstance(node.meta.get("example_value"), torch.Tensor) and (
            (len(node.users) > 1 and len(read) > limits.shared_reads) or len(read) > limits.reads
            or any(is_fusion_barrier(u) for u in node.users))
        reads[node] = frozenset([node]) if kept[node] else read
    return kept


def _is_symbolic(node: torch.fx.Node) -> bool:
    """A size or a condition on sizes: no buffer is read for it."""
    return isinstance(node.meta.get("example_value"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _recompute_in_readers(graph: torch.fx.Graph, region_of: dict[torch.fx.Node, int],
                          kept: dict[torch.fx.Node, bool]) -> int:
    """Give each region its own copy of every value it reads from an earlier region that the whole
    graph does not keep in memory (and of such values that value reads), so only kept values cross
    a cut. Originals left unread are erased. Returns how many nodes were copied."""
    copies: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}

    def copy_into(value: torch.fx.Node, region: int, reader: torch.fx.Node) -> torch.fx.Node:
        if (value, region) not in copies:
            args = {a: a if kept[a] else copy_into(a, region, reader) for a in value.all_input_nodes}
            with graph.inserting_before(reader):
                copy = graph.node_copy(value, lambda a: args[a])
            region_of[copy], kept[copy] = region, False
            copies[value, region] = copy
        return copies[value, region]

    for node in list(graph.nodes):
        region = region_of.get(node)
        for value in node.all_input_nodes:
            if region is not None and region_of.get(value, region) < region and not kept[value]:
                node.replace_input_with(value, copy_into(value, region, node))
    position = {n: i for i, n in enumerate(graph.nodes)}
    for value in sorted({v for v, _ in copies}, key=position.__getitem__, reverse=True):
        if not value.users:
            graph.erase_node(value)
    return len(copies)

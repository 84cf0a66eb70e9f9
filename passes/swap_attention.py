"""Swap each attention node for the chosen implementation op over the static buffers.

Before: ``fullgraph.attention(q, k, v, layer_idx, scale, window)``, which finds its cache and
metadata through the active forward context at run time. After: ``impl(q, k, v, kv_cache_L,
query_start_loc, seq_lens, block_table, slot_mapping, scale, window)``, where the cache and
metadata are new graph inputs (placeholders ``fg_*``, appended by the graph runner at every
call), so the FX graph and the dump show exactly what every attention reads, and Inductor sees
the cache mutation as an in-place update of a graph input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._dispatch.python import enable_python_dispatcher

from fullgraph_backend import compat
from fullgraph_backend.attention.op import attention_node
from fullgraph_backend.attention.registry import AttentionImpl
from fullgraph_backend.forward_context import SIZED_BY_LIMITS, ForwardContext
from fullgraph_backend.request_ends import ENDS_OF, ends_of, request_ends_node

ATTENTION_TARGET = attention_node._opoverload
REQUEST_ENDS_TARGET = request_ends_node._opoverload
SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


@dataclass
class AttentionSwap:
    """One swapped node: where it was, which layer, the impl chosen and the buffers it reads."""

    node: str
    layer_idx: int
    impl: str
    reads: list[str]


@dataclass
class SwapReport:
    """What the swap did: swapped nodes, and attention-like nodes left alone with the reason."""

    swapped: list[AttentionSwap] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)  # (node, why)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # new placeholders, in graph order

    def summary(self) -> str:
        """One line per node, for logs and dumps."""
        lines = [f"swapped {s.node} (layer {s.layer_idx}) -> {s.impl} reading {', '.join(s.reads)}"
                 for s in self.swapped]
        lines += [f"left {node}: {why}" for node, why in self.left_alone]
        return "\n".join(lines) or "no attention nodes"


METADATA_ATTRS = ("query_start_loc", "seq_lens", "block_table", "slot_mapping")


def swap_attention(gm: torch.fx.GraphModule, ctx: ForwardContext | None, impl: AttentionImpl) -> SwapReport:
    """Replace every ``fullgraph.attention`` node of ``gm`` in place; returns the report.

    Raises when the graph has attention nodes but there is no forward context to take the
    buffers from.
    """
    report = SwapReport()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SDPA_TARGETS:
            report.left_alone.append((node.name, "plain SDPA over dense per-sample tensors: no paged cache, "
                                                 "so Inductor compiles it as is (safe to capture)"))
            continue
        if node.target is REQUEST_ENDS_TARGET:
            _swap_request_ends(graph, report, node, ctx)
            continue
        if node.target is not ATTENTION_TARGET:
            continue
        if ctx is None:
            raise RuntimeError("the model calls fullgraph_backend.attention but no ForwardContext is active at "
                               "compile time: call the compiled model inside `with use_forward_context(ctx):`")
        q, k, v, layer_idx, scale, window = _attention_args(node)
        if not 0 <= layer_idx < len(ctx.kv_caches):
            raise IndexError(f"attention node {node.name} uses layer_idx {layer_idx}, but the forward context "
                             f"has {len(ctx.kv_caches)} layers")
        reads = {"kv_cache": _input(graph, report, f"fg_kv_cache_{layer_idx}", ctx.kv_caches[layer_idx],
                                    SIZED_BY_LIMITS["kv_cache"])}
        for attr in METADATA_ATTRS:
            reads[attr] = _input(graph, report, f"fg_{attr}", getattr(ctx.metadata, attr), SIZED_BY_LIMITS[attr])
        with graph.inserting_before(node):
            new = graph.call_function(impl.op, (q, k, v, *reads.values(), scale, window))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        report.swapped.append(AttentionSwap(new.name, layer_idx, impl.name, [r.name for r in reads.values()]))
    graph.lint()
    gm.recompile()
    return report


def _swap_request_ends(graph: torch.fx.Graph, report: SwapReport, node: torch.fx.Node,
                       ctx: ForwardContext | None) -> None:
    """``request_ends(x)`` -> :func:`ends_of` over ``fg_query_start_loc`` (as ``fullgraph::ends_of``,
    which decomposes into plain ops Inductor fuses).

    Dynamo traced the node with ``min(N, max_num_seqs)`` rows, the limit a constant; the swapped
    node's rows are ``Min(N, lanes)``, lanes read off the buffer (an unbacked size), and so are those
    of every node it feeds, the graph's outputs included (:class:`~fullgraph_backend.padding.BatchSignature`
    reads them there)."""
    if ctx is None:
        raise RuntimeError("the model calls fullgraph_backend.request_ends but no ForwardContext is active at "
                           "compile time: call the compiled model inside `with use_forward_context(ctx):`")
    qsl = _input(graph, report, "fg_query_start_loc", ctx.metadata.query_start_loc,
                 SIZED_BY_LIMITS["query_start_loc"])
    (x,) = node.args
    with graph.inserting_before(node):
        new = graph.call_function(ENDS_OF, (x, qsl))
    fake = x.meta.get("example_value")
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    mode = getattr(fake, "fake_mode", None)
    if mode is not None:  # as Dynamo traced: its fake mode (the buffer's fake is the backend's; one shape
        # env) and the Python dispatcher (2.11's C++ matmul cannot take the symbolic sizes without it)
        with mode, enable_python_dispatcher():
            new.meta["example_value"] = ends_of(fake, mode.from_tensor(qsl.meta["example_value"]))
            _refresh_fakes(graph, new)


def _refresh_fakes(graph: torch.fx.Graph, changed: torch.fx.Node) -> None:
    """Recompute the fake value of every node that ``changed`` feeds, in graph order. A node it
    cannot run (a module call, an input without a fake) keeps Dynamo's value, and so do the nodes
    it feeds: the graph's outputs then show the constant bound, and the graph is not padded (logged)."""
    fed = {changed}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or not fed.intersection(node.all_input_nodes):
            continue
        if any("example_value" not in n.meta for n in node.all_input_nodes):
            continue
        node.meta["example_value"] = fake_value(node)
        fed.add(node)


def fake_value(node: torch.fx.Node) -> object:
    """What ``node`` (a function or method call) computes on its inputs' traced values; called inside
    their fake mode."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["example_value"])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _attention_args(node: torch.fx.Node) -> tuple:
    schema_args = ("q", "k", "v", "layer_idx", "scale", "sliding_window")
    values = list(node.args) + [node.kwargs[name] for name in schema_args[len(node.args):]]
    return tuple(values)


def _fake(fake_mode, name: str, tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The fake a buffer is traced with: ``dims`` (sized by the engine's limits) symbolic where
    there is a shape env, so the compiled code serves any limits; else every dim static."""
    if fake_mode.shape_env is None:
        return fake_mode.from_tensor(tensor, static_shapes=True)
    return compat.fake_with_unbacked_dims(fake_mode, tensor, name, dims)


def _input(graph: torch.fx.Graph, report: SwapReport, name: str, tensor: torch.Tensor,
           sized_dims: tuple[int, ...]) -> torch.fx.Node:
    """The placeholder that feeds ``tensor`` into the graph, added after the last one once;
    ``sized_dims`` are symbolic in its fake (see ``SIZED_BY_LIMITS``)."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    for node in placeholders:
        if node.name == name:
            if report.inputs[name] is not tensor:
                raise RuntimeError(f"graph input {name} already holds another tensor: two forward contexts in one graph")
            return node
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(name)
    fake_mode = torch._guards.detect_fake_mode()
    node.meta["example_value"] = _fake(fake_mode, name, tensor, sized_dims) if fake_mode else tensor
    node.meta["fullgraph_input"] = name
    # what AOTAutograd expects of placeholders of a Dynamo graph: a source (none here) and,
    # for a fixed-address input, the static marker
    node._dynamo_source = None
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    report.inputs[name] = tensor
    return node

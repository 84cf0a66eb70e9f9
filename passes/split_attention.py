"""Cut the graph at every attention node (piecewise mode only: the baseline to beat).

Each attention node becomes a submodule of its own, run eagerly between the compiled and
captured pieces around it, as engines did before full graphs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx.passes.split_module import split_module


def split_at_attention(gm: torch.fx.GraphModule, is_attention: Callable[[torch.fx.Node], bool]
                       ) -> tuple[torch.fx.GraphModule, list[str]]:
    """Split ``gm`` so each attention node sits alone in a submodule.

    Returns the split module, whose ``submod_<i>`` run in order, and the names of the attention
    submodules. ``get_attr`` buffers go with the nodes that read them.
    """
    partition_of: dict[torch.fx.Node, int] = {}
    part = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_attention(node):
            part += 1
            partition_of[node] = part
            part += 1
        else:
            partition_of[node] = part
    attention_parts = {partition_of[n] for n in partition_of if is_attention(n)}
    # buffers read only by attention travel with it
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users and all(is_attention(u) for u in node.users):
            partition_of[node] = partition_of[next(iter(node.users))]
    split = split_by(gm, lambda n: partition_of[n])
    return split, [f"submod_{p}" for p in sorted(attention_parts)]


def split_by(gm: torch.fx.GraphModule, partition: Callable[[torch.fx.Node], int]) -> torch.fx.GraphModule:
    """``split_module`` in the graph's order (parts ``submod_<partition>``), with the forward
    context's buffers (placeholders the attention swap added) entering it without their fakes:
    ``split_module`` looks up, for every symbol in the shape of a part's input, the node that binds
    it, and nothing binds the buffers' sizes (the attention ops read them off the buffers). The
    parts get their fakes from the interpreter that compiles them
    (:func:`fullgraph_backend.regions.run_on_fakes`)."""
    hidden = {n.name: n.meta.pop("example_value") for n in gm.graph.find_nodes(op="placeholder")
              if n.meta.get("fullgraph_input") and "example_value" in n.meta}
    try:
        split = split_module(gm, None, partition, keep_original_order=True)
    finally:
        for node in gm.graph.find_nodes(op="placeholder"):
            if node.name in hidden:
                node.meta["example_value"] = hidden[node.name]
    for node in split.graph.find_nodes(op="placeholder"):
        if node.name in hidden:
            node.meta["example_value"] = hidden[node.name]
    return split

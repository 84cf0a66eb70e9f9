"""The ``fullgraph`` op namespace, and how an op joins it.

Ops are defined through ``torch.library.Library`` rather than ``torch.library.custom_op``: a
custom op wraps every call in Python-level checks, which cost about ten times the dispatch of a
``Library`` op (docs/perf-notes.md, section 8). That matters wherever an op runs outside a CUDA
graph: attention between the graph pieces of -O2/-O3, one call per layer and step, and every op
of a batch larger than the largest capture size.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

_LIB = torch.library.Library("fullgraph", "FRAGMENT")


def define_op(schema: str, fn: Callable, fake: Callable, *, flexible_layout: bool = False) -> torch._ops.OpOverload:
    """Define ``fullgraph::<name>`` with ``schema``, run by ``fn`` on every device and by ``fake``
    under fake tensors (tracing); returns the op's default overload, which is what FX graphs hold.

    Mutated arguments are marked in the schema (``Tensor(a!)``); Dynamo functionalizes such ops
    from the schema alone.

    By default Inductor hands the op each tensor in the strides it had when traced, copying one it
    computed in another layout (``needs_exact_strides``, torch's default for custom ops).
    ``flexible_layout=True`` (``torch.Tag.flexible_layout``) lets it pass the tensor as computed:
    only for an ``fn`` that reads every input through its strides and whose output layout does
    not depend on its inputs' (the fake's layout is what compiled code assumes).
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema, tags=(torch.Tag.flexible_layout,) if flexible_layout else ())
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fullgraph::{name}", fake, lib=_LIB)
    return getattr(torch.ops.fullgraph, name).default


def define_decomposed(schema: str, fn: Callable) -> torch._ops.OpOverload:
    """Define ``fullgraph::<name>`` with ``schema`` as ``fn``, a composite of torch ops, on every
    device (``CompositeImplicitAutograd``); returns the op's default overload.

    Tracing (fakes, AOTAutograd) records ``fn``'s ops in the node's place, so Inductor fuses them as
    it would ``fn`` inlined; a pass puts the op in a graph where it would put ``fn`` because
    AOTAutograd's cache takes an op node but not a Python function's (it passes such a graph by, and
    every process traces it again). ``fn`` must not mutate its inputs nor return one of them.
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, fn, "CompositeImplicitAutograd")
    return getattr(torch.ops.fullgraph, name).default


# torch's own ops, whose schemas come with the torch build (which the caches' key names already)
TORCH_NAMESPACES = ("aten", "prims")


def op_schemas_tag(gm: torch.fx.GraphModule) -> str:
    """A digest of the schemas of the custom ops ``gm`` calls (ours and any other library's), or ""
    when it calls none. Inductor's compile caches key a graph by its code, which names an op but
    not its schema, and its compiled code passes every argument by position: compiled by a version
    of this package whose op took other arguments, a cached entry would call the op wrongly (it
    raises). The backend puts this digest in the caches' key (:func:`fullgraph_backend.compat.compile_fx`)."""
    schemas = sorted({str(node.target._schema) for node in gm.graph.nodes
                      if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                      and node.target.namespace not in TORCH_NAMESPACES})
    return "custom-ops:" + hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16] if schemas else ""

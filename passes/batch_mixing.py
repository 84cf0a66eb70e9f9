"""Find ops that mix rows across the batch dimension, where padding would change the result.

Padding a batch to a capture size is only safe when every real row is computed from real rows
alone. This analysis walks the Dynamo graph with the fake tensors Dynamo recorded and flags
reductions, contractions, normalisations and reorderings over a dimension whose size depends
on the batch symbol, and arithmetic that reads the batch size as a value. It is conservative
about the ops it knows and silent about ones it does not, so it is a guard, not a proof.
"""
from __future__ import annotations

import operator

import sympy
import torch
import torch.nn.functional as F

# op name -> position of its ``dim`` argument (None: reduces every dim when dim is absent)
_DIM_ARG = {
    "sum": 1, "mean": 1, "amax": 1, "amin": 1, "max": 1, "min": 1, "prod": 1, "std": 1, "var": 1,
    "norm": 2, "logsumexp": 1, "softmax": 1, "log_softmax": 1, "cumsum": 1, "cumprod": 1, "argmax": 1,
    "argmin": 1, "any": 1, "all": 1, "sort": 1, "argsort": 1, "median": 1, "nansum": 1, "nanmean": 1,
    "var_mean": 1, "std_mean": 1, "count_nonzero": 1, "flip": 1, "cummax": 1, "cummin": 1, "topk": 2,
    "roll": 2, "logcumsumexp": 1, "normalize": 2, "vector_norm": 2, "quantile": 2, "nanquantile": 2,
}
_ALWAYS_GLOBAL = {"unique", "unique_consecutive", "nonzero", "histc", "bincount"}
_MATMULS = {"matmul", "mm", "bmm", "baddbmm", "addmm"}
_ARITH = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
          torch.add, torch.sub, torch.mul, torch.div}


def find_batch_mixing(gm: torch.fx.GraphModule, batch_symbol: sympy.Symbol) -> list[str]:
    """Reasons (one per offending node or input) why padding the batch dim would change results:
    ops that mix rows, writes whose target rows are picked by batch data, and writes of
    batch-dependent values into inputs without a batch dim (padded rows would leak into them)."""
    reasons = []
    tainted = _batch_dependent(gm, batch_symbol)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        why = _mixes(node, batch_symbol) or _indexed_write(node, batch_symbol, tainted)
        if why:
            reasons.append(f"{node.name} ({node_name(node)}): {why}")
    return reasons + _state_writes(gm, batch_symbol, tainted)


def node_name(node: torch.fx.Node) -> str:
    """How a node is named in reports: its method or function name."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _fake(arg):
    return arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else arg


def _depends(size, symbol) -> bool:
    return isinstance(size, torch.SymInt) and symbol in size.node.expr.free_symbols


def _batch_dims(t, symbol) -> set[int]:
    return {i for i, s in enumerate(t.shape) if _depends(s, symbol)} if isinstance(t, torch.Tensor) else set()


def _arg(node, pos, name, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _mixes(node: torch.fx.Node, symbol) -> str | None:
    name = node_name(node)
    x = _fake(node.args[0]) if node.args else None
    bdims = _batch_dims(x, symbol)
    out = node.meta.get("example_value")
    tensors_in = [_fake(a) for a in node.all_input_nodes]
    if (isinstance(out, torch.Tensor) and not _batch_dims(out, symbol)
            and any(_batch_dims(t, symbol) for t in tensors_in)):
        return "its output has no batch dim though an input has one (a reduction, gather or indexing across rows)"
    if name == "einsum":
        return _einsum_mixes(node, symbol)
    if name in _ALWAYS_GLOBAL and bdims:
        return "its result depends on every row"
    if name in _DIM_ARG and bdims:
        dims = _arg(node, _DIM_ARG[name], "dims" if name in ("flip", "roll") else "dim")
        if isinstance(dims, torch.fx.Node):  # max(a, b), min(a, b): elementwise
            return None
        if dims is None:
            return "reduces over all dims, the batch dim included"
        dims = {d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)}
        if dims & bdims:
            return f"reduces or reorders along batch dim(s) {sorted(dims & bdims)}"
    if name in _MATMULS or node.target is operator.matmul:
        a, b = _fake(node.args[-2]), _fake(node.args[-1])
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            contracted = [a.shape[-1], b.shape[-2] if b.dim() > 1 else b.shape[0]]
            if any(_depends(s, symbol) for s in contracted):
                return "contracts over the batch dim"
    if node.target is F.scaled_dot_product_attention:
        k = _fake(_arg(node, 1, "key"))
        if k is not None and _depends(k.shape[-2], symbol):
            return "attends across the batch dim (it is the key sequence dim)"
    if node.target is F.layer_norm:
        normalized = _fake(_arg(node, 1, "normalized_shape"))
        if any(d in bdims for d in range(x.dim() - len(normalized), x.dim())):
            return "normalises over the batch dim"
    if node.target is F.group_norm and bdims - {0}:
        return "normalises over the batch dim"
    if node.target is F.instance_norm and bdims - {0, 1}:
        return "normalises over the batch dim"
    if node.target is F.batch_norm:
        if _arg(node, 5, "training", False) and bdims - {1}:
            return "normalises with batch statistics"
    if name == "tensordot":
        dims = _arg(node, 2, "dims", 2)
        a = _fake(node.args[0])
        contracted = range(a.dim() - dims, a.dim()) if isinstance(dims, int) else dims[0]
        if set(contracted) & bdims:
            return "contracts over the batch dim"
    if node.target in _ARITH:
        values = [_fake(a) for a in node.args]
        if any(isinstance(v, torch.Tensor) for v in values) and any(_depends(v, symbol) for v in values):
            return "uses the batch size as a value"
    return None


def _einsum_mixes(node: torch.fx.Node, symbol) -> str | None:
    """An einsum mixes rows when a batch-sized index of an operand is summed away."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    inputs, _, output = equation.replace(" ", "").partition("->")
    for subscripts, operand in zip(inputs.split(","), operands):
        t = _fake(operand)
        if "." in subscripts or not isinstance(t, torch.Tensor):
            continue
        if any(subscripts[d] not in output for d in _batch_dims(t, symbol)):
            return "contracts over the batch dim"
    return None


# ---- writes --------------------------------------------------------------------------------------
# ops writing the rows an index (or mask) picks; with a trailing "_" they write in place
_INDEXED = {"index_copy": 1, "index_add": 1, "index_fill": 1, "index_reduce": 1, "scatter": 1, "scatter_add": 1,
            "scatter_reduce": 1}  # name -> position of ``dim``
_INDEXED_NO_DIM = {"index_put", "put", "masked_scatter"}


def _batch_dependent(gm: torch.fx.GraphModule, symbol) -> set[torch.fx.Node]:
    """Nodes whose value depends on the batch: batched or batch-sized values, and all they feed."""
    tainted: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if (_batch_dims(value, symbol) or _depends(value, symbol)
                or any(a in tainted for a in node.all_input_nodes)):
            tainted.add(node)
    return tainted


def _written(node: torch.fx.Node) -> list:
    """The arguments ``node`` writes in place."""
    target = node.target
    if node.op == "call_method":
        return [node.args[0]] if target.endswith("_") and not target.startswith("_") else []
    if target is operator.setitem:
        return [node.args[0]]
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return [arg for arg, spec in zip(node.args, schema.arguments) if spec.alias_info and spec.alias_info.is_write]
    name = getattr(target, "__name__", "")
    written = [node.args[0]] if name.endswith("_") and not name.startswith("_") and node.args else []
    return written + ([node.kwargs["out"]] if "out" in node.kwargs else [])


def _indexed_write(node: torch.fx.Node, symbol, tainted: set) -> str | None:
    """Writes into batched rows that batch data picks: a padded lane's stale index can hit a real row."""
    name = node_name(node).rstrip("_")
    target = _fake(node.args[0]) if node.args else None
    bdims = _batch_dims(target, symbol)
    if not bdims:
        return None
    if node.target is operator.setitem:
        index = node.args[1] if isinstance(node.args[1], (tuple, list)) else (node.args[1],)
        if any(isinstance(i, torch.fx.Node) and i in tainted and isinstance(_fake(i), torch.Tensor) for i in index):
            return "writes rows picked by batch data (padded lanes would write real rows)"
        return None
    others = [a for a in node.all_input_nodes if a is not node.args[0]]
    if name in _INDEXED:
        dim = _arg(node, _INDEXED[name], "dim")
        if isinstance(dim, int) and dim % target.dim() in bdims and any(a in tainted for a in others):
            return "writes rows picked by batch data (padded lanes would write real rows)"
    if name in _INDEXED_NO_DIM and any(a in tainted for a in others):
        return "writes rows picked by batch data (padded lanes would write real rows)"
    return None


def _state_writes(gm: torch.fx.GraphModule, symbol, tainted: set) -> list[str]:
    """Inputs without a batch dim that the graph writes with batch-dependent values. The forward
    context's buffers are exempt: padded lanes write only the null block there."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def storage(node) -> int | None:
        value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
        return StorageWeakRef(value.untyped_storage()).cdata if isinstance(value, torch.Tensor) else None

    reasons = []
    nodes = list(gm.graph.nodes)
    for placeholder in (n for n in nodes if n.op == "placeholder"):
        value = placeholder.meta.get("example_value")
        if (not isinstance(value, torch.Tensor) or value._version == 0 or _batch_dims(value, symbol)
                or placeholder.meta.get("fullgraph_input")):
            continue
        ref = storage(placeholder)
        writers = [n for n in nodes if n.op in ("call_function", "call_method")
                   and any(storage(w) == ref for w in _written(n))]
        if not writers:
            reasons.append(f"input {placeholder.name} is written by an op this check cannot follow")
        for writer in writers:
            if any(a in tainted for a in writer.all_input_nodes):
                reasons.append(f"{writer.name} ({node_name(writer)}): writes batch-dependent values into input "
                               f"{placeholder.name}, which has no batch dim (padded rows would leak into it)")
    return reasons

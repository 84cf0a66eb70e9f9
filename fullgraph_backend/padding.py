"""Which graph inputs and outputs carry the batch dimension, and how to pad and slice them.

Dynamo hands the backend fake tensors whose sizes are sympy expressions. A graph is paddable
when exactly one symbol (the batch size) appears, and only as a whole dimension: then an input
of ``n`` rows can be copied into a static buffer of any capture size ``P >= n``
(:mod:`fullgraph_backend.staging`), and an output computed at ``P`` is sliced back to ``n``.

One other output dim is allowed: ``Min(s, u + c)``, ``u`` the size of a forward-context buffer (an
engine limit, not a batch size) and ``c`` an integer, which :func:`fullgraph_backend.request_ends`
gives the logits (one row per request lane, ``lanes = len(query_start_loc) - 1``). Its rows are
the same at ``P`` as at ``n`` (the lanes index real tokens), so it is sliced to ``min(n, u + c)``
with ``u`` read off the buffer at the call.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy
import torch
from torch.utils._sympy.functions import Min as _SymMin  # what torch.sym_min makes (2.11 through 2.13)


class ArgKind(enum.Enum):
    SIZE = "size"  # the batch size itself, as an int
    BATCHED = "batched"  # a tensor with one or more batch dims: copied into a static buffer
    STATIC = "static"  # a tensor at a fixed address (weights, buffers, marked tensors): read in place
    COPIED = "copied"  # any other tensor without batch dims: copied whole into a static buffer
    OTHER = "other"  # anything else, passed through


@dataclass(frozen=True)
class InputRole:
    """What the graph does with one input beyond its shape.

    ``static``: its address is fixed for the life of the compiled graph (parameters, buffers,
    tensors marked with ``torch._dynamo.mark_static_address``, the forward context's buffers), so
    the graph reads and writes it in place. ``forward_context``: one of the forward context's
    buffers, whose writes during capture go to the null block by contract. ``mutated``: the graph
    writes it in place. ``host``: a CPU tensor the graph reads on the device
    (:func:`passes.move_host_inputs`), moved there before each call.
    """

    static: bool = False
    forward_context: bool = False
    mutated: bool = False
    host: bool = False


@dataclass(frozen=True)
class ArgSpec:
    kind: ArgKind
    batch_dims: tuple[int, ...] = ()
    shape: tuple = ()  # ints and sympy expressions in the batch symbol
    stride: tuple = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    role: InputRole = InputRole()


def input_role(placeholder: torch.fx.Node) -> InputRole:
    """The role of a Dynamo placeholder's input, from its metadata.

    Dynamo traced the graph on the placeholders' fake tensors, so a fake whose version counter
    moved was written in place by the graph (directly or through a view: views share it).
    """
    from fullgraph_backend.compat import guard_source

    value = placeholder.meta.get("example_value")
    mutated = isinstance(value, torch.Tensor) and value._version > 0
    if placeholder.meta.get("fullgraph_input"):  # a forward-context buffer the attention swap added
        return InputRole(static=True, forward_context=True, mutated=mutated)
    marked = "_dynamo_static_input_type" in placeholder.meta.get("tensor_dict", {})
    arg = placeholder.meta.get("grapharg")
    if arg is None:
        module_state = isinstance(value, torch.nn.Parameter)
    else:
        source = guard_source(arg.source)
        # a module's float attribute Dynamo passes as a tensor (unspecialized) is a new tensor each call
        module_state = ((source.is_unspecialized_nn_module() or source.is_specialized_nn_module())
                        and not arg.pass_arg_as_tensor)
    return InputRole(static=marked or module_state, mutated=mutated,
                     host=bool(placeholder.meta.get("fullgraph_host_input")))


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _symbols(value, limits: dict | None = None) -> set:
    """The symbols of a value's sizes and strides; with ``limits``, a ``Min(x, u + c)`` size
    (see :func:`_lane_bound`) counts as ``x`` alone."""
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    if isinstance(value, torch.Tensor):
        exprs = [_expr(s) for s in (*value.shape, *value.stride())]
        return set().union(*((_lane_bound(e, limits) or (e, None))[0].free_symbols for e in exprs), set())
    return set()


def _limit_symbols(inputs: list, roles: list[InputRole]) -> dict:
    """Each symbol that is a whole dim of a forward-context buffer (the engine's limits: the swap
    pass makes those dims unbacked sizes, ``forward_context.SIZED_BY_LIMITS``), with where a
    call's value of it is read: ``(input, dim)``."""
    limits: dict = {}
    for i, (value, role) in enumerate(zip(inputs, roles)):
        if role.forward_context and isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                e = _expr(size)
                if isinstance(e, sympy.Symbol):
                    limits.setdefault(e, (i, d))
    return limits


def _lane_bound(e, limits: dict | None) -> tuple | None:
    """``(x, (input, dim, c))`` where ``e`` is ``Min(x, u + c)`` (either order), ``u`` a limit
    symbol, ``c`` an integer and ``x`` a symbol that is not a limit; else None."""
    if not limits or not isinstance(e, (_SymMin, sympy.Min)) or len(e.args) != 2:
        return None
    for x, bound in (e.args, reversed(e.args)):
        if isinstance(x, sympy.Symbol) and x not in limits and len(bound.free_symbols) == 1:
            (u,) = bound.free_symbols
            c = bound - u
            if u in limits and c.is_Integer:
                return x, (*limits[u], int(c))
    return None


class BatchSignature:
    """The batch structure of a graph's inputs and outputs, read from Dynamo's fake values."""

    def __init__(self, inputs: list, outputs: list, roles: list[InputRole] | None = None) -> None:
        roles = roles or [InputRole()] * len(inputs)
        # the forward context's buffers have sizes of their own (its limits), read in place, never padded
        batch_inputs = [v for v, role in zip(inputs, roles) if not role.forward_context]
        # an output's rows may be bounded by a limit (``Min(s, u + c)``, the module docstring)
        self._limits = _limit_symbols(inputs, roles)
        symbols = set().union(set(), *(_symbols(v) for v in batch_inputs),
                              *(_symbols(v, self._limits) for v in outputs))
        self.symbol: sympy.Symbol | None = next(iter(symbols)) if len(symbols) == 1 else None
        self.why_not_paddable: str | None = None
        if len(symbols) > 1:
            self.why_not_paddable = f"{len(symbols)} dynamic sizes ({sorted(map(str, symbols))}); padding needs one"
        self.inputs = [self._spec(v, role) for v, role in zip(inputs, roles)]
        self.outputs = [self._spec(v, InputRole(), output=True) for v in outputs]
        self.is_static = not symbols
        self._concrete: dict[tuple, tuple[int, ...]] = {}
        # where a call's batch size is read: (input, dim), dim None for the size itself; found once
        # here, as comparing sympy sizes per input cost ~0.1 ms per call
        self._size_at = next(((i, None) if spec.kind is ArgKind.SIZE else (i, d)
                              for i, spec in enumerate(self.inputs)
                              for d in ((None,) if spec.kind is ArgKind.SIZE else spec.batch_dims)
                              if spec.kind is ArgKind.SIZE or spec.shape[d] == self.symbol), None)
        # per output, how each batch dim is cut at a call, found once (slicing is on the per-call path):
        # (dim, its expression or None for the batch size itself, (input, dim, c) of a Min(s, u + c) dim)
        self._cuts = [tuple((d, None if spec.shape[d] == self.symbol else spec.shape[d],
                             (_lane_bound(spec.shape[d], self._limits) or (None, None))[1])
                            for d in spec.batch_dims) if spec.kind is ArgKind.BATCHED else ()
                      for spec in self.outputs]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> "BatchSignature":
        """Read the signature off the placeholders and output node of a Dynamo graph."""
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        (out_args,) = [n.args[0] for n in nodes if n.op == "output"]
        outputs = [a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a
                   for a in (out_args if isinstance(out_args, (list, tuple)) else [out_args])]
        return cls([n.meta.get("example_value") for n in placeholders], outputs,
                   [input_role(n) for n in placeholders])

    @property
    def paddable(self) -> bool:
        return self.symbol is not None and self.why_not_paddable is None

    def _spec(self, value, role: InputRole, output: bool = False) -> ArgSpec:
        sym = self.symbol
        if isinstance(value, torch.SymInt):
            if sym is not None and value.node.expr == sym:
                return ArgSpec(ArgKind.SIZE)
            if _symbols(value) and self.why_not_paddable is None:
                self.why_not_paddable = f"the graph takes or returns the size expression {value.node.expr}"
            return ArgSpec(ArgKind.OTHER)
        if not isinstance(value, torch.Tensor):
            return ArgSpec(ArgKind.OTHER)
        shape = tuple(_expr(s) for s in value.shape)
        stride = tuple(_expr(s) for s in value.stride())
        # the forward context's sizes are its limits, not batch dims (see ``__init__``)
        dims = () if role.forward_context else tuple(i for i, e in enumerate(shape) if e.free_symbols)
        if role.static:
            if dims and self.why_not_paddable is None:  # read in place: there is no larger buffer to pad into
                self.why_not_paddable = f"a fixed-address input of shape {list(shape)} has a batch dim"
            return ArgSpec(ArgKind.STATIC, dims, shape, stride, value.dtype, value.device, role)
        if not dims:
            return ArgSpec(ArgKind.COPIED, (), shape, stride, value.dtype, value.device, role)
        lanes = [d for d in dims if output and (_lane_bound(shape[d], self._limits) or (None,))[0] == sym]
        if any(shape[d] != sym and d not in lanes for d in dims) and self.why_not_paddable is None:
            self.why_not_paddable = f"a tensor of shape {list(shape)} has a batch dim that is not the batch size itself"
        return ArgSpec(ArgKind.BATCHED, dims, shape, stride, value.dtype, value.device, role)

    # ---- at run time ----------------------------------------------------------------------
    @property
    def size_readable(self) -> bool:
        """Whether some input holds the batch size itself (as an int, or as a whole dim), so a call's
        size can be read off its args."""
        return self._size_at is not None

    def batch_size(self, args) -> int | None:
        """The batch size of these runtime args (None for a graph without one)."""
        if self._size_at is None:
            return None
        i, d = self._size_at
        return int(args[i]) if d is None else int(args[i].shape[d])

    def at(self, values: tuple, size: int | None) -> tuple[int, ...]:
        """Concrete sizes or strides at batch size ``size`` (memoised: sympy is slow per call)."""
        key = (values, size)
        if key not in self._concrete:
            self._concrete[key] = tuple(int(e.subs(self.symbol, size)) if e.free_symbols else int(e) for e in values)
        return self._concrete[key]

    def slice_outputs(self, outputs: tuple, size: int, args: tuple = ()) -> tuple:
        """Cut outputs computed at a padded size back to their shapes at batch size ``size``; ``args``
        (the call's, forward-context buffers included) give the limits of ``Min(s, u + c)`` dims."""
        result = []
        for spec, cuts, out in zip(self.outputs, self._cuts, outputs):
            for d, expr, limit in cuts:
                if limit is not None:
                    i, dim, c = limit
                    rows = min(size, args[i].shape[dim] + c)
                else:
                    rows = size if expr is None else self.at((expr,), size)[0]
                out = out.narrow(d, 0, rows)
            if spec.kind is ArgKind.SIZE:
                out = size
            result.append(out)
        return tuple(result)

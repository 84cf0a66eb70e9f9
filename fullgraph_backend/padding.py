"""Which graph inputs and outputs carry the batch dimension, and how to pad and slice them.

Dynamo hands the backend fake tensors whose sizes are sympy expressions. A graph is paddable
when exactly one symbol (the batch size) appears, and only as a whole dimension: then an input
of ``n`` rows can be copied into a static buffer viewed at any capture size ``P >= n``, and an
output computed at ``P`` is sliced back to ``n``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy
import torch


class ArgKind(enum.Enum):
    SIZE = "size"  # the batch size itself, as an int
    BATCHED = "batched"  # a tensor with one or more batch dims: copied into a static buffer
    STATIC = "static"  # module state (weights, buffers): read in place, must not move
    COPIED = "copied"  # any other tensor without batch dims: copied whole into a static buffer
    OTHER = "other"  # anything else, passed through


@dataclass(frozen=True)
class ArgSpec:
    kind: ArgKind
    batch_dims: tuple[int, ...] = ()
    shape: tuple = ()  # ints and sympy expressions in the batch symbol
    stride: tuple = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None


def is_module_state(placeholder: torch.fx.Node) -> bool:
    """Whether a Dynamo placeholder is a parameter or buffer of an nn.Module (read in place)."""
    from fullgraph_backend.compat import guard_source

    if placeholder.meta.get("fullgraph_input"):  # a forward-context buffer the attention swap added
        return True
    arg = placeholder.meta.get("grapharg")
    if arg is None:
        return isinstance(placeholder.meta.get("example_value"), torch.nn.Parameter)
    source = guard_source(arg.source)
    return source.is_unspecialized_nn_module() or source.is_specialized_nn_module()


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _symbols(value) -> set:
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    if isinstance(value, torch.Tensor):
        return set().union(*(_expr(s).free_symbols for s in (*value.shape, *value.stride())), set())
    return set()


class BatchSignature:
    """The batch structure of a graph's inputs and outputs, read from Dynamo's fake values."""

    def __init__(self, inputs: list, outputs: list, module_state: list[bool] | None = None) -> None:
        symbols = set().union(set(), *(_symbols(v) for v in (*inputs, *outputs)))
        self.symbol: sympy.Symbol | None = next(iter(symbols)) if len(symbols) == 1 else None
        self.why_not_paddable: str | None = None
        if len(symbols) > 1:
            self.why_not_paddable = f"{len(symbols)} dynamic sizes ({sorted(map(str, symbols))}); padding needs one"
        state = module_state or [False] * len(inputs)
        self.inputs = [self._spec(v, is_state) for v, is_state in zip(inputs, state)]
        self.outputs = [self._spec(v, False) for v in outputs]
        self.is_static = not symbols
        self._concrete: dict[tuple, tuple[int, ...]] = {}

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> "BatchSignature":
        """Read the signature off the placeholders and output node of a Dynamo graph."""
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        (out_args,) = [n.args[0] for n in nodes if n.op == "output"]
        outputs = [a.meta.get("example_value") if isinstance(a, torch.fx.Node) else a
                   for a in (out_args if isinstance(out_args, (list, tuple)) else [out_args])]
        return cls([n.meta.get("example_value") for n in placeholders], outputs,
                   [is_module_state(n) for n in placeholders])

    @property
    def paddable(self) -> bool:
        return self.symbol is not None and self.why_not_paddable is None

    def _spec(self, value, is_state: bool) -> ArgSpec:
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
        dims = tuple(i for i, e in enumerate(shape) if e.free_symbols)
        if not dims:
            kind = ArgKind.STATIC if is_state else ArgKind.COPIED
            return ArgSpec(kind, (), shape, stride, value.dtype, value.device)
        if any(shape[d] != sym for d in dims) and self.why_not_paddable is None:
            self.why_not_paddable = f"a tensor of shape {list(shape)} has a batch dim that is not the batch size itself"
        return ArgSpec(ArgKind.BATCHED, dims, shape, stride, value.dtype, value.device)

    # ---- at run time ----------------------------------------------------------------------
    def batch_size(self, args) -> int | None:
        """The batch size of these runtime args (None for a graph without one)."""
        for spec, arg in zip(self.inputs, args):
            if spec.kind is ArgKind.SIZE:
                return int(arg)
            if spec.kind is ArgKind.BATCHED:
                return int(arg.shape[spec.batch_dims[0]])
        return None

    def at(self, values: tuple, size: int | None) -> tuple[int, ...]:
        """Concrete sizes or strides at batch size ``size`` (memoised: sympy is slow per call)."""
        key = (values, size)
        if key not in self._concrete:
            self._concrete[key] = tuple(int(e.subs(self.symbol, size)) if e.free_symbols else int(e) for e in values)
        return self._concrete[key]

    def allocate(self, spec: ArgSpec, max_size: int | None) -> torch.Tensor:
        """A zeroed buffer that can be viewed, with the traced strides, at any size <= max_size."""
        shape, stride = self.at(spec.shape, max_size), self.at(spec.stride, max_size)
        numel = 1 + sum((s - 1) * st for s, st in zip(shape, stride))
        return torch.zeros(numel, dtype=spec.dtype, device=spec.device)

    def view(self, spec: ArgSpec, buffer: torch.Tensor, size: int | None) -> torch.Tensor:
        """``buffer`` seen as the input at batch size ``size``, with the strides Dynamo traced."""
        return buffer.as_strided(self.at(spec.shape, size), self.at(spec.stride, size))

    def slice_outputs(self, outputs: tuple, size: int) -> tuple:
        """Cut outputs computed at a padded size back to their shapes at batch size ``size``."""
        result = []
        for spec, out in zip(self.outputs, outputs):
            if spec.kind is ArgKind.BATCHED:
                shape = self.at(spec.shape, size)
                for d in spec.batch_dims:
                    out = out.narrow(d, 0, shape[d])
            elif spec.kind is ArgKind.SIZE:
                out = size
            result.append(out)
        return tuple(result)

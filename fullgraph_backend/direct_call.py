"""Calling a compiled graph without Dynamo, for a caller that controls its inputs (the engine).

Dynamo evaluates its guards on every call of a compiled function (host time each step, growing
with the parameter count), and keeps compiled code per code object with a recompile limit that
every instance of a model class shares. An engine compiles once through Dynamo, then calls the
graph runner directly with the arguments Dynamo would pass: its own tensors by name, their sizes,
and everything else (weights, buffers) as Dynamo saw it at compile time.
"""
from __future__ import annotations

from fullgraph_backend import compat
from fullgraph_backend.graph_runner import GraphRunner


class CannotBind(ValueError):
    """The graph reads something per call that :class:`DirectCall` cannot supply."""


class DirectCall:
    """``DirectCall(runner, ("input_ids", "positions"), fixed=("model",))(ids, pos)`` is what the
    compiled ``f(model, input_ids, positions)`` returned for ``(model, ids, pos)``, without Dynamo.

    Valid while the caller passes tensors like those it compiled with (same dtypes, devices and
    ranks: no guard checks them any more), and the locals named ``fixed`` are the objects they
    were at compile time, so what the graph reads from them (weights, buffers) is too.
    """

    def __init__(self, runner: GraphRunner, arg_names: tuple[str, ...], fixed: tuple[str, ...] = ()) -> None:
        if runner.example_inputs is None or len(runner.sig.outputs) != 1:
            raise CannotBind("the compiled graph does not return exactly one value")
        self.runner = runner
        # the graph's arguments as compiled; a call fills in only the slots that read its own arguments
        self._template = list(runner.example_inputs)
        self._per_call: list[tuple[int, int, int | None]] = []  # (slot, argument, dim or None)
        for slot, source in enumerate(runner.input_sources):
            read = _per_call_read(source, arg_names, fixed)
            if read is not None:
                self._per_call.append((slot, *read))

    def __call__(self, *args):
        graph_args = self._template.copy()
        for slot, i, dim in self._per_call:
            graph_args[slot] = args[i] if dim is None else args[i].shape[dim]
        (out,) = self.runner(*graph_args)
        return out


def _per_call_read(source, arg_names: tuple[str, ...], fixed: tuple[str, ...]) -> tuple[int, int | None] | None:
    """(argument position, dim or None) where ``source`` reads a call argument (or its size), None
    where it reads what stays fixed: a global, or something of a local named in ``fixed``."""
    read = compat.local_input(source) if source is not None else None
    if read is None:
        root = compat.root_local(source) if source is not None else None
        if root is not None and root not in fixed:
            raise CannotBind(f"the graph reads {compat.source_name(source)} of the call, which DirectCall cannot "
                             f"follow")
        return None
    name, dim = read
    if name not in arg_names:
        raise CannotBind(f"the graph reads the argument {name!r}, which is not one of {arg_names}")
    return arg_names.index(name), dim

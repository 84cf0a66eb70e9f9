"""Regional compile: each distinct region of a graph compiled once, its code called for every copy.

A decoder's graph is one layer N times, and Inductor's compile time grows with the graph (on the
H200, 30 of a cold start's 35 s of compile went to Inductor and AOTAutograd over qwen2.5-1.5b's
28 identical layers). :class:`RegionalCompiler` wraps the function that compiles one graph
(Inductor), just before it runs, after every pass of ours:

1. ``passes.split_at_repeats`` cuts the graph into a prologue, one region per repeated layer and
   an epilogue, each cut right after a fusion barrier (a matmul, a custom op), and has each region
   recompute what the whole graph's kernels recompute rather than read it from memory, so the
   regions launch the kernels the whole graph did (perf-notes section 27).
2. :func:`run_on_fakes` runs the cut graph on fakes of the inputs, symbolic in the batch as the
   whole graph was, which gives each region its own fake inputs (as the piecewise mode's pieces).
3. :func:`region_key` says which regions are the same graph over inputs of the same kind; each
   distinct one is compiled once, and every region calls its compiled code.

The result is the cut graph's own ``forward``: plain Python calling one compiled region after
another with the whole graph's arguments, returning what the whole graph returns. A captured CUDA
graph records the kernels those calls launch, so one graph per size still holds the whole step,
and the runner sees the calling convention it always did. Without graphs (batches beyond the
largest capture size, ``cudagraph_mode="none"``) each region adds the host cost of one compiled
call.

Inputs a region writes in place (KV caches, state a program keeps) are that region's inputs, and
AOTAutograd keeps a compiled graph's writes to its inputs in place, so they reach the caller as
from the whole graph. The piecewise modes hand each piece between attention calls to the same
compiler, so identical pieces are compiled once too.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import sympy
import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.multiprocessing.reductions import StorageWeakRef

from fullgraph_backend import compat
from passes.split_regions import InlineLimits, split_at_repeats

log = logging.getLogger("fullgraph")

# Fewer alike regions than this and the graph is compiled whole: two alike save one region's compile,
# about what the cut costs (the graph run on fakes, each compile's fixed cost, a host call a region).
MIN_REPEATS = 3


@dataclass
class PartCall:
    """One submodule call of a split module, as :func:`run_on_fakes` ran it."""

    node: torch.fx.Node  # the ``call_module`` node of the split module
    module: torch.fx.GraphModule
    args: list
    out: object
    written: list[bool]  # per argument: the part wrote it in place (its fake's version counter moved)
    key: tuple | None = None  # its region_key, where run_on_fakes was asked to key the calls


def run_on_fakes(split: torch.fx.GraphModule, example_inputs: list, keyed: bool = False) -> list[PartCall]:
    """Run ``split`` on fakes of ``example_inputs`` and record every submodule call.

    The fakes come from the fake mode the backend was called under, which memoises the example
    inputs with their symbolic sizes, so each part sees inputs symbolic in the batch as the whole
    graph's were.

    ``keyed``: each call also gets its :func:`region_key`, and a call whose key an earlier call had
    is not run: its outputs are new fakes of that call's outputs' shapes (a 28-layer decoder runs
    one region of each of its 5 kinds, not every layer's: running them all was most of the backend's
    own time in a warm start, docs/perf-notes.md, section 31). Only where the earlier call's outputs
    are fresh tensors (no view of an input or of each other) whose sizes name no unbacked symbol that
    the two calls' inputs name differently (a layer's own KV-cache size): the outputs of an equal key
    are then the same function of the same inputs.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    calls: list[PartCall] = []
    alike: dict[tuple, tuple[PartCall, dict]] = {}  # key -> a call that ran, and its symbols' renaming

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            args = [self.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
            if node.op == "call_module" and keyed:
                module = self.fetch_attr(node.target)
                key, renamed = _key_and_renaming(module, args)
                earlier, earlier_renamed = alike.get(key, (None, None))
                if earlier is not None and _symbols_mean_the_same(earlier.out, earlier_renamed, renamed):
                    out = _fresh_alike(earlier.out)
                    calls.append(PartCall(node, module, args, out, earlier.written, key))
                    return out
            versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
            out = super().run_node(node)
            if node.op == "call_module":
                written = [isinstance(a, torch.Tensor) and a._version != v for a, v in zip(args, versions)]
                calls.append(PartCall(node, self.fetch_attr(node.target), args, out, written,
                                      key if keyed else None))
                if keyed and _fresh(out, args):
                    alike[key] = calls[-1], renamed
            return out

    # as Dynamo traced: the Python dispatcher, without which 2.11's C++ matmul guards on unbacked sizes
    with fake_mode, enable_python_dispatcher():
        Recorder(split).run(*_fakes(fake_mode, example_inputs))
    return calls


def _output_tensors(out: object) -> list[torch.Tensor] | None:
    """A call's outputs as a list of tensors; None where one is anything else."""
    outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, (tuple, list)) else [None]
    return outs if all(isinstance(t, torch.Tensor) for t in outs) else None


def _fresh(out: object, args: list) -> bool:
    """Whether a call's outputs are tensors of their own: no two share storage, none shares an
    input's, none starts past its storage's start (a view)."""
    tensors = _output_tensors(out)
    if tensors is None:
        return False
    storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]
    inputs = {StorageWeakRef(a.untyped_storage()) for a in args if isinstance(a, torch.Tensor)}
    return (len(set(storages)) == len(storages) and not inputs.intersection(storages)
            and all(type(t.storage_offset()) is int and t.storage_offset() == 0 for t in tensors))


def _symbols_mean_the_same(out: object, renamed_then: dict, renamed_now: dict) -> bool:
    """Whether every unbacked symbol in the sizes of an earlier call's outputs stands, in a later
    call of the same key, for the same input size (the keys rename them in order of appearance)."""
    for t in _output_tensors(out):
        for size in (*t.shape, *t.stride()):
            if isinstance(size, torch.SymInt):
                if any(renamed_then.get(sym) is None or renamed_then[sym] != renamed_now.get(sym)
                       for sym in free_unbacked_symbols(size.node.expr)):
                    return False
    return True


def _fresh_alike(out: object) -> object:
    """New fakes (of the active fake mode) of ``out``'s tensors' sizes, strides, dtypes and devices."""
    tensors = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
               for t in _output_tensors(out)]
    return tensors[0] if isinstance(out, torch.Tensor) else type(out)(tensors)


def _fakes(fake_mode, example_inputs: list) -> list:
    """The inputs as fakes of ``fake_mode`` (fakes already are: the piecewise pieces get them)."""
    return [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) else x
            for x in example_inputs]


def install(split: torch.fx.GraphModule, name: str, fn: Callable) -> None:
    """Make ``split``'s code call ``fn`` where it called its submodule ``name``. The code calls
    ``self.<name>(...)``; an instance attribute is found before ``nn.Module.__getattr__`` looks in
    the submodules, and the call then costs no ``nn.Module.__call__``."""
    split.__dict__[name] = fn


def region_key(gm: torch.fx.GraphModule, args: list) -> tuple:
    """What makes two graphs interchangeable once compiled: their ops in order (targets, constant
    arguments, nodes referred to by position, placeholders by order) and their inputs (dtype,
    device, shape, strides and offset, which earlier input shares storage, symbolic sizes).

    Unbacked sizes (the forward context's buffers get fresh ones each: every layer's KV cache has
    its own block count symbol) are renamed in order of appearance, with their value ranges kept:
    compiled code reads them off its inputs at each call. Backed sizes (the batch) keep their names,
    since Inductor may have guarded on them. Any other object is compared by identity.
    """
    return _key_and_renaming(gm, args)[0]


def _key_and_renaming(gm: torch.fx.GraphModule, args: list) -> tuple[tuple, dict[sympy.Symbol, sympy.Symbol]]:
    """:func:`region_key`, and the unbacked symbols of ``args`` with the names the key gave them."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    ops = tuple((n.op, _target(gm, n), _constant(n.args, position), _constant(n.kwargs, position))
                for n in gm.graph.nodes)
    inputs = _InputKeys(getattr(torch._guards.detect_fake_mode(args), "shape_env", None))
    return (ops, inputs.of(args)), inputs.renamed


class _Cut(NamedTuple):
    split: torch.fx.GraphModule
    calls: list[PartCall]
    keys: list[tuple]


@dataclass
class RegionReport:
    """How one graph handed to the compiler was compiled: per region (or ``whole``), the index of
    the compile that serves it among the compiler's compiles (a dump's pieces, in order), and why
    it was not cut when it was not."""

    regions: list[tuple[str, int]] = field(default_factory=list)
    why_not: str | None = None

    def summary(self) -> str:
        """One line for the log and the dump."""
        compiles = Counter(i for _, i in self.regions)
        if self.why_not:
            return f"compiled whole: {self.why_not}"
        if len(self.regions) == 1:
            return f"the same graph as compile {self.regions[0][1]}: its compiled code reused"
        return (f"{len(self.regions)} regions, {len(compiles)} distinct, {len(self.regions) - len(compiles)} "
                f"reuse the code of an alike one (regions per compile: "
                f"{', '.join(f'{i}: {n}' for i, n in sorted(compiles.items()))})")


class RegionalCompiler:
    """``compile_once(gm, example_inputs)`` (one Inductor compile with ``inductor_config``), applied
    once per distinct region of each graph it is handed, and once per distinct graph. See the
    module doc.

    ``on_report`` gets a :class:`RegionReport` per graph (the dump keeps them).
    """

    def __init__(self, compile_once: Callable, inductor_config: dict,
                 on_report: Callable[[RegionReport], None] = lambda report: None,
                 min_repeats: int = MIN_REPEATS) -> None:
        self.compile_once, self.inductor_config = compile_once, inductor_config
        self.on_report, self.min_repeats = on_report, min_repeats
        self._compiled: dict[tuple, tuple[int, Callable]] = {}  # key -> (compile index, compiled)
        self._compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        if fake_mode is None:  # a graph handed over by hand: no symbolic sizes to compile regions with
            return self._whole(gm, example_inputs, "no fake mode: the graph does not come from Dynamo")
        with compat.timed("regions.keys"):
            key = region_key(gm, _fakes(fake_mode, example_inputs))
        if key in self._compiled:
            index, compiled = self._compiled[key]
            self._report(RegionReport([("whole", index)]), logging.DEBUG)  # a piecewise piece like an earlier one
            return compiled
        cut = self._cut(gm, example_inputs)
        if isinstance(cut, str):
            return self._whole(gm, example_inputs, cut, key)
        regions = []
        for call, region in zip(cut.calls, cut.keys):
            index, compiled = self._compiled.get(region) or self._compile(call.module, call.args, region)
            install(cut.split, call.node.target, compiled)
            regions.append((call.node.target, index))
        self._report(RegionReport(regions))
        return cut.split.forward

    def _cut(self, gm: torch.fx.GraphModule, example_inputs: list) -> _Cut | str:
        """The graph cut into regions, run on fakes and keyed; or why it is compiled whole."""
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        try:
            limits = InlineLimits(*compat.realize_thresholds(device, self.inductor_config))
            with compat.timed("regions.split"):
                cut = split_at_repeats(gm, self.min_repeats, limits)
            if cut.split is None:
                return cut.why_not
            with compat.timed("regions.run_on_fakes"):
                calls = run_on_fakes(cut.split, example_inputs, keyed=True)
            keys = [c.key for c in calls]
        except Exception as e:  # noqa: BLE001  (the whole graph compiles without the cut; the log says why)
            return f"cutting the graph into regions failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        crossing = next((a for c in calls for a in c.args if not isinstance(a, _REGION_INPUTS)), None)
        if crossing is not None:
            return f"a {type(crossing).__name__} crosses a cut; compiled code takes tensors, sizes and numbers"
        same = max(Counter(keys).values())
        if same < self.min_repeats:
            return (f"the {len(calls)} regions found (a period of {cut.barriers_per_region} fusion barriers) "
                    f"hold {len(set(keys))} distinct graphs, at most {same} alike")
        return _Cut(cut.split, calls, keys)

    def _whole(self, gm: torch.fx.GraphModule, example_inputs: list, why: str, key: tuple | None = None) -> Callable:
        index, compiled = self._compile(gm, example_inputs, key)
        self._report(RegionReport([("whole", index)], why_not=why))
        return compiled

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list, key: tuple | None) -> tuple[int, Callable]:
        entry = (self._compiles, self.compile_once(gm, example_inputs))
        self._compiles += 1
        if key is not None:
            self._compiled[key] = entry
        return entry

    def _report(self, report: RegionReport, level: int = logging.INFO) -> None:
        log.log(level, "fullgraph: regional compile: %s", report.summary())
        self.on_report(report)


def _target(gm: torch.fx.GraphModule, node: torch.fx.Node) -> object:
    """A node's target as compared: functions and method names as they are; placeholders by
    position alone (their names are the inputs'); attributes and submodules by the identity of what
    they hold (two constants alike are still two tensors)."""
    if node.op == "placeholder":
        return None
    if node.op == "get_attr":
        return "get_attr", id(torch.fx.graph_module._get_attr(gm, node.target))
    if node.op == "call_module":
        return "call_module", id(gm.get_submodule(node.target))
    return node.target


def _constant(value: object, position: dict[torch.fx.Node, int]) -> object:
    """A node argument as compared: nodes by position, containers item by item, floats by their
    bits (``0.0`` is not ``-0.0``), other immutable constants by value, anything else by identity."""
    if isinstance(value, torch.fx.Node):
        return "node", position[value]
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_constant(v, position) for v in value)
    if isinstance(value, dict):
        return "dict", tuple((k, _constant(v, position)) for k, v in value.items())
    if isinstance(value, slice):
        return "slice", _constant((value.start, value.stop, value.step), position)
    if isinstance(value, float):
        return "float", value.hex()
    if value is None or isinstance(value, (bool, int, str, complex, torch.dtype, torch.device, torch.layout,
                                           torch.memory_format)) or value is Ellipsis:
        return type(value).__name__, value
    return "object", id(value)


_REGION_INPUTS = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool, type(None))


class _InputKeys:
    """The input half of :func:`region_key`, with unbacked symbols renamed across one input list."""

    def __init__(self, shape_env) -> None:
        self.shape_env = shape_env
        self.renamed: dict[sympy.Symbol, sympy.Symbol] = {}

    def of(self, args: list) -> tuple:
        storages: dict[StorageWeakRef, int] = {}
        keys = []
        for i, x in enumerate(args):
            if isinstance(x, torch.Tensor):
                first = storages.setdefault(StorageWeakRef(x.untyped_storage()), i)
                keys.append(("tensor", x.dtype, x.device, self._sizes(x.shape), self._sizes(x.stride()),
                             self._size(x.storage_offset()), x.requires_grad, first))
            elif isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                keys.append(("symbol", self._size(x)))
            else:
                keys.append(_constant(x, {}))
        ranges = tuple((str(new), str(self.shape_env.var_to_range.get(old)) if self.shape_env else None)
                       for old, new in self.renamed.items())
        return tuple(keys), ranges

    def _sizes(self, sizes) -> tuple:
        return tuple(self._size(s) for s in sizes)

    def _size(self, size) -> str:
        if not isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return str(size)
        expr = size.node.expr
        for symbol in sorted(free_unbacked_symbols(expr), key=str):
            self.renamed.setdefault(symbol, sympy.Symbol(f"unbacked{len(self.renamed)}", integer=True))
        return str(expr.xreplace(self.renamed))

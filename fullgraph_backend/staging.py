"""How each input of a compiled graph reaches a captured graph, and how its writes get back.

A captured graph reads fixed addresses. Per input, an :class:`InputPlan` says which of these
holds:

- the batch size: replaced by the padded size;
- a fixed-address input (weights, buffers, marked tensors, forward-context buffers): read and
  written in place; its address is checked at every replay;
- any other tensor: copied into a buffer the recording owns (rows past the real count keep
  stale, finite values); if the graph writes it, the write is copied back into the caller's
  tensor after the replay (the real rows only). A tensor without a batch dim that the graph
  writes (state the caller keeps: transformers' static cache, a counter) is instead read and
  written where the caller's tensor is, for as long as the caller passes it there: no copies;
- anything else: passed through.

:class:`StagedInputs` holds one recording's buffers and does the copies.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fullgraph_backend.padding import ArgKind, ArgSpec, BatchSignature


class Role(enum.Enum):
    SIZE = "size"
    IN_PLACE = "in place"
    COPY = "copy"
    PASS = "pass"


_ROLE_OF_KIND = {ArgKind.SIZE: Role.SIZE, ArgKind.STATIC: Role.IN_PLACE, ArgKind.BATCHED: Role.COPY,
                 ArgKind.COPIED: Role.COPY, ArgKind.OTHER: Role.PASS}


@dataclass(frozen=True)
class InputPlan:
    """One role per graph input, and the inputs needing more than a read."""

    roles: tuple[Role, ...]
    write_back: frozenset[int]  # copied inputs the graph writes: copied back after every replay
    restore: frozenset[int]  # in-place inputs the graph writes: kept across warm-up and capture runs
    host: frozenset[int]  # CPU tensors the graph reads on the device: moved there before the call
    adopt: frozenset[int]  # written copied inputs without a batch dim: read in place while their address holds

    @classmethod
    def of(cls, sig: BatchSignature) -> "InputPlan":
        """The plan for a graph of signature ``sig``.

        Forward-context buffers are not restored after capture runs: capture metadata sends
        their writes to the null block (:meth:`ForwardContext.capture_metadata`).
        """
        roles = tuple(_ROLE_OF_KIND[s.kind] for s in sig.inputs)
        mutated = {i for i, s in enumerate(sig.inputs) if s.role.mutated}
        copied = {i for i, r in enumerate(roles) if r is Role.COPY}
        in_place = {i for i, r in enumerate(roles) if r is Role.IN_PLACE}
        forward_context = {i for i, s in enumerate(sig.inputs) if s.role.forward_context}
        host = {i for i, s in enumerate(sig.inputs) if s.role.host}
        whole = {i for i, s in enumerate(sig.inputs) if s.kind is ArgKind.COPIED}
        return cls(roles, frozenset(mutated & copied), frozenset((mutated & in_place) - forward_context),
                   frozenset(host), frozenset((mutated & whole) - host))

    def indices(self, role: Role) -> list[int]:
        """Input positions with ``role``, in order."""
        return [i for i, r in enumerate(self.roles) if r is role]


class StagedInputs:
    """The copied inputs of one recording at its padded size: where the graph reads each one.

    ``reads[i]`` is a buffer of its own; or (piecewise mode) the output of a piece captured earlier
    for the same key, which the graph reads where it lives so a replay copies only what moved; or,
    with ``adopt``, the caller's own tensor for the inputs the plan lets it adopt (:attr:`adopted`),
    valid while it stays at the address it had at capture (its ``graph_runner.Recording`` checks that with
    the fixed addresses; the layout is the traced one, and Dynamo's guards keep a tensor's shape and
    strides: a call with others compiles again).
    """

    def __init__(self, sig: BatchSignature, plan: InputPlan, size: int | None, args: tuple,
                 produced: set[int], adopt: bool = False) -> None:
        self.sig, self.plan, self.size = sig, plan, size
        self.reads: dict[int, torch.Tensor] = {}
        self.adopted: set[int] = set()
        for i in plan.indices(Role.COPY):
            spec, arg = sig.inputs[i], args[i]
            shape, stride = sig.at(spec.shape, size), sig.at(spec.stride, size)
            fits = (isinstance(arg, torch.Tensor) and tuple(arg.shape) == shape and arg.stride() == stride
                    and arg.dtype == spec.dtype)
            if fits and adopt and i in plan.adopt:
                self.adopted.add(i)
            else:
                self.reads[i] = arg if fits and arg.data_ptr() in produced else _buffer(spec, shape, stride)
        self.owned = {t.untyped_storage().data_ptr() for i, t in self.reads.items() if t is not args[i]}
        # a replay's copies, grouped here so a call only gathers its own tensors
        self._in = _grouped(sig, self.reads, args)
        self._back = _grouped(sig, {i: self.reads[i] for i in sorted(plan.write_back - self.adopted)}, args)
        self._sizes = plan.indices(Role.SIZE)

    def stage(self, args: tuple) -> list:
        """The args the graph sees: each copied input copied to where the graph reads it (its real rows
        into the padded buffer), the size replaced by the padded size; adopted inputs as they are."""
        self.copy_in(args)
        staged = list(args)
        for i, dst in self.reads.items():
            staged[i] = dst
        for i in self._sizes:
            staged[i] = self.size
        return staged

    def copy_in(self, args: tuple) -> None:
        """Copy each copied input to where the graph reads it: what a replay needs of :meth:`stage`."""
        for copies in self._in:
            copies.run(args, into_graph=True)

    def write_back(self, args: tuple) -> None:
        """Copy what the graph wrote into copied inputs back into the caller's tensors (real rows)."""
        for copies in self._back:
            copies.run(args, into_graph=False)


def _buffer(spec: ArgSpec, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """A zeroed tensor of ``shape`` with the traced ``stride`` (stride-0 dims share their one element)."""
    numel = 1 + sum((s - 1) * st for s, st in zip(shape, stride))
    flat = torch.zeros(numel, dtype=spec.dtype, device=spec.device)
    return flat.as_strided(shape, stride)


def _rows(spec: ArgSpec, dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dst, src)`` cut to the rows both have along the batch dims, and to one element of an
    expanded (stride-0) dim of ``dst``: a copy into overlapping memory would be an error."""
    if src.shape == dst.shape and 0 not in dst.stride():  # the common case, checked in C: ~100 per call
        return dst, src
    for d in range(dst.dim()):
        rows = min(src.shape[d], dst.shape[d])
        if dst.stride(d) == 0 and dst.shape[d] > 1:
            rows = 1
        if rows != dst.shape[d] or rows != src.shape[d]:
            src, dst = src.narrow(d, 0, rows), dst.narrow(d, 0, rows)
    return dst, src


class _Copies:
    """Copies between a call's inputs at ``positions`` and the tensors a recording reads there, of one
    device and dtype: one foreach copy, not one launch per tensor (state kept by the caller,
    transformers' static cache, is ~100 tensors: docs/perf-notes.md, section 21). Grouped when the
    recording is made, so a call only gathers its own tensors (section 26).

    ``specs`` is None when every pair copies whole: a buffer of the recording's own, of the input's
    traced shape (no batch dim: Dynamo's guards hold the call's shape to it), no expanded dim. Else
    each call cuts every pair to its rows (:func:`_rows`) and skips what the graph reads in place.
    """

    def __init__(self, positions: list[int], graph_side: list[torch.Tensor], specs: list[ArgSpec] | None) -> None:
        self.positions, self.graph_side, self.specs = positions, graph_side, specs

    def run(self, args: tuple, into_graph: bool) -> None:
        theirs = [args[i] for i in self.positions]
        if self.specs is None:
            dsts, srcs = (self.graph_side, theirs) if into_graph else (theirs, self.graph_side)
        else:
            pairs = [_rows(spec, g, t) if into_graph else _rows(spec, t, g)
                     for spec, g, t in zip(self.specs, self.graph_side, theirs) if g is not t]
            if not pairs:
                return
            dsts, srcs = map(list, zip(*pairs))
        torch._foreach_copy_(dsts, srcs)


def _grouped(sig: BatchSignature, reads: dict[int, torch.Tensor], args: tuple) -> list[_Copies]:
    """``reads`` (input position -> the tensor the graph reads) as :class:`_Copies`, one per device and dtype."""
    groups: dict[tuple, dict[int, torch.Tensor]] = {}
    for i, t in reads.items():
        groups.setdefault((t.device, t.dtype), {})[i] = t
    result = []
    for group in groups.values():
        whole = all(t is not args[i] and sig.inputs[i].kind is ArgKind.COPIED and 0 not in t.stride()
                    for i, t in group.items())
        result.append(_Copies(list(group), list(group.values()), None if whole else [sig.inputs[i] for i in group]))
    return result


def aliased_writes(sig: BatchSignature, inputs: list, names: list[str]) -> list[str]:
    """Reasons the inputs cannot be staged one by one: two inputs share memory and the graph writes
    one of them, so a write through one must be seen through the other (separate buffers would not
    see it). ``inputs`` are the example inputs Dynamo compiled with, ``names`` their placeholders."""
    by_storage: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and sig.inputs[i].kind is not ArgKind.OTHER and x.untyped_storage().nbytes():
            by_storage.setdefault(x.untyped_storage().data_ptr(), []).append(i)
    return [f"inputs {', '.join(names[i] for i in group)} share memory and the graph writes "
            f"{', '.join(names[i] for i in group if sig.inputs[i].role.mutated)}"
            for group in by_storage.values()
            if len(group) > 1 and any(sig.inputs[i].role.mutated for i in group)]

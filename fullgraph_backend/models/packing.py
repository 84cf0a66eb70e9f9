"""Sibling projections in one tensor: the linears a forward pass calls on one input (q/k/v, gate/up).

transformers' modeling code projects q, k and v (and gate and up) with one ``nn.Linear`` each, all
on the same hidden states. :class:`RecordLinearInputs` finds such groups from one forward pass (the
meta-device run of ``models.hf.inspect_model``); :func:`pack_linears` then copies each group's
weights, and biases, into one tensor and makes the modules' parameters views of it, so no memory is
added. The ``merge_linears`` graph pass (``passes/merge_linears.py``) runs a group laid out this way
as one linear over the whole block: at batch 1 on a GPU one GEMV instead of three.

A packed model's parameters share storage, which ``safetensors`` refuses to save as they are: the
engine only reads them.
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.nn as nn


class RecordLinearInputs:
    """While active, records which ``nn.Linear`` modules of ``model`` each input tensor goes to::

        with RecordLinearInputs(model) as linears:
            model(ids)
        linears.groups()  # (("model.layers.0.self_attn.q_proj", "...k_proj", "...v_proj"), ...)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: dict[int, tuple[torch.Tensor, list[str]]] = {}  # id(input) -> (input, module names)
        self.handles: list = []

    def __enter__(self) -> RecordLinearInputs:
        self.handles = [module.register_forward_pre_hook(functools.partial(self._record, name))
                        for name, module in self.model.named_modules() if isinstance(module, nn.Linear)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _record(self, name: str, module: nn.Linear, args: tuple) -> None:
        # the input is kept with its names, so its id cannot be reused by a later tensor
        self.calls.setdefault(id(args[0]), (args[0], []))[1].append(name)

    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The groups :func:`pack_linears` can pack, in call order: two or more linears called on
        the same tensor, with one ``in_features`` and dtype, all with a bias or all without."""
        modules = dict(self.model.named_modules())
        found = []
        for _, names in self.calls.values():
            names = list(dict.fromkeys(names))  # a module called twice on one input packs once
            kinds = {(modules[n].in_features, modules[n].weight.dtype, modules[n].bias is None) for n in names}
            if len(names) > 1 and len(kinds) == 1:
                found.append(tuple(names))
        return tuple(found)


def pack_linears(model: nn.Module, groups: tuple[tuple[str, ...], ...]) -> None:
    """Lay each group's weights (and biases) out as consecutive row blocks of one new tensor, in the
    group's order, and make the modules' parameters views of it.

    A group whose parameters another module shares too (tied weights) is left as it is: replacing
    them would untie them.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for names in groups:
        linears = [model.get_submodule(name) for name in names]
        params = [p for m in linears for p in (m.weight, m.bias) if p is not None]
        if any(uses[id(p)] > 1 for p in params):
            continue
        for attr in ("weight", "bias"):
            if getattr(linears[0], attr) is not None:
                _pack(linears, attr)


def _pack(linears: list[nn.Module], attr: str) -> None:
    parts = [getattr(m, attr) for m in linears]
    block = torch.cat([p.detach() for p in parts])
    start = 0
    for module, part in zip(linears, parts):
        rows = part.shape[0]
        # A view of the block, not nn.Parameter(view) (an alias that is no view): Dynamo fakes a view
        # from its base, while it fakes an alias at an offset with set_, which moves the fake's
        # version counter, and the graph runner would take the weight for one the graph writes.
        setattr(module, attr, block[start:start + rows].as_subclass(nn.Parameter))
        start += rows

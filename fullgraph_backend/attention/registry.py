"""The attention implementations, by name, and the choice behind ``attention_impl="auto"``.

Every implementation is a ``torch.library`` op with one signature::

    impl(q, k, v, kv_cache, query_start_loc, seq_lens, block_table, slot_mapping,
         scale: float, sliding_window: int) -> out   # mutates kv_cache

so the attention-swap pass and the eager path call them the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fullgraph_backend.library import define_op


IMPL_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor query_start_loc, Tensor seq_lens, "
               "Tensor block_table, Tensor slot_mapping, float scale, int sliding_window) -> Tensor")


def impl_op(name: str, *, flexible_layout: bool = False) -> Callable:
    """Define a function as the op ``fullgraph::<name>`` with the one implementation schema.

    Every implementation shares the signature above and the fake (its output is a contiguous
    tensor shaped like ``q``), so the swap pass and the eager path call any of them the same way.
    The decorated name becomes the op's default overload (``fullgraph_backend/library.py``: cheap
    dispatch between the graph pieces of -O2/-O3).

    ``flexible_layout=True``: the implementation reads ``q``, ``k`` and ``v`` through their
    strides, whatever they are, and returns a contiguous output. Inductor then passes them in the
    layout it computed them in, e.g. transformers' ``[heads, tokens, head_dim]`` RoPE output seen
    as ``[tokens, heads, head_dim]``, rather than copying each into the traced layout first (two
    launches a layer, docs/perf-notes.md, section 29).
    """
    def register(fn: Callable) -> torch._ops.OpOverload:
        return define_op(name + IMPL_SCHEMA, fn, lambda q, *rest: q.new_empty(q.shape),
                         flexible_layout=flexible_layout)

    return register


@dataclass(frozen=True)
class AttentionImpl:
    """One implementation: its op, where it runs, and whether decode graphs differ from mixed."""

    name: str
    op: Callable[..., torch.Tensor]
    device_types: tuple[str, ...]
    # True when the op runs another kernel in uniform-decode graphs, so those need their own key
    decode_variant: bool = False
    # returns why the impl cannot run in this environment, or None when it can
    unavailable: Callable[[], str | None] = lambda: None


def _reference() -> AttentionImpl:
    from fullgraph_backend.attention import reference

    return AttentionImpl("reference", reference.reference_attention, ("cpu", "cuda"))


def _triton() -> AttentionImpl:
    try:
        from fullgraph_backend.attention import triton_paged
    except ImportError as error:  # triton is an optional dependency
        reason = f"triton cannot be imported ({error}); pip install 'fullgraph[triton]'"
        return AttentionImpl("triton", _missing("triton", reason), ("cuda",), decode_variant=True,
                             unavailable=lambda: reason)
    return AttentionImpl("triton", triton_paged.triton_attention, ("cuda",), decode_variant=True)


def _flash_attn() -> AttentionImpl:
    from fullgraph_backend.attention import flash_attn

    return AttentionImpl("flash_attn", flash_attn.flash_attn_attention, ("cuda",), decode_variant=True,
                         unavailable=flash_attn.unavailable)


def _missing(name: str, reason: str) -> Callable[..., torch.Tensor]:
    def op(*args, **kwargs):
        raise RuntimeError(f"attention_impl={name!r} cannot run here: {reason}")

    return op


# name -> factory; factories import lazily so an impl's optional dependency loads only on use
_FACTORIES: dict[str, Callable[[], AttentionImpl]] = {
    "reference": _reference, "triton": _triton, "flash_attn": _flash_attn,
}


def impl_names() -> list[str]:
    """Every name ``attention_impl`` accepts."""
    return ["auto", *_FACTORIES]


def get_impl(name: str) -> AttentionImpl:
    """The implementation called ``name`` (not ``auto``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention_impl {name!r}; choose one of {impl_names()}")
    return _FACTORIES[name]()


def resolve_impl(name: str, device: torch.device) -> AttentionImpl:
    """Resolve ``auto`` for ``device`` and check that the chosen impl can run there."""
    if name == "auto":
        fast = device.type == "cuda" and "triton" in _FACTORIES and get_impl("triton").unavailable() is None
        name = "triton" if fast else "reference"
    impl = get_impl(name)
    if device.type not in impl.device_types:
        raise ValueError(f"attention_impl={name!r} does not run on {device.type}; "
                         f"use attention_impl='auto' or one of {impl_names()}")
    reason = impl.unavailable()
    if reason:
        raise ValueError(f"attention_impl={name!r} cannot run here: {reason}")
    return impl

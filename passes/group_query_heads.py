"""Decode SDPA over keys and values copied once per query head reads the shared heads instead.

Grouped-query attention (Llama, Qwen2, Mistral, Gemma) has fewer key/value heads than query heads.
Where transformers passes a mask to SDPA it cannot use ``enable_gqa``, so it copies every key/value
head once per query head of its group first (``repeat_kv``: ``kv[:, :, None].expand(...).reshape(...)``).
Over a static cache that copy is the step's largest elementwise kernel: at batch 8 with Llama-3.2-1B's
shapes it writes 4x the cache a layer, and SDPA then reads the copy.

With one query position the copy is not needed: the query heads of a group, laid out as the rows of
one query (``q.reshape(B, kv_heads, group, D)``), attend over their group's key/value head with the
mask's one row broadcast to each. Each head's scores, softmax and sum are those of the original call.
Longer queries (prefill) and causal SDPA keep the copy: their rows would need the mask repeated per
head, and ``is_causal`` ranks rows by position.

The grouped call runs on ``batch x kv_heads`` (sequence, head) pairs instead of ``batch x heads``. On
the H200 (Llama-3.2-1B's shapes, cuDNN's SDPA) that made a batch-8 step 0.18 ms faster (64 pairs) and
a batch-1 step 0.18 ms slower (8 pairs), so a call is grouped only where its batch is known and gives
at least :data:`MIN_GROUPED_PAIRS` (docs/perf-notes.md, section 40).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch._dispatch.python import enable_python_dispatcher

from passes.swap_attention import SDPA_TARGETS, fake_value
from passes.swap_linear import skipped_tail

SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
RESHAPES = ("reshape", "view")
# fewest (sequence, key/value head) pairs a grouped call may run on: 64 measured faster, 8 slower
MIN_GROUPED_PAIRS = 64


@dataclass
class QueryGroupReport:
    """The SDPA nodes that now read the shared key/value heads, and why each other SDPA kept its inputs."""

    grouped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many SDPA calls read the shared heads, what was skipped and why."""
        line = (f"grouped {len(self.grouped)} SDPA calls: query heads read their shared key/value head, "
                f"no per-head copy" if self.grouped else "no SDPA over per-head copies of keys and values")
        return line + skipped_tail(self.skipped)


def group_query_heads(gm: torch.fx.GraphModule, min_pairs: int | None = None) -> QueryGroupReport:
    """Rewrite each one-query-position SDPA of ``gm`` whose keys and values are per-head copies
    (``repeat_kv``) to read the shared heads, where its batch is known and the grouped call runs on at
    least ``min_pairs`` (sequence, key/value head) pairs (default :data:`MIN_GROUPED_PAIRS`; 0 groups at
    every batch); returns the report."""
    report = QueryGroupReport()
    graph = gm.graph
    min_pairs = MIN_GROUPED_PAIRS if min_pairs is None else min_pairs
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]:
        found = _grouped_call(node, min_pairs)
        if isinstance(found, str):
            report.skipped.append(f"{node.name}: {found}")
        elif found is not None:
            _rewrite(graph, node, *found)
            report.grouped.append(node.name)
    if report.grouped:
        graph.lint()
        gm.recompile()
    return report


def _sdpa_args(node: torch.fx.Node) -> dict:
    args = dict(zip(SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _value(node: object) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _shared_heads(copy: object) -> tuple[torch.fx.Node, int] | None:
    """``(x, group)`` if ``copy`` is ``x.expand(B, H, group, S, D).reshape(B, H * group, S, D)`` of an
    ``x`` shaped ``(B, H, 1, S, D)``: every head of ``x`` repeated ``group`` times in a row."""
    if not (isinstance(copy, torch.fx.Node) and copy.op == "call_method" and copy.target in RESHAPES):
        return None
    expanded = copy.args[0]
    if not (isinstance(expanded, torch.fx.Node) and expanded.op == "call_method" and expanded.target == "expand"):
        return None
    x = expanded.args[0]
    values = [_value(n) for n in (copy, expanded, x)]
    if any(v is None for v in values):
        return None
    out, wide, narrow = values
    if narrow.dim() != 5 or narrow.shape[2] != 1 or wide.dim() != 5 or out.dim() != 4:
        return None
    b, h, group, s, d = wide.shape
    if tuple(narrow.shape) != (b, h, 1, s, d) or tuple(out.shape) != (b, h * group, s, d):
        return None
    return x, group


def _grouped_call(node: torch.fx.Node, min_pairs: int) -> tuple | str | None:
    """What :func:`_rewrite` needs for an SDPA over per-head copies it can read without them; None for
    an SDPA over other keys and values; why not, for one over copies that does not fit or would run
    on fewer than ``min_pairs`` (sequence, key/value head) pairs."""
    args = _sdpa_args(node)
    keys, values = _shared_heads(args.get("key")), _shared_heads(args.get("value"))
    if keys is None or values is None:
        return None
    if keys[1] != values[1]:
        return "keys and values are repeated by different group sizes"
    query, mask = _value(args["query"]), args.get("attn_mask")
    if query is None or query.dim() != 4 or query.shape[2] != 1:
        return "more than one query position (prefill): its rows would need the mask copied per head"
    if args.get("is_causal", False) is not False or args.get("enable_gqa", False) is not False:
        return "is_causal or enable_gqa set"
    if args.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    mask_value = _value(mask)
    if mask is not None and (mask_value is None or mask_value.dim() != 4 or mask_value.shape[1] != 1):
        return "the mask is not one row per sequence, shared by every head ([B, 1, 1, S])"
    too_few = _too_few_pairs(query.shape[0], query.shape[1] // keys[1], min_pairs)
    if too_few:
        return too_few
    return args, keys[0], values[0], keys[1]


def _too_few_pairs(batch, kv_heads: int, min_pairs: int) -> str | None:
    """Why a grouped call on ``batch x kv_heads`` pairs could be slower than the copy it saves, if so."""
    if min_pairs <= 0:
        return None
    if not isinstance(batch, int):
        return (f"the batch is dynamic: grouped only where batch x {kv_heads} key/value heads is known to be "
                f">= {min_pairs} (fewer ran slower)")
    if batch * kv_heads < min_pairs:
        return f"batch {batch} x {kv_heads} key/value heads < {min_pairs} pairs: the grouped call would run slower"
    return None


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, args: dict, keys: torch.fx.Node, values: torch.fx.Node,
             group: int) -> None:
    """``sdpa(q, repeat(k), repeat(v), mask)`` -> ``sdpa(q as [B, kv_heads, group, D], k, v, mask
    broadcast to group rows)`` viewed back as ``[B, heads, 1, D]``; the copies' nodes go."""
    query = args["query"]
    heads, head_dim = _value(query).shape[1], _value(query).shape[3]
    mask = args.get("attn_mask")
    made = []
    with graph.inserting_before(node):
        def add(target, *call_args, method=True, **kwargs):
            made.append(graph.call_method(target, call_args, kwargs) if method
                        else graph.call_function(target, call_args, kwargs))
            return made[-1]

        rows = add("reshape", query, -1, heads // group, group, head_dim)
        shared_keys, shared_values = add("squeeze", keys, 2), add("squeeze", values, 2)
        if mask is not None:
            mask = add("expand", mask, -1, -1, group, -1)
        out = add(node.target, rows, shared_keys, shared_values, method=False, attn_mask=mask, dropout_p=0.0, is_causal=False,
                  scale=args.get("scale"))
        per_head = add("reshape", out, -1, heads, 1, head_dim)
    _trace(made, _value(query))
    per_head.meta.update({name: v for name, v in node.meta.items() if name != "example_value"})
    node.replace_all_uses_with(per_head)
    graph.erase_node(node)
    for copy in dict.fromkeys((args["key"], args["value"])):
        _erase_unread(graph, copy)


def _trace(nodes: list[torch.fx.Node], example: torch.Tensor) -> None:
    """Give each new node the value it computes on its inputs' fake values, as Dynamo traced the graph
    (later passes and the batch signature read them)."""
    mode = getattr(example, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext(), enable_python_dispatcher():
        for node in nodes:
            node.meta["example_value"] = fake_value(node)


def _erase_unread(graph: torch.fx.Graph, copy: torch.fx.Node) -> None:
    """Erase a per-head copy's reshape and expand (:func:`_shared_heads`) where nothing else reads them."""
    expanded = copy.args[0]
    for node in (copy, expanded):
        if not node.users:
            graph.erase_node(node)

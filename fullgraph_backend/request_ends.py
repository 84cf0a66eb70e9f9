"""The rows that end a request: where a step's next tokens are sampled, so the LM head runs there only.

``fullgraph_backend.request_ends(x)`` is the node models call on packed rows ``x [N, ...]``: the
index of each request's last token, for the first ``min(N, max_num_seqs)`` request lanes of the
active forward context. Lanes past the step's requests repeat its last token (the tail of
``query_start_loc`` repeats the total), so every index is a real row: harmless to compute, never
read. The count depends only on ``N`` and the context's size, so a graph captured at a padded
size serves every step of that size.
"""
from __future__ import annotations

import torch

from fullgraph_backend.forward_context import get_forward_context
from fullgraph_backend.library import define_decomposed


def ends_of(x: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    """``query_start_loc[1 : 1 + min(N, lanes)] - 1`` as int64: what the node computes, over the
    buffer compiled code reads (the swap pass puts this in the graph, so Inductor fuses it)."""
    n = torch.sym_min(x.shape[0], query_start_loc.shape[0] - 1)
    return query_start_loc.narrow(0, 1, n).to(torch.int64) - 1


# what the swap pass puts in a graph: :func:`ends_of` as an op, which AOTAutograd's cache accepts
ENDS_OF = define_decomposed("ends_of(Tensor x, Tensor query_start_loc) -> Tensor", ends_of)


@torch.library.custom_op("fullgraph::request_ends", mutates_args=())
def request_ends_node(x: torch.Tensor) -> torch.Tensor:
    """Eager body: :func:`ends_of` over the active context's ``query_start_loc``."""
    return ends_of(x, get_forward_context().metadata.query_start_loc)


@request_ends_node.register_fake
def _(x):
    return x.new_empty(torch.sym_min(x.shape[0], get_forward_context().max_num_seqs), dtype=torch.int64)


def request_ends(x: torch.Tensor) -> torch.Tensor:
    """Indices into ``x``'s rows (packed tokens) of each request's last token, in request order:
    ``min(len(x), max_num_seqs)`` of them, where lanes past the step's requests repeat its last
    token. ``x.index_select(0, request_ends(x))`` keeps the rows a step samples from."""
    return request_ends_node(x)

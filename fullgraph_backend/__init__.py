"""fullgraph: a torch.compile backend that runs the whole forward pass as one CUDA graph per size.

``torch.compile(model, backend="fullgraph")`` works after ``pip install`` (entry point); import
this package for the model-facing pieces: :func:`attention`, :class:`ForwardContext` and
:func:`use_forward_context`.
"""
from fullgraph_backend.attention import attention
from fullgraph_backend.forward_context import (AttentionMetadata, BatchKind, ForwardContext, get_forward_context,
                                               use_forward_context)
from fullgraph_backend.kv_cache import NULL_BLOCK, PAD_SLOT
from fullgraph_backend.request_ends import request_ends

__all__ = ["attention", "request_ends", "AttentionMetadata", "BatchKind", "ForwardContext", "get_forward_context",
           "use_forward_context", "NULL_BLOCK", "PAD_SLOT"]

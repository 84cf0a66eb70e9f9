"""Attention: the model-facing node, the implementations and their registry."""
from fullgraph_backend.attention.op import attention, attention_node
from fullgraph_backend.attention.registry import AttentionImpl, get_impl, impl_names, resolve_impl

__all__ = ["attention", "attention_node", "AttentionImpl", "get_impl", "impl_names", "resolve_impl"]

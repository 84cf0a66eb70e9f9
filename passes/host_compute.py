"""Find work a graph does on the CPU, which a CUDA graph would not repeat at replay.

A CUDA graph records device work only: a CPU op inside the graph runs once, at capture, and its
result is frozen. The one host step a replay can repeat is a copy from a CPU input to the device,
when that input sits in pinned memory the runner refills before every replay. So a graph for a
CUDA device is safe to capture when every CPU tensor in it is an input whose only uses are such
copies (transformers' static cache feeds its CPU position counter this way).
"""
from __future__ import annotations

import torch

from passes.batch_mixing import node_name

_COPIES_TO_DEVICE = ("to", "cuda")


def find_host_compute(gm: torch.fx.GraphModule, device: torch.device) -> list[str]:
    """Reasons (one per node) why ``gm`` cannot be captured in a CUDA graph on ``device``."""
    if device.type != "cuda":
        return []
    reasons = []
    for node in gm.graph.nodes:
        if node.op == "output" or not _on_cpu(node):
            continue
        if node.op != "placeholder":
            reasons.append(f"{node.name} ({node_name(node)}) computes on the CPU")
            continue
        for user in node.users:
            if not (user.op == "call_method" and user.target in _COPIES_TO_DEVICE and not _on_cpu(user)):
                reasons.append(f"CPU input {node.name} is used by {user.name} ({node_name(user)}) other than through a "
                               f"copy to the device")
    return reasons


def _on_cpu(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"

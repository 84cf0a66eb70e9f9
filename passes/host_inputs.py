"""Move CPU inputs of a CUDA graph to the device before the call, and find CPU work a graph would freeze.

A CUDA graph records device work only: a CPU op inside the graph runs once, at capture, and a
copy from the host blocks on the stream, which capture forbids. A CPU input whose only uses are
copies to the device (transformers' cache counters: ``cumulative_length.to(device)``) is made a
device input instead: the copies leave the graph and the runner moves the caller's tensor to the
device before each call. Any other CPU work keeps the graph out of CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from passes.batch_mixing import node_name

_COPIES_TO_DEVICE = ("to", "cuda")


@dataclass
class HostInputReport:
    """CPU inputs now read on the device (placeholder names), and why the graph cannot be captured."""

    moved: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per finding, for logs and dumps."""
        lines = [f"moved CPU input {name} to the device before each call" for name in self.moved]
        lines += [f"not capturable: {why}" for why in self.blockers]
        return "\n".join(lines) or "no CPU tensors"


def move_host_inputs(gm: torch.fx.GraphModule, device: torch.device) -> HostInputReport:
    """Rewrite ``gm`` in place for ``device``: each CPU placeholder of static shape used only by plain
    copies to ``device`` becomes a ``device`` placeholder (marked ``fullgraph_host_input``); report
    the CPU work left. Nothing to do off CUDA."""
    report = HostInputReport()
    if device.type != "cuda":
        return report
    for node in list(gm.graph.nodes):
        if node.op == "output" or not _on_cpu(node):
            continue
        if node.op != "placeholder":
            report.blockers.append(f"{node.name} ({node_name(node)}) computes on the CPU")
        elif _only_copied_to(node, device):
            written = [user for user in node.users if user.meta["example_value"]._version > 0]
            if written and len(node.users) > 1:  # one device input would alias copies eager keeps apart
                report.blockers.append(f"CPU input {node.name} is copied to the device more than once and the graph "
                                       f"writes a copy ({', '.join(user.name for user in written)})")
                continue
            _make_device_input(gm, node, next(iter(node.users)))
            report.moved.append(node.name)
        else:
            report.blockers.append(f"CPU input {node.name} is used on the CPU or by a device op without a copy")
    if report.moved:
        gm.graph.lint()
        gm.recompile()
    return report


def _only_copied_to(placeholder: torch.fx.Node, device: torch.device) -> bool:
    value = placeholder.meta["example_value"]
    if any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride())) or not placeholder.users:
        return False
    for user in placeholder.users:
        out = user.meta.get("example_value")
        if not (user.op == "call_method" and user.target in _COPIES_TO_DEVICE and isinstance(out, torch.Tensor)
                and out.device == device and out.dtype == value.dtype):
            return False
    return True


def _make_device_input(gm: torch.fx.GraphModule, placeholder: torch.fx.Node, copy: torch.fx.Node) -> None:
    """``placeholder`` becomes ``copy``, the device copy its users made (every one alike unless the
    graph writes it, then the only one): it takes the copy's traced value, so a write the graph makes
    to the copy (transformers' ``cumulative_length.to(device).add_(n)``) moved its version counter,
    and the input counts as one the graph writes (padding.input_role): the runner copies the write
    out into the device tensor it makes from the caller's, whose CPU tensor stays as it was, as
    eagerly (the write went to a copy)."""
    placeholder.meta["example_value"] = copy.meta["example_value"]
    placeholder.meta["fullgraph_host_input"] = True
    for user in list(placeholder.users):
        user.replace_all_uses_with(placeholder)
        gm.graph.erase_node(user)


def _on_cpu(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"

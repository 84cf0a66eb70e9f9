"""move_host_inputs: CPU inputs only copied to the device become device inputs; other CPU work is named.

Built on fake CUDA tensors, so it runs without a GPU (the GPU tests capture such graphs for real).
"""
from __future__ import annotations

import operator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fullgraph_backend.padding import input_role
from passes import move_host_inputs

CUDA = torch.device("cuda", 0)


def _graph(body):
    """A graph ``f(x on CUDA, s on the CPU)`` built by ``body(graph, x, s) -> output node``, with fake values."""
    mode = FakeTensorMode()
    graph = torch.fx.Graph()
    x, s = graph.placeholder("x"), graph.placeholder("s")
    with mode:
        x.meta["example_value"] = torch.empty(4, 3, device=CUDA)
        s.meta["example_value"] = torch.empty((), dtype=torch.float32)
        graph.output(body(graph, x, s))
    return torch.fx.GraphModule(torch.nn.Module(), graph), mode


def _node(graph, op, target, args, value):
    node = getattr(graph, op)(target, args)
    node.meta["example_value"] = value
    return node


def test_a_cpu_input_only_copied_to_the_device_becomes_a_device_input():
    def body(graph, x, s):
        moved = _node(graph, "call_method", "to", (s, CUDA), s.meta["example_value"].to(CUDA))
        return _node(graph, "call_function", operator.mul, (x, moved), x.meta["example_value"])

    gm, mode = _graph(body)
    with mode:
        report = move_host_inputs(gm, CUDA)
    assert report.moved == ["s"] and report.blockers == []
    s = next(n for n in gm.graph.nodes if n.name == "s")
    assert s.meta["example_value"].device == CUDA and s.meta["fullgraph_host_input"]
    assert not [n for n in gm.graph.nodes if n.target == "to"]  # the copy left the graph
    assert "moved CPU input s" in report.summary()


def test_cpu_work_is_named_and_the_graph_kept_as_is():
    def body(graph, x, s):
        doubled = _node(graph, "call_function", operator.mul, (s, 2), s.meta["example_value"] * 2)
        return _node(graph, "call_function", operator.mul, (x, doubled), x.meta["example_value"])

    gm, mode = _graph(body)
    before = gm.code
    with mode:
        report = move_host_inputs(gm, CUDA)
    assert report.moved == []
    assert any("computes on the CPU" in b for b in report.blockers)
    assert any("CPU input s is used on the CPU" in b for b in report.blockers)
    assert gm.code == before


def test_nothing_to_do_off_cuda():
    def body(graph, x, s):
        return _node(graph, "call_function", operator.mul, (x, s), x.meta["example_value"])

    gm, mode = _graph(body)
    assert move_host_inputs(gm, torch.device("cpu")).summary() == "no CPU tensors"


def _written_copy(graph, s, copies):
    """``copies`` device copies of ``s``, the first written in place (``add_``); returns their sum."""
    moved = [_node(graph, "call_method", "to", (s, CUDA), s.meta["example_value"].to(CUDA)) for _ in range(copies)]
    _node(graph, "call_method", "add_", (moved[0], 1), moved[0].meta["example_value"].add_(1))
    total = moved[0]
    for other in moved[1:]:
        total = _node(graph, "call_function", operator.add, (total, other), total.meta["example_value"] + 1)
    return total


def test_a_written_copy_makes_the_moved_input_one_the_graph_mutates():
    """transformers' static cache: ``cumulative_length.to(device).add_(n)``, the copy kept by the
    caller as the new counter. The write goes to the device input that replaces the copy, so the
    runner must treat that input as written (and copy the write out), or the counter stays 0."""
    gm, mode = _graph(lambda graph, x, s: _written_copy(graph, s, copies=1))
    with mode:
        report = move_host_inputs(gm, CUDA)
    assert report.moved == ["s"]
    s = next(n for n in gm.graph.nodes if n.name == "s")
    x = next(n for n in gm.graph.nodes if n.name == "x")
    assert input_role(s).mutated and input_role(s).host
    assert not input_role(x).mutated


def test_two_copies_one_written_stay_apart():
    gm, mode = _graph(lambda graph, x, s: _written_copy(graph, s, copies=2))
    before = gm.code
    with mode:
        report = move_host_inputs(gm, CUDA)
    assert report.moved == [] and gm.code == before
    assert any("copied to the device more than once" in b for b in report.blockers)

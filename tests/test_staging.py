"""StagedInputs: buffers at a padded size with the traced layout, copies in, writes copied back."""
from __future__ import annotations

import torch

from fullgraph_backend.padding import ArgKind
from fullgraph_backend.staging import InputPlan, Role, StagedInputs, aliased_writes

from test_padding import signature_of


def _staged(fn, size, n, dynamic=((0, 0),), **tensors):
    """The plan and the staging at ``size`` of ``fn``'s graph, first staged for ``tensors`` (by the
    names of ``fn``'s parameters) at batch size ``n``; and ``args_for(tensors, n)``, the graph's args
    in placeholder order for such a call."""
    sig, specs = signature_of(fn, *tensors.values(), dynamic=dynamic)

    def args_for(call_tensors, batch):
        return tuple(batch if spec.kind is ArgKind.SIZE else call_tensors[name.removeprefix("l_").removesuffix("_")]
                     for name, spec in specs.items())

    plan = InputPlan.of(sig)
    return args_for, plan, StagedInputs(sig, plan, size, args_for(tensors, n), produced=set())


def test_batch_dim_not_first_pads_that_dim():
    x = torch.randn(4, 7, 8)
    args_for, plan, staged = _staged(lambda x: x * 2, size=16, n=7, dynamic=((0, 1),), x=x)
    (i,) = plan.indices(Role.COPY)
    buffer = staged.reads[i]
    assert buffer.shape == (4, 16, 8) and buffer.stride() == (128, 8, 1)
    args = staged.stage(args_for({"x": x}, 7))
    assert args[i] is buffer and torch.equal(buffer[:, :7], x)


def test_transposed_input_keeps_traced_strides_at_every_size():
    x = torch.randn(8, 5).t()  # [5, 8], strides (1, 5)
    for size in (5, 7, 32):
        args_for, plan, staged = _staged(lambda x: x + 1, size=size, n=5, x=x)
        (buffer,) = staged.reads.values()
        assert buffer.shape == (size, 8) and buffer.stride() == (1, size)
        staged.stage(args_for({"x": x}, 5))
        assert torch.equal(buffer[:5], x)


def test_expanded_input_is_copied_once_per_element():
    """A stride-0 dim shares one element: copying every row into it would write overlapping memory."""
    row = torch.randn(1, 6)
    x = row.expand(5, 6)
    args_for, plan, staged = _staged(lambda x, y: x * y, size=8, n=5, dynamic=((0, 0), (1, 0)), x=torch.randn(5, 6), y=x)
    expanded = [t for t in staged.reads.values() if 0 in t.stride()]
    assert expanded, "the traced layout keeps the expanded dim"
    staged.stage(args_for({"x": torch.randn(5, 6), "y": x}, 5))
    assert torch.equal(expanded[0][0], row[0])


def test_write_back_copies_only_the_real_rows():
    def f(x, cache):
        cache.add_(x)
        return cache.sum(-1)

    x, cache = torch.randn(5, 3), torch.randn(5, 3)
    args_for, plan, staged = _staged(f, size=8, n=5, dynamic=((0, 0), (1, 0)), x=x, cache=cache)
    assert len(plan.write_back) == 1  # the cache: the graph writes it, x only read
    (w,) = plan.write_back
    call = args_for({"x": x, "cache": cache}, 5)
    args = staged.stage(call)
    assert args[w].shape == (8, 3)
    args[w].add_(1.0)  # what the graph would do
    before = cache.clone()
    staged.write_back(call)
    torch.testing.assert_close(cache, before + 1.0)


def test_aliased_inputs_with_a_write_are_named():
    base = torch.randn(5, 4)

    def f(a, b):
        a.mul_(2)
        return b + 1

    sig, _ = signature_of(f, base, base[:, :2], dynamic=())
    reasons = aliased_writes(sig, [base, base[:, :2]], ["l_a_", "l_b_"])
    assert reasons and "share memory" in reasons[0] and "l_a_" in reasons[0]
    read_only, _ = signature_of(lambda a, b: a + b.sum(), base, base[:, :2], dynamic=())
    assert aliased_writes(read_only, [base, base[:, :2]], ["l_a_", "l_b_"]) == []

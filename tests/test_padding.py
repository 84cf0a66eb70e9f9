"""BatchSignature: which graph args are batched, static buffers viewed at every size, output slicing."""
from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn as nn

from fullgraph_backend import compat
from fullgraph_backend.padding import ArgKind, BatchSignature
from helpers import dynamo_graph


def signature_of(fn, *args, dynamic=((0, 0),)):
    """The BatchSignature of the graph Dynamo hands a backend, read while Dynamo is calling it, by placeholder name."""
    def read(gm, example_inputs):
        gm = compat.copy_dynamo_graph(gm)
        return BatchSignature.of(gm), [n.name for n in gm.graph.nodes if n.op == "placeholder"]

    sig, names = dynamo_graph(fn, *args, dynamic=dynamic, read=read)
    return sig, dict(zip(names, sig.inputs))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("shift", torch.ones(8))

    def forward(self, x, scale):
        return self.lin(x) * scale + self.shift, x.shape[0]


def _kind(specs, fragment):
    (spec,) = [s for name, s in specs.items() if fragment in name]
    return spec


def test_arg_kinds_of_a_dynamo_graph():
    sig, specs = signature_of(_Model().eval(), torch.randn(5, 8), torch.randn(8))
    assert sig.paddable and sig.why_not_paddable is None and not sig.is_static
    assert isinstance(sig.symbol, sympy.Symbol)
    assert _kind(specs, "weight").kind is ArgKind.STATIC
    assert _kind(specs, "bias").kind is ArgKind.STATIC
    assert _kind(specs, "x").kind is ArgKind.BATCHED
    assert _kind(specs, "x").batch_dims == (0,)
    assert _kind(specs, "x").shape == (sig.symbol, 8)
    assert _kind(specs, "scale").kind is ArgKind.COPIED  # a tensor argument without batch dim
    (size,) = [s for s in specs.values() if s.kind is ArgKind.SIZE]
    assert [s.kind for s in sig.outputs] == [ArgKind.BATCHED, ArgKind.SIZE]


def test_module_buffers_are_static():
    """Buffers are module state like parameters: read in place (a model may update them in place)."""
    sig, specs = signature_of(_Model().eval(), torch.randn(5, 8), torch.randn(8))
    assert _kind(specs, "shift").kind is ArgKind.STATIC


def test_module_buffers_are_static_after_dynamo_returns():
    """The backend's own copy of the graph is read again later (e.g. piecewise pieces): the classification
    must not depend on Dynamo's transient ``grapharg`` metadata."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(compat.copy_dynamo_graph(gm))
        return gm.forward

    x = torch.randn(5, 8)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.inference_mode():
        torch.compile(_Model().eval(), backend=backend)(x, torch.randn(8))
    sig = BatchSignature.of(graphs[0])
    names = [n.name for n in graphs[0].graph.nodes if n.op == "placeholder"]
    specs = dict(zip(names, sig.inputs))
    assert _kind(specs, "shift").kind is ArgKind.STATIC
    assert _kind(specs, "weight").kind is ArgKind.STATIC


def test_batch_dim_not_first():
    sig, specs = signature_of(lambda x: x * 2, torch.randn(4, 5, 8), dynamic=((0, 1),))
    spec = _kind(specs, "x")
    s = sig.symbol
    assert spec.kind is ArgKind.BATCHED and spec.batch_dims == (1,)
    assert spec.shape == (4, s, 8) and spec.stride == (8 * s, 8, 1)
    assert sig.batch_size([torch.randn(4, 7, 8) if k.kind is ArgKind.BATCHED else 7 for k in sig.inputs]) == 7


def test_transposed_input_keeps_traced_strides():
    sig, specs = signature_of(lambda x: x + 1, torch.randn(8, 5).t())  # [s, 8] with strides (1, s)
    spec = _kind(specs, "x")
    assert spec.batch_dims == (0,) and spec.stride == (1, sig.symbol)
    assert sig.at(spec.stride, 32) == (1, 32)


def test_several_batched_inputs_share_the_symbol():
    sig, specs = signature_of(lambda x, y: x + y.sum(-1, keepdim=True), torch.randn(5, 3), torch.randn(5, 4),
                              dynamic=((0, 0), (1, 0)))
    assert sig.paddable
    assert {k: s.batch_dims for k, s in specs.items() if s.kind is ArgKind.BATCHED} == {"l_x_": (0,), "l_y_": (0,)}


def test_two_dynamic_sizes_are_not_paddable():
    sig, _ = signature_of(lambda x, y: (x * 2, y * 2), torch.randn(5, 3), torch.randn(6, 3), dynamic=((0, 0), (1, 0)))
    assert not sig.paddable and sig.symbol is None
    assert "2 dynamic sizes" in sig.why_not_paddable


def test_derived_batch_dim_is_not_paddable():
    sig, _ = signature_of(lambda x: x.reshape(-1), torch.randn(5, 3))
    assert not sig.paddable
    assert "not the batch size itself" in sig.why_not_paddable
    assert sig.outputs[0].kind is ArgKind.BATCHED


def test_static_graph():
    sig, specs = signature_of(lambda x: x * 2, torch.randn(5, 3), dynamic=())
    assert sig.is_static and sig.symbol is None
    assert all(s.kind is ArgKind.COPIED for s in specs.values())
    assert sig.batch_size([torch.randn(5, 3)]) is None


def test_slice_outputs():
    sig, _ = signature_of(lambda x, w: (x * 2, x.transpose(0, 1) + 1, w + 1, x.shape[0]),
                          torch.randn(5, 3), torch.randn(4))
    kinds = [s.kind for s in sig.outputs]
    assert kinds == [ArgKind.BATCHED, ArgKind.BATCHED, ArgKind.COPIED, ArgKind.SIZE]
    assert sig.outputs[1].batch_dims == (1,)
    padded = (torch.randn(8, 3), torch.randn(3, 8), torch.randn(4), 8)
    a, b, w, n = sig.slice_outputs(padded, 5)
    assert a.shape == (5, 3) and torch.equal(a, padded[0][:5])
    assert a.data_ptr() == padded[0].data_ptr()  # a view, no copy
    assert b.shape == (3, 5) and torch.equal(b, padded[1][:, :5])
    assert w is padded[2]
    assert n == 5


def test_slice_outputs_of_derived_batch_dim_keeps_every_row():
    """An output of shape [3 * s] at size 5 has 15 rows; slicing must not cut it to 5."""
    sig, _ = signature_of(lambda x: x.reshape(-1), torch.randn(5, 3))
    (out,) = sig.slice_outputs((torch.randn(15),), 5)
    assert out.shape == (15,)


@pytest.mark.parametrize("size", [1, 5, 16])
def test_at_substitutes_the_symbol(size):
    sig, specs = signature_of(lambda x: x * 2, torch.randn(4, 5, 8), dynamic=((0, 1),))
    spec = _kind(specs, "x")
    assert sig.at(spec.shape, size) == (4, size, 8)
    assert sig.at(spec.stride, size) == (8 * size, 8, 1)


# ---- outputs bounded by a limit: request_ends' Min(s, lanes) rows ------------------------------
def _limited(out_fn, batch=(6, 4), extra=None):
    """The signature of ``out_fn(x, qsl[, y])``'s outputs, ``x`` batched (an unbacked size, as the
    engine marks its tokens), ``qsl`` a forward-context buffer whose length is a limit (as the
    attention swap makes it), ``y`` (``extra``) an ordinary input with a size of its own."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fullgraph_backend.padding import InputRole

    mode = FakeTensorMode(shape_env=ShapeEnv())
    inputs = [compat.fake_with_unbacked_dims(mode, torch.zeros(batch), "x", (0,)),
              compat.fake_with_unbacked_dims(mode, torch.zeros(9, dtype=torch.int32), "fg_query_start_loc", (0,))]
    roles = [InputRole(), InputRole(static=True, forward_context=True)]
    if extra is not None:
        inputs.append(compat.fake_with_unbacked_dims(mode, torch.zeros(extra), "y", (0,)))
        roles.append(InputRole())
    with mode:
        outputs = out_fn(*inputs)
    return BatchSignature(inputs, list(outputs) if isinstance(outputs, tuple) else [outputs], roles)


def _lanes(x, qsl):
    from fullgraph_backend.request_ends import ends_of

    return x.index_select(0, ends_of(x, qsl))  # Min(s, u - 1) rows


@pytest.mark.parametrize("out_fn", [
    _lanes,
    lambda x, qsl: x.narrow(0, 0, torch.sym_min(qsl.shape[0], x.shape[0])),  # Min(u, s): the other order, c = 0
    lambda x, qsl: (x * 2, _lanes(x, qsl).t()),  # beside a plain batched output; the bound dim not first
])
def test_rows_bounded_by_a_forward_context_limit_are_paddable(out_fn):
    sig = _limited(out_fn)
    assert sig.paddable and sig.why_not_paddable is None, sig.why_not_paddable
    assert all(sig.symbol in spec.shape[d].free_symbols for spec in sig.outputs for d in spec.batch_dims)
    assert all(spec.kind is ArgKind.BATCHED for spec in sig.outputs)


@pytest.mark.parametrize("size, lanes, rows", [(5, 8, 5), (20, 8, 8), (20, 3, 3), (8, 8, 8)])
def test_rows_bounded_by_a_limit_are_sliced_to_the_limit_of_the_call(size, lanes, rows):
    """``Min(n, len(qsl) - 1)``, ``len(qsl)`` read off the call's buffer (a limit changed since the
    compile is read, not the compile-time length)."""
    sig = _limited(lambda x, qsl: (_lanes(x, qsl), x * 2))
    padded = (torch.randn(min(32, lanes), 4), torch.randn(32, 4))
    args = (torch.randn(size, 4), torch.zeros(lanes + 1, dtype=torch.int32))
    lanes_out, plain = sig.slice_outputs(padded, size, args)
    assert lanes_out.shape == (rows, 4) and lanes_out.data_ptr() == padded[0].data_ptr()
    assert plain.shape == (size, 4)


@pytest.mark.parametrize("out_fn, why", [
    # Min(s, 16), a constant bound: user code's x[:16] or x[-16:] alike, and padding moves the rows of the second
    (lambda x, qsl: x.narrow(0, 0, torch.sym_min(x.shape[0], 16)), "not the batch size itself"),
    (lambda x, qsl: x.narrow(0, 1, x.shape[0] - 1), "not the batch size itself"),  # s - 1
    (lambda x, qsl, y: x.narrow(0, 0, torch.sym_min(x.shape[0], y.shape[0])), "2 dynamic sizes"),  # Min(s, s2)
    (lambda x, qsl: x.narrow(0, 0, torch.sym_min(x.shape[0], 2 * qsl.shape[0] - 3)), "2 dynamic sizes"),  # not u + c
    (lambda x, qsl: _lanes(x, qsl).reshape(-1), "2 dynamic sizes"),  # 4 * Min(s, u - 1): not a bound alone
    (lambda x, qsl: qsl[: qsl.shape[0] - 1], "2 dynamic sizes"),  # u - 1 alone: a limit is no batch size
])
def test_near_misses_of_a_limit_bound_stay_unpaddable(out_fn, why):
    sig = _limited(out_fn, extra=(7, 4) if out_fn.__code__.co_argcount == 3 else None)
    assert not sig.paddable
    assert why in sig.why_not_paddable, sig.why_not_paddable


def test_a_limit_bound_input_or_size_is_not_paddable():
    """Only outputs may have limit-bounded rows: a returned size expression stays refused."""
    sig = _limited(lambda x, qsl: (x * 2, torch.sym_min(x.shape[0], qsl.shape[0] - 1)))
    assert not sig.paddable

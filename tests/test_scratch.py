"""Kept scratch (fullgraph_backend/scratch.py): one set of buffers per graph runner, so two compiled
models running at once on two CUDA streams never write the same split partials or tickets."""
from __future__ import annotations

import torch

from fullgraph_backend import scratch
from fullgraph_backend.scratch import kept_buffers, owned_by

_TABLE: dict = {}  # the probe op's process-wide table, as a kernel module keeps one


def _buffers(width: int, table: dict = _TABLE) -> tuple[torch.Tensor, ...]:
    return kept_buffers(table, (width,), torch.device("cpu"), lambda: (torch.zeros(width),), "probe")


def test_an_owner_keeps_its_own_buffers_and_the_process_table_the_rest():
    table, mine, theirs = {}, {}, {}
    with owned_by(mine):
        first = _buffers(4, table)
        assert _buffers(4, table)[0] is first[0]  # found again, not made again
        with owned_by(theirs):
            other = _buffers(4, table)
        assert _buffers(4, table)[0] is first[0]  # the outer owner again after the inner block
    unowned = _buffers(4, table)
    assert len({id(first[0]), id(other[0]), id(unowned[0])}) == 3
    assert list(table) == [(torch.device("cpu"), 4)]  # only the unowned entry is the module's
    assert list(mine) == list(theirs) == [id(table)]


_probe_lib = torch.library.Library("fullgraph_scratch_test", "DEF")
_probe_lib.define("probe(Tensor x) -> Tensor")
SEEN: list[int] = []  # data_ptr of the buffer each probe call used


def _probe(x: torch.Tensor) -> torch.Tensor:
    (buf,) = _buffers(x.shape[-1])
    SEEN.append(buf.data_ptr())
    return x + buf


_probe_lib.impl("probe", _probe, "CompositeExplicitAutograd")
torch.library.register_fake("fullgraph_scratch_test::probe", lambda x: torch.empty_like(x), lib=_probe_lib)


class Probing(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fullgraph_scratch_test.probe(x * 2) + 1


def test_two_compiled_models_never_share_a_buffer(capture_backend):
    """Each model's graphs (warm-up, capture, replays) use one buffer of their own, and none is the
    process table's: with one shared set, two models replaying at once on two streams would race.
    Both models stay alive throughout, so no buffer address is reused between them."""
    _TABLE.clear()
    backends = {name: capture_backend() for name in ("draft", "target")}
    models = {name: torch.compile(Probing(), backend=backend) for name, backend in backends.items()}
    seen = {name: set() for name in models}
    for batch in (3, 5, 3, 7):
        for name, model in models.items():
            SEEN.clear()
            x = torch.randn(batch, 8)
            torch._dynamo.mark_dynamic(x, 0)  # one graph, one runner, for every batch
            torch.testing.assert_close(model(x), x * 2 + 1)
            seen[name].update(SEEN)
    assert all(len(b.runners) == 1 and b.runner.use_graphs for b in backends.values())  # replayed graphs
    assert len(seen["draft"]) == len(seen["target"]) == 1, seen  # one buffer a model, every call
    assert seen["draft"] != seen["target"]
    assert not _TABLE, "a compiled model's launches took the process table"
    assert scratch._OWNER.get() is None

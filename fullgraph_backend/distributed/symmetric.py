"""Small all-reduces as one-shot reads of the other GPUs' memory, for tensor-parallel decode.

A decode step of a tensor-parallel model runs two all-reduces of ``[tokens, hidden]`` a layer. At
a few tokens they carry kilobytes, and NCCL's all-reduce costs about 11.5 us each inside a CUDA
graph on two H200s (docs/perf-notes.md, section 24): latency, not bandwidth. One shot: every rank
copies its input into a buffer that every other rank can read over NVLink (torch's symmetric
memory: peer-to-peer mappings, no multicast), the ranks meet at a barrier in device memory, and
each sums all the ranks' buffers itself. One kernel, no proxy thread, nothing for the host to do,
so it captures into a graph like any kernel.

The buffer is allocated once per (process group, dtype) at the engine's start (:func:`set_up`,
every rank in step) and every all-reduce of a step reuses it: the kernel's closing barrier keeps a
rank from overwriting it while a peer still reads. Inputs above :data:`ONE_SHOT_MAX_BYTES` (prefill
chunks), and every all-reduce where the buffer could not be made, go to NCCL through the same op,
so what a rank captures depends only on the size, which every rank shares.

Torch's CUDA symmetric memory exchanges the buffers' handles through the group's store under keys
numbered by one counter a process, which each exchange advances. A worker starts at 0, but rank 0
keeps its count from the engines it made before, so the second tensor-parallel engine of a process
would wait forever for keys its workers never write (two H200s, 2026-11-30: the -O2 GPU test after
the -O4 ones). :func:`rendezvous_count` lets the ranks compare before they try.
"""
from __future__ import annotations

import torch

from fullgraph_backend.library import define_op

# past this, one shot reads too much over the links for its saved latency to pay (untuned: two GPUs
# at 8B shapes put 32 tokens here, a decode batch; a 512-token prefill chunk goes to NCCL)
ONE_SHOT_MAX_BYTES = 256 * 1024

_c10d = torch.ops._c10d_functional
_BUFFERS: dict[tuple[str, torch.dtype], torch.Tensor] = {}
_rendezvous_tried = 0  # set_up calls of this process that reached torch's handle exchange


def rendezvous_count() -> int:
    """How many symmetric-memory rendezvous this process has tried: ranks whose counts differ
    would wait on each other's store keys forever (see the module's docstring)."""
    return _rendezvous_tried


def set_up(group: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Allocate and exchange the one-shot buffer of ``group`` for ``dtype`` tensors; every rank of
    the group calls it together. Returns why it could not (None when it did)."""
    global _rendezvous_tried
    if device.type != "cuda":
        return f"one-shot all-reduce needs CUDA devices, not {device.type}"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(ONE_SHOT_MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        _rendezvous_tried += 1  # counted even if it fails: the exchange may have advanced torch's keys
        symm_mem.rendezvous(buffer, group)
    except Exception as error:  # noqa: BLE001 - any failure leaves NCCL doing every all-reduce
        return f"{type(error).__name__}: {error}"
    _BUFFERS[(group, dtype)] = buffer
    return None


def release(group: str) -> None:
    """Drop ``group``'s buffers (after the graphs that read them, before the group is left)."""
    for key in [k for k in _BUFFERS if k[0] == group]:
        del _BUFFERS[key]


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    x = x.contiguous()
    buffer = _BUFFERS.get((group, x.dtype))
    if buffer is None or x.numel() > buffer.numel():
        return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", group))
    out = torch.empty_like(x)
    return torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer[:x.numel()].view_as(x), x, "sum", group, out)


one_shot_all_reduce = define_op("one_shot_all_reduce(Tensor x, str group) -> Tensor", _all_reduce,
                                lambda x, group: torch.empty_like(x, memory_format=torch.contiguous_format))

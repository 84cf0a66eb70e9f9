"""Small host-to-device copies that never wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which synchronises with the
stream first: with a step in flight, that would stall the host until the GPU is idle and undo
asynchronous scheduling. Staging through pinned memory keeps the copy queued behind the stream.
"""
from __future__ import annotations

from typing import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied without a host-device synchronisation."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    # the caching host allocator keeps the pinned block alive until the queued copy has read it
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)

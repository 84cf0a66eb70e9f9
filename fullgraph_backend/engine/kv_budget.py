"""How many KV-cache blocks the engine allocates.

- ``num_kv_blocks`` given (vLLM's ``num_gpu_blocks_override``): exactly that many, reserved
  blocks included.
- CUDA: what ``gpu_memory_utilization`` of the card leaves after everything already allocated
  (weights, other processes) and twice the peak activation memory of one eager step at
  ``max_num_batched_tokens`` (once for the graph pool, once for non-graph runs and sampling).
- CPU: a fixed budget of :data:`CPU_KV_CACHE_BYTES` (1 GiB).

Never more than every request at full length needs (``max_num_seqs`` x ``max_model_len``, plus
the reserved blocks): a larger cache could not be used, and memory stays free for others.
"""
from __future__ import annotations

import math

import torch

from fullgraph_backend.models import DecoderConfig

CPU_KV_CACHE_BYTES = 1 << 30


def block_bytes(model: DecoderConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers: K and V, ``block_size`` tokens."""
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * dtype.itemsize


def num_kv_blocks(model: DecoderConfig, *, block_size: int, dtype: torch.dtype, device: torch.device,
                  max_num_seqs: int, max_model_len: int, num_reserved: int, override: int | None = None,
                  gpu_memory_utilization: float = 0.9, activation_bytes: int = 0) -> int:
    """The number of blocks to allocate (reserved ones included); an error if none are left."""
    if override is not None:
        return override
    per_block = block_bytes(model, block_size, dtype)
    enough = max_num_seqs * math.ceil(max_model_len / block_size) + num_reserved
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * gpu_memory_utilization - (total - free) - 2 * activation_bytes
        where = (f"{gpu_memory_utilization:.2f} x {total / 2**30:.1f} GiB, minus {(total - free) / 2**30:.2f} GiB "
                 f"in use and 2 x {activation_bytes / 2**30:.2f} GiB of activations")
    else:
        budget, where = CPU_KV_CACHE_BYTES, f"the CPU budget of {CPU_KV_CACHE_BYTES / 2**30:.1f} GiB"
    blocks = min(enough, int(budget // per_block))
    if blocks <= num_reserved:
        raise ValueError(f"no room for the KV cache: {where} leaves {max(budget, 0) / 2**20:.0f} MiB, blocks are "
                         f"{per_block / 2**20:.2f} MiB; raise gpu_memory_utilization, lower "
                         f"max_num_batched_tokens, or set num_kv_blocks")
    return blocks

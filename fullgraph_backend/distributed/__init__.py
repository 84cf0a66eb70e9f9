"""Tensor parallelism: our decoder split over ranks (:mod:`~fullgraph_backend.distributed.layers`)
and the processes that run the ranks (:mod:`~fullgraph_backend.distributed.processes`).

The engine uses both through ``LLM(..., tensor_parallel_size=N)`` (:mod:`fullgraph_backend.engine.parallel`).
"""
from fullgraph_backend.distributed.layers import (Shard, TensorParallel, check_tensor_parallel, rank_cache_config,
                                                  shard_decoder)

__all__ = ["Shard", "TensorParallel", "check_tensor_parallel", "rank_cache_config", "shard_decoder"]

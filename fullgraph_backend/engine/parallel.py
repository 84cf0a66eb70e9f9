"""The engine on several processes: ``LLM(..., tensor_parallel_size=N)``.

Rank 0 (the process that builds the ``LLM``) schedules; every rank runs each step on its part of
the model (:mod:`fullgraph_backend.distributed.layers`), with the collectives inside its graphs.

- :func:`start`, in ``LLM.__init__``: checks the model splits over ``N`` ranks, then starts the
  other ranks (:func:`~fullgraph_backend.distributed.processes.spawn`), or joins the ranks torchrun
  started, where rank ``r > 0`` serves and then ends its process (``SystemExit(0)``): the program's
  code after ``LLM(...)`` runs on rank 0 only.
- :func:`serve`: a worker's life: build its runner as rank 0 does (the same KV blocks, graphs and
  warm-up, in step), then run every :class:`~fullgraph_backend.engine.model_runner.Step` rank 0
  sends until it sends the stop.
- Rank 0's :class:`~fullgraph_backend.engine.model_runner.ModelRunner` sends each step before it
  runs it; the step carries everything a rank needs, so workers keep no request state.

Sampling happens on every rank, alike: the LM head gathers the full logits inside the graph, and
each rank's sampler, seeded as rank 0's, draws the same tokens from them. That needs no collective
after the graph, and leaves each step's tokens on every rank's device, where the next step reads
a token still being sampled (asynchronous scheduling). Rank 0's tokens are the ones read back.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback

from fullgraph_backend.distributed.layers import check_tensor_parallel
from fullgraph_backend.distributed.processes import (ParallelGroup, from_torchrun, join_spawned, spawn,
                                                     torchrun_rank)
from fullgraph_backend.engine.config import EngineConfig
from fullgraph_backend.engine.loader import decoder_config
from fullgraph_backend.engine.model_runner import build_runner

WORKER_ENTRY = f"{__name__}:worker_main"


def start(config: EngineConfig) -> ParallelGroup | None:
    """Rank 0's group of ``config.tensor_parallel_size`` processes, or None for one process.

    A model that does not split over that many ranks is a ValueError before any process starts.
    Under torchrun, on a rank other than 0, serves rank 0 and then exits the process.
    """
    size = config.tensor_parallel_size
    if size == 1:
        return None
    model = decoder_config(config.model, config.model_impl)
    if model is None:
        raise ValueError(f"tensor_parallel_size={size} runs fullgraph's own decoder (Llama, Qwen2) only, and "
                         f"{config.model} needs transformers' modeling code; use tensor_parallel_size=1")
    check_tensor_parallel(model, size)
    device_type = config.torch_device.type
    if torchrun_rank() is None:
        return spawn(size, device_type, config, WORKER_ENTRY)
    group = from_torchrun(size, device_type)
    if group.is_driver:
        return group
    serve(config, group)
    raise SystemExit(0)


def serve(config: EngineConfig, group: ParallelGroup) -> None:
    """A worker: build the runner and warm up in step with rank 0, run its steps until it stops."""
    runner = build_runner(config, group)[2]
    runner.warm_up()
    while (step := group.receive()) is not None:
        runner.run(step)
    group.close()


def worker_main() -> None:
    """The entry of a worker the engine started: join, serve; an error goes to rank 0, then exit 1."""
    group, config = join_spawned()
    try:
        serve(config, group)
    except BaseException:
        group.report(traceback.format_exc())
        # Not sys.exit: interpreter teardown destroys process groups with a collective still
        # pending, which aborts the process (-6) and hides the exit code rank 0 reports.
        sys.stderr.flush()
        os._exit(1)


def lockstep(group: ParallelGroup | None) -> contextlib.AbstractContextManager:
    """Rank 0, around what every rank does in step: :meth:`ParallelGroup.lockstep`; nothing for one process."""
    return contextlib.nullcontext() if group is None else group.lockstep()

"""The processes of one tensor-parallel engine: started, linked by torch.distributed, stopped.

Rank 0 is the process that builds the ``LLM``. It starts ranks 1..N-1 itself (:func:`spawn`: new
Python processes through ``subprocess``, so a script needs no ``if __name__ == "__main__"`` guard;
each reads its rank, the rendezvous and a payload from its standard input), or ``torchrun`` starts
all N (:func:`from_torchrun`). A rank computes on ``cuda:<local rank>``, or on the CPU.

Two process groups link the ranks:

- the model's: NCCL on GPUs, gloo on CPU. The collectives inside the compiled graphs use it
  (:mod:`fullgraph_backend.distributed.layers`); they give up after :data:`COLLECTIVE_TIMEOUT`.
- the steps': gloo, on the host. Rank 0 sends each step's description (:meth:`ParallelGroup.send`,
  a pickled object through ``broadcast_object_list``); the others wait for it
  (:meth:`ParallelGroup.receive`) as long as rank 0 sits idle (:data:`STEP_WAIT`).

Failures do not leave a rank waiting forever:

- A worker that raises writes its traceback into the rendezvous store and exits; a killed one just
  exits. Rank 0 sees the exit before each step and while it waits for a step's tokens
  (:meth:`ParallelGroup.check`), or gloo reports the closed connection inside a collective; either
  way it raises :class:`WorkerDied` with the worker's error. On GPUs, a collective waiting for a
  dead peer inside a CUDA graph is seen through the exit, while rank 0 waits for the step's tokens.
- An error on rank 0 between sending a step and finishing it (or while the ranks start up in step)
  leaves the ranks at different collectives: :meth:`ParallelGroup.lockstep` then shuts the workers
  down and leaves the groups, and the error says so.
- Rank 0 exiting or dying closes the gloo connections: a worker waiting for a step gets an error
  and exits.
- :meth:`ParallelGroup.close` (the ``LLM``'s finaliser: the engine deleted or the interpreter
  exiting) tells the workers to stop, waits :data:`EXIT_WAIT` seconds and kills what is left.

A rank that seems stuck can be asked where it is: ``kill -USR1 <worker pid>`` prints every thread's
Python stack to the worker's standard error (:data:`STACKS_SIGNAL`), and the worker goes on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from fullgraph_backend import compat
from fullgraph_backend.distributed import symmetric
from fullgraph_backend.distributed.layers import TensorParallel

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # longer than ranks' compile times differ
STEP_WAIT = datetime.timedelta(days=365)  # a worker waits for the next step as long as rank 0 is idle
EXIT_WAIT = 10.0  # seconds a worker gets to exit after the stop message
ABORT_WAIT = 30.0  # seconds rank 0 gives its teardown after a worker died before it raises regardless
_ERROR_KEY = "fullgraph/error/{}"
_READY_KEY = "fullgraph/ready/{}"
_LEAVING_KEY = "fullgraph/leaving/{}"  # a worker got the stop message and leaves the groups now
_STOP = None  # the step message that ends a worker's loop
STACKS_SIGNAL = getattr(signal, "SIGUSR1", None)  # a worker prints its threads' stacks on it (POSIX)

log = logging.getLogger("fullgraph")


class WorkerDied(RuntimeError):
    """A tensor-parallel worker process ended while the engine needed it."""


class ParallelGroup:
    """One rank's view of the engine's processes: its place, the groups, and on rank 0 the workers."""

    def __init__(self, rank: int, size: int, device: torch.device, steps: Any, *,
                 store: Any = None, workers: dict[int, subprocess.Popen] | None = None,
                 owns_default_group: bool = True) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.tp = TensorParallel(rank, size, dist.group.WORLD.group_name)
        self._steps, self._store, self._workers = steps, store, workers or {}
        # the default group this engine made, left when it closes (not another engine's, made later)
        self._world = dist.group.WORLD if owns_default_group else None
        self._broken: str | None = None  # why the workers were shut down, once they were
        self._closed = False
        self._before_leaving: list[Callable[[], None]] = []

    @property
    def worker_pids(self) -> dict[int, int]:
        """Rank 0: the process id of each worker it started, by rank (none under torchrun)."""
        return {rank: proc.pid for rank, proc in self._workers.items()}

    @property
    def is_driver(self) -> bool:
        """Whether this is rank 0: the one that schedules and sends the steps."""
        return self.rank == 0

    # ---- steps ---------------------------------------------------------------------------------
    def send(self, message: Any) -> None:
        """Rank 0: send ``message`` (one step's description) to every other rank."""
        dist.broadcast_object_list([message], src=0, group=self._steps)

    def receive(self) -> Any:
        """A worker: wait for rank 0's next message; None when rank 0 stops the engine."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self._steps)
        return box[0]

    @contextlib.contextmanager
    def lockstep(self) -> Iterator[None]:
        """Rank 0, around work every rank does in step (starting up; sending a step and running it):
        an error inside leaves the ranks at different collectives, so the workers are shut down; a
        worker's death becomes a :class:`WorkerDied` with its error. Raises at once if the workers are
        down already."""
        if self._broken:
            raise RuntimeError(f"fullgraph: the tensor-parallel workers were shut down ({self._broken}); "
                               f"create a new LLM")
        self.check()
        try:
            yield
        except BaseException as error:
            # a gloo error is often the first sign of a worker's exit: give its report a moment to land
            died = self._dead_worker(wait=2.0 if isinstance(error, RuntimeError) else 0.0)
            self._shut_down(str(died) if died else f"after {type(error).__name__} on rank 0")
            if died is not None:
                raise died from error
            error.add_note("fullgraph: the error stopped rank 0 between collectives the other ranks run too: "
                           "the tensor-parallel workers were shut down; create a new LLM")
            raise

    def check(self) -> None:
        """Rank 0: raise :class:`WorkerDied` (and shut the other workers down) if a worker process has ended."""
        died = self._dead_worker()
        if died is not None:
            self._shut_down(str(died))
            raise died

    def min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (every rank calls it)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._steps)
        return int(t.item())

    def report(self, error: str) -> None:
        """A worker: leave ``error`` for rank 0 to show, before exiting."""
        if self._store is not None:
            self._store.set(_ERROR_KEY.format(self.rank), error)

    def set_up_one_shot(self, dtype: torch.dtype) -> str | None:
        """Every rank, in step: small all-reduces of ``dtype`` go one shot over symmetric memory
        (``self.tp.one_shot``) if every rank could set it up; returns why not (None when they did)."""
        tried = symmetric.rendezvous_count()
        if self.min(tried) != -self.min(-tried):
            return ("rank 0 set up symmetric memory for an earlier engine of this process, and torch numbers "
                    "its handle exchanges per process, so the new workers' keys would never match rank 0's: start "
                    "each tensor-parallel engine in a fresh process for one-shot all-reduces")
        why = symmetric.set_up(self.tp.group, self.device, dtype)
        if self.min(int(why is None)) == 0:  # one rank's NCCL against another's one shot would hang
            symmetric.release(self.tp.group)
            return why or "another rank could not set it up"
        self.tp = dataclasses.replace(self.tp, one_shot=True)
        self.before_leaving(lambda: symmetric.release(self.tp.group))
        return None

    # ---- the end -------------------------------------------------------------------------------
    def before_leaving(self, release: Callable[[], None]) -> None:
        """Have ``release`` called just before this rank leaves the groups, the last registered first:
        one must drop every CUDA graph that captured the model's collectives, or NCCL's destroy waits
        forever."""
        self._before_leaving.append(release)

    def close(self) -> None:
        """Stop the workers (rank 0) and leave the process groups; safe to call more than once.

        Rank 0 leaves once its workers have the stop message (so closing the steps' group cannot
        cut it off) and while they leave too, then waits for them to exit: NCCL may tear a
        communicator down with its peers, so waiting for the workers' exit first could wait on itself."""
        if self._closed:
            return
        self._closed = True
        if not self.is_driver:
            if self._store is not None:
                self._store.set(_LEAVING_KEY.format(self.rank), "1")
        elif not self._broken:
            with contextlib.suppress(Exception):  # a worker already gone is what close is for
                self.send(_STOP)
            if self._store is not None:
                _wait_for(self._store, self._workers, _LEAVING_KEY, EXIT_WAIT)
        if not self._broken:  # a shut-down rank left (or is stuck leaving) on its abort thread
            self._leave(dist.destroy_process_group)
        self._stop_workers(EXIT_WAIT)

    def _shut_down(self, why: str) -> None:
        """After a failure: kill the workers and leave the groups at once, collectives in flight
        aborted, so this process can start another engine while this one still exists.

        The GPU may be spinning in a collective the dead worker never joined, inside a replay, and
        freeing a graph's memory waits for the device: so the communicators are aborted before the
        graphs are dropped, on a thread given :data:`ABORT_WAIT` seconds. If it does not finish,
        the error is raised all the same and the log says what is left."""
        if self._broken:
            return
        self._broken = why
        self._stop_workers(0.0)
        leaving = threading.Thread(target=self._leave, args=(compat.abort_process_groups,),
                                   kwargs={"release_first": False}, name="fullgraph-abort", daemon=True)
        leaving.start()
        leaving.join(ABORT_WAIT)
        if leaving.is_alive():
            log.warning("fullgraph: leaving the tensor-parallel groups did not finish within %.0f s after %s (the "
                        "GPU waits on a collective of the dead worker); this process cannot start another "
                        "tensor-parallel engine: restart it", ABORT_WAIT, why)

    def _leave(self, how: Callable[[], None], release_first: bool = True) -> None:
        """Drop the graphs that captured collectives and leave the groups with ``how``: graphs first
        when closing (NCCL's destroy waits for them), after ``how`` when aborting (see _shut_down)."""
        if self._world is not None and dist.is_initialized() and dist.group.WORLD is self._world:
            if release_first:
                self._release_graphs()
            how()
            if not release_first:
                self._release_graphs()
        self._world = None
        self._before_leaving.clear()

    def _release_graphs(self) -> None:
        for release in reversed(self._before_leaving):  # what was set up last goes first
            release()

    def _stop_workers(self, grace: float) -> None:
        for proc in self._workers.values():
            if proc.poll() is None and grace:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _dead_worker(self, wait: float = 0.0) -> WorkerDied | None:
        return _first_exit(self._workers, self._store, wait)


def _first_exit(workers: dict[int, subprocess.Popen], store: Any, wait: float = 0.0) -> WorkerDied | None:
    """A :class:`WorkerDied` for the first of ``workers`` that has exited, with the error it left in
    ``store``, waiting up to ``wait`` seconds for one; None if all run."""
    deadline = time.monotonic() + wait
    while True:
        for rank, proc in workers.items():
            if proc.poll() is not None:
                key = _ERROR_KEY.format(rank)
                reported = store is not None and store.check([key])
                why = (":\n" + store.get(key).decode(errors="replace") if reported
                       else " (no error reported: it was killed, or see its output above)")
                return WorkerDied(f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code "
                                  f"{proc.returncode}{why}")
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


# ---- starting ----------------------------------------------------------------------------------
def spawn(size: int, device_type: str, payload: Any, entry: str) -> ParallelGroup:
    """Rank 0: start ranks 1..``size - 1`` as Python processes that run ``entry`` (``module:function``,
    which calls :func:`join_spawned`), and link them. ``payload`` reaches every worker.

    A worker that exits before joining (an import error, say) is a :class:`WorkerDied` naming it.
    """
    if dist.is_initialized():
        raise RuntimeError("fullgraph: LLM(tensor_parallel_size > 1) starts its own processes and default process "
                           "group, and this process has one already: another tensor-parallel LLM still alive (one "
                           "per process: `del` it first), or your own (destroy it first, or launch with torchrun)")
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    module, function = entry.split(":")
    workers: dict[int, subprocess.Popen] = {}
    try:
        for rank in range(1, size):
            workers[rank] = proc = subprocess.Popen(
                [sys.executable, "-c", f"import {module}; {module}.{function}()"], stdin=subprocess.PIPE)
            proc.stdin.write(pickle.dumps(dict(rank=rank, size=size, port=store.port, device_type=device_type,
                                               payload=payload)))
            proc.stdin.close()
        _wait_ready(store, workers)
        device = _device(device_type, 0)
        steps = _init_groups(device_type, device, rank=0, size=size, store=store)
    except BaseException:
        for proc in workers.values():
            proc.kill()
            proc.wait()
        raise
    return ParallelGroup(0, size, device, steps, store=store, workers=workers)


def join_spawned() -> tuple[ParallelGroup, Any]:
    """A worker :func:`spawn` started: read the job from standard input, join the groups; returns the
    group and the payload. The worker ignores SIGINT: Ctrl-C in a terminal is rank 0's to handle;
    :data:`STACKS_SIGNAL` prints its stacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if STACKS_SIGNAL is not None:
        faulthandler.register(STACKS_SIGNAL, all_threads=True)
    job = pickle.load(sys.stdin.buffer)
    rank, size = job["rank"], job["size"]
    store = dist.TCPStore("127.0.0.1", job["port"], size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    store.set(_READY_KEY.format(rank), "1")
    device = _device(job["device_type"], rank)
    steps = _init_groups(job["device_type"], device, rank=rank, size=size, store=store)
    return ParallelGroup(rank, size, device, steps, store=store), job["payload"]


def torchrun_rank() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` when torchrun (or another launcher setting its variables)
    started this process, else None. The one place that reads them."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def from_torchrun(size: int, device_type: str) -> ParallelGroup:
    """Join the group torchrun set up (reusing a default process group the program made already)."""
    rank, world, local_rank = torchrun_rank()
    if world != size:
        raise ValueError(f"torchrun started {world} processes but tensor_parallel_size={size}: launch "
                         f"`torchrun --nproc-per-node {size} ...` (one process per rank)")
    device = _device(device_type, local_rank)
    owns = not dist.is_initialized()
    steps = _init_groups(device_type, device, rank=rank, size=size) if owns else _step_group()
    return ParallelGroup(rank, size, device, steps, owns_default_group=owns)


def _device(device_type: str, index: int) -> torch.device:
    if device_type != "cuda":
        return torch.device(device_type)
    torch.cuda.set_device(index)  # code that asks for "the current device" (NCCL, capture) gets this rank's
    return torch.device("cuda", index)


def _init_groups(device_type: str, device: torch.device, *, rank: int, size: int, store: Any = None) -> Any:
    """Every rank: the default (model) group, on ``store`` or torchrun's environment, and the steps' group."""
    cuda = device_type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if cuda else None)
    return _step_group()


def _step_group() -> Any:
    return dist.new_group(backend="gloo", timeout=STEP_WAIT)


def _wait_ready(store: Any, workers: dict[int, subprocess.Popen]) -> None:
    """Wait until every worker reached the store; a worker that exits first is a WorkerDied at once,
    not after the rendezvous timeout."""
    died = _wait_for(store, workers, _READY_KEY, COLLECTIVE_TIMEOUT.total_seconds())
    if died is not None:
        raise died


def _wait_for(store: Any, workers: dict[int, subprocess.Popen], key: str, seconds: float) -> WorkerDied | None:
    """Wait up to ``seconds`` until every worker set ``key`` (formatted with its rank) in ``store``;
    None once they have, else a WorkerDied for the first that exited, or for the time out."""
    keys = [key.format(rank) for rank in workers]
    deadline = time.monotonic() + seconds
    while not store.check(keys):
        died = _first_exit(workers, store)
        if died is not None:
            return died
        if time.monotonic() > deadline:
            return WorkerDied(f"tensor-parallel workers did not set {key.format('<rank>')!r} in the rendezvous "
                              f"store within {seconds:.0f} s")
        time.sleep(0.01)
    return None

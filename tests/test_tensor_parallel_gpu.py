"""Tensor parallelism on two GPUs (NCCL): float32 greedy tokens of two ranks equal one process's at
1, 7 and 45 prompts, -O4 and -O2, all-reduces one shot over symmetric memory or NCCL; the
collectives sit in the captured code; a worker killed
while rank 0 waits on a replay is an error, not a hang. Skipped without two CUDA devices.

The engines of the parity test run one after another in this process: the first asking for one-shot
all-reduces gets them; a later one falls back to NCCL, since torch numbers symmetric memory's
handle exchanges per process and its new workers would never meet rank 0 (it waited forever until
2026-11-30: perf-notes section 37).

A test still running after :data:`WATCHDOG_S` seconds prints every thread's stack of rank 0 and of
each worker (``STACKS_SIGNAL``) and goes on: run with ``-s`` to see them where a timeout kills the run."""
from __future__ import annotations

import faulthandler
import gc
import os
import subprocess
import sys

import pytest
import torch

from test_engine_gpu import small_dir, workload  # noqa: F401  (small_dir: the fixture of the one-GPU tests' model)
from fullgraph_backend.distributed import symmetric
from fullgraph_backend.distributed.processes import STACKS_SIGNAL
from fullgraph_backend.engine import LLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

BATCHES = (1, 7, 45)
MAX_MODEL_LEN = 512
WATCHDOG_S = 200.0


# runs beside the tests: a Python timer thread cannot, while rank 0 waits in C++ holding the GIL
# (as it did in the symmetric-memory hang); faulthandler's own timer thread is C and prints rank 0's
_SIGNAL_WORKERS = """
import contextlib, os, sys, time
parent, seconds, signum = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
time.sleep(seconds)
for task in os.listdir(f"/proc/{parent}/task"):
    with open(f"/proc/{parent}/task/{task}/children") as f:
        for pid in set(f.read().split()) - {str(os.getpid())}:  # its own command line names the module too
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmd:
                if b"fullgraph_backend" in cmd.read():  # the engine's workers, not Inductor's compile pool
                    os.kill(int(pid), signum)
"""


@pytest.fixture(autouse=True)
def watchdog():
    """Print every rank's stacks once if the test runs past WATCHDOG_S: a hang shows where it waits."""
    faulthandler.dump_traceback_later(WATCHDOG_S)
    dog = subprocess.Popen([sys.executable, "-c", _SIGNAL_WORKERS, str(os.getpid()), str(WATCHDOG_S),
                            str(int(STACKS_SIGNAL))])
    yield
    faulthandler.cancel_dump_traceback_later()
    dog.kill()
    dog.wait()


def engine(model, level: int, size: int, **options) -> LLM:
    return LLM(str(model), optimization_level=level, dtype="float32", max_num_seqs=128, max_num_batched_tokens=512,
               max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.4, seed=0, tensor_parallel_size=size, **options)


def release(llm: LLM) -> None:
    """Free the engine's GPUs before the next one sizes its KV cache from what is free."""
    del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def one_process(small_dir):
    llm = engine(small_dir, 4, 1)
    tokens = {b: [o.token_ids for o in llm.generate(*workload(b))] for b in BATCHES}
    release(llm)
    return tokens


@pytest.mark.parametrize("level, all_reduce", [(4, "auto"), (4, "nccl"), (2, "auto")])
def test_float32_greedy_tokens_of_two_ranks_equal_one_process(small_dir, one_process, level, all_reduce, tmp_path):
    one_shot = all_reduce == "auto" and symmetric.rendezvous_count() == 0
    llm = engine(small_dir, level, 2, compile_options={"dump_dir": str(tmp_path)}, all_reduce=all_reduce)
    try:  # a failure here must not leave the workers and the default group to the next test
        assert llm.startup.num_graphs > 0 and all(r.use_graphs for r in llm.runner.graph_runners)
        assert llm.workers.tp.one_shot == one_shot
        for batch in BATCHES:
            got = [o.token_ids for o in llm.generate(*workload(batch))]
            bad = [i for i, (a, b) in enumerate(zip(got, one_process[batch])) if a != b]
            assert not bad, f"-O{level}, batch {batch}: prompts {bad[:5]} differ, e.g. {got[bad[0]]} vs " \
                            f"{one_process[batch][bad[0]]}"
    finally:
        llm.workers.close()
    release(llm)
    reduce = "fullgraph.one_shot_all_reduce" if one_shot else "_c10d_functional.all_reduce_"
    for rank in (0, 1):  # Inductor's code, which the graphs capture, calls the collectives
        code = "".join(p.read_text() for p in (tmp_path / f"rank{rank}").glob("*/torchinductor/*/output_code.py"))
        assert reduce in code and "all_gather_into_tensor" in code


def test_a_worker_killed_while_rank_0_waits_on_a_replay_is_an_error(small_dir):
    """In a process of its own: rank 0's GPU keeps a collective that never completes. A hang dumps
    the process's stacks (faulthandler) and fails the test, rather than holding the suite."""
    script = f"""
import faulthandler, os, signal, threading
faulthandler.dump_traceback_later(240, exit=True)
from fullgraph_backend.distributed.processes import WorkerDied
from fullgraph_backend.engine import LLM, SamplingParams
llm = LLM({str(small_dir)!r}, optimization_level=4, dtype="bfloat16", tensor_parallel_size=2, max_num_seqs=8,
          max_num_batched_tokens=256, max_model_len={MAX_MODEL_LEN}, gpu_memory_utilization=0.4)
(pid,) = llm.workers.worker_pids.values()
threading.Timer(3.0, os.kill, (pid, signal.SIGKILL)).start()
try:
    while True:
        llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
except WorkerDied as error:
    print("raised:", str(error).splitlines()[0], flush=True)
os._exit(0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "raised: tensor-parallel worker rank 1" in done.stdout, done.stderr[-3000:]

"""``LLM(tensor_parallel_size=N)`` on CPU: N processes on gloo give the single-process engine's tokens
(greedy and seeded sampling, chunked prefill, preemption, -O0, -O2 and the -O4 graph path), the
dump shows the collectives, and failures (a worker killed or raising, an error on rank 0 inside a
step, a worker that cannot start, a model that does not split) are clear errors, never a hang.

Every engine here starts real worker processes, so each test builds as few as it can; compiled
levels use Dynamo's eager compiler (Inductor's lowering of the collectives is the GPU run's).
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import SHARP, make_llm, mixed_prompts, sharp_model, write_hf_model
from fullgraph_backend.distributed.processes import WorkerDied
from fullgraph_backend.engine import LLM, SamplingParams, parallel

PROMPTS = mixed_prompts(7, seed=11)  # up to 40 tokens, over the 32-token budget: chunked prefill
# greedy and seeded sampled requests: every rank must draw the same tokens, or the next step's
# inputs (taken on each rank's device) differ and the sums go wrong
PARAMS = [SamplingParams(temperature=0.0, max_tokens=8) if i % 2 else
          SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=i) for i in range(len(PROMPTS))]
KV_BLOCKS = 2 + 6  # about two requests at a time: the others wait or are preempted
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


def tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, PARAMS)
    assert sum(o.num_preemptions for o in outs) > 0
    assert llm.block_manager.num_free == llm.block_manager.num_usable
    return [o.token_ids for o in outs]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("sharp"), sharp_model())


@pytest.fixture(scope="module")
def expected(sharp_dir) -> list[list[int]]:
    """The single-process engine's tokens (at -O0: test_engine checks that every level gives them)."""
    return tokens(make_llm(sharp_dir, 0, num_kv_blocks=KV_BLOCKS))


@pytest.fixture(scope="class")
def tp2(sharp_dir, tmp_path_factory):
    """Two ranks at -O4 (graphs emulated on CPU), dumping their graphs; closed after the class that
    uses it (a process holds one tensor-parallel engine at a time)."""
    dump = tmp_path_factory.mktemp("dump")
    llm = make_llm(sharp_dir, 4, num_kv_blocks=KV_BLOCKS, tensor_parallel_size=2,
                   compile_options={"compiler": "eager", "dump_dir": str(dump)})
    yield llm, dump
    llm.workers.close()


class TestTwoRanksAtO4:
    def test_the_single_process_tokens(self, tp2, expected):
        llm, _ = tp2
        assert tokens(llm) == expected
        assert llm.startup.num_graphs == 7  # every capture size, as one process captures
        assert tokens(llm) == expected  # and again, from the same engine

    def test_the_dump_shows_the_collectives_in_each_ranks_graph(self, tp2):
        _, dump = tp2
        for rank in (0, 1):
            (graph,) = (dump / f"rank{rank}").glob("*/01_swap_attention.py")
            code = graph.read_text()
            # two all-reduces a layer and the embedding's; the head's all-gather
            assert code.count("torch.ops._c10d_functional.all_reduce(") == 2 * SHARP.num_layers + 1
            assert code.count("torch.ops._c10d_functional.all_gather_into_tensor(") == 1
            assert code.count("torch.ops._c10d_functional.wait_tensor(") == 2 * SHARP.num_layers + 2

    def test_an_error_before_a_step_is_sent_leaves_the_ranks_in_step(self, tp2, expected, monkeypatch):
        llm, _ = tp2
        plan = llm.runner.plan

        def fail_once(batch):
            monkeypatch.setattr(llm.runner, "plan", plan)
            raise RuntimeError("injected")

        monkeypatch.setattr(llm.runner, "plan", fail_once)
        with pytest.raises(RuntimeError, match="injected"):
            llm.generate(PROMPTS, PARAMS)
        assert not any(map(gone, llm.workers.worker_pids.values()))
        assert tokens(llm) == expected

    def test_a_worker_asked_for_its_stacks_prints_them_and_goes_on(self, tp2, expected):
        """SIGUSR1 would end a process that has no handler for it: the worker prints its stacks
        (to its standard error) and serves the next steps alike."""
        llm, _ = tp2
        for pid in llm.workers.worker_pids.values():
            os.kill(pid, signal.SIGUSR1)
        assert tokens(llm) == expected
        assert not any(map(gone, llm.workers.worker_pids.values()))

    def test_a_second_engine_is_an_error_while_the_first_lives(self, tp2, sharp_dir):
        with pytest.raises(RuntimeError, match=r"another tensor-parallel LLM still alive \(one per process: `del`"):
            make_llm(sharp_dir, tensor_parallel_size=2)

    def test_closing_drops_the_graphs_before_leaving_the_groups(self, tp2, monkeypatch):
        """NCCL destroys a communicator only once every graph that captured its collectives is gone
        (on a GPU, closing hung in destroy_process_group until the graphs went first)."""
        llm, _ = tp2
        graphs_when_leaving = []

        def destroy(*args, **kwargs):
            graphs_when_leaving.append(llm.runner._backend.graphs)
            return leave(*args, **kwargs)

        leave = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group", destroy)
        assert llm.runner._backend.graphs == 7
        llm.workers.close()
        assert graphs_when_leaving == [0]
        assert all(map(gone, llm.workers.worker_pids.values()))


def test_two_ranks_piecewise_at_o2(sharp_dir, expected):
    """-O2: the collectives sit in the pieces between the attention calls."""
    llm = make_llm(sharp_dir, 2, tensor_parallel_size=2)
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], PARAMS[:3])] == expected[:3]


def test_four_ranks_share_the_two_kv_heads_and_stop_when_the_engine_goes(sharp_dir, expected):
    llm = make_llm(sharp_dir, 0, tensor_parallel_size=4)
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], PARAMS[:3])] == expected[:3]
    pids = list(llm.workers.worker_pids.values())
    del llm
    gc.collect()
    assert all(map(gone, pids)) and not dist.is_initialized()


# ---- failures ----------------------------------------------------------------------------------
def test_a_killed_worker_is_an_error_naming_it(sharp_dir):
    llm = make_llm(sharp_dir, 0, tensor_parallel_size=2)
    (pid,) = llm.workers.worker_pids.values()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=rf"worker rank 1 \(pid {pid}\) exited with code -9 \(no error reported"):
        llm.generate(PROMPTS[:2], GREEDY)
    with pytest.raises(RuntimeError, match=r"shut down \(tensor-parallel worker rank 1 .*create a new LLM"):
        llm.generate(PROMPTS[:2], GREEDY)
    assert not llm.has_unfinished() and llm.block_manager.num_free == llm.block_manager.num_usable


def test_a_worker_that_raises_reports_its_error(sharp_dir):
    llm = make_llm(sharp_dir, 0, tensor_parallel_size=2)
    llm.workers.send("not a step")  # the worker's runner fails on it
    with pytest.raises(WorkerDied, match=r"worker rank 1 \(pid \d+\) exited with code 1:\n(.|\n)*AttributeError"):
        llm.generate(PROMPTS[:2], GREEDY)


def test_an_error_on_rank_0_inside_a_step_shuts_the_workers_down(sharp_dir, monkeypatch):
    llm = make_llm(sharp_dir, 0, tensor_parallel_size=2)
    (pid,) = llm.workers.worker_pids.values()

    def interrupted(*args, **kw):  # after the step was sent: the worker waits in its first collective
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.runner, "_forward", interrupted)
    with pytest.raises(KeyboardInterrupt) as error:
        llm.generate(PROMPTS[:2], GREEDY)
    assert any("workers were shut down" in note for note in error.value.__notes__) and gone(pid)
    assert not llm.has_unfinished()
    with pytest.raises(RuntimeError, match=r"shut down \(after KeyboardInterrupt on rank 0\); create a new LLM"):
        llm.generate(PROMPTS[:2], GREEDY)


def test_a_worker_that_cannot_start_is_an_error_at_once(sharp_dir, monkeypatch):
    monkeypatch.setattr(parallel, "WORKER_ENTRY", "fullgraph_backend.no_such_module:main")
    with pytest.raises(WorkerDied, match=r"worker rank 1 \(pid \d+\) exited with code 1"):
        make_llm(sharp_dir, 0, tensor_parallel_size=2)
    assert not dist.is_initialized()


def test_what_cannot_run_split_is_an_error_before_any_process_starts(sharp_dir, monkeypatch):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide .*sizes that divide it: \[1, 2, 4\]"):
        make_llm(sharp_dir, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="model_impl='transformers' has no tensor-parallel split"):
        LLM("tiny", tensor_parallel_size=2, model_impl="transformers")
    with pytest.raises(ValueError, match="gemma3-1b needs transformers' modeling code; use tensor_parallel_size=1"):
        LLM("gemma3-1b", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1, got 0"):
        LLM("tiny", tensor_parallel_size=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs .*and 1 is visible"):
        LLM("tiny", device="cuda", tensor_parallel_size=2)


# ---- torchrun ----------------------------------------------------------------------------------
def test_torchrun_starts_the_ranks_and_only_rank_0_reports(sharp_dir):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "fullgraph_backend.cli", "bench", "latency", "--model", str(sharp_dir), "--tensor-parallel-size", "2",
               "--device", "cpu", "-O0", "--batch-size", "2", "--input-len", "4", "--output-len", "4",
               "--num-iters", "1", "--num-iters-warmup", "0", "--max-num-seqs", "2", "--max-num-batched-tokens", "16"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Avg latency") == 1 and "tensor parallel 2" in done.stdout


def _one_shot_verdict(rank: int, store_path: str, tried: int, out: str) -> None:
    """One rank of test_ranks_with_different_rendezvous_counts_all_fall_back_to_nccl (a spawned process)."""
    from fullgraph_backend.distributed import processes, symmetric

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    group = processes.ParallelGroup(rank, 2, torch.device("cpu"), dist.new_group(backend="gloo"))
    symmetric._rendezvous_tried = tried if rank == 0 else 0
    Path(f"{out}.{rank}").write_text(str(group.set_up_one_shot(torch.float32)))
    dist.destroy_process_group()


@pytest.mark.parametrize("rank_0_tried", [0, 1])
def test_ranks_with_different_rendezvous_counts_all_fall_back_to_nccl(tmp_path, rank_0_tried):
    """Torch numbers symmetric memory's handle exchanges per process: rank 0 of a second engine is
    one ahead of its new workers, and a rendezvous would wait forever (two H200s, 2026-11-30). Every
    rank must reach the same verdict before any of them tries; with equal counts they go on (and on
    CPU stop at the device check)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "why")
    mp.start_processes(_one_shot_verdict, args=(str(tmp_path / "store"), rank_0_tried, out), nprocs=2,
                       start_method="spawn")
    verdicts = {Path(f"{out}.{rank}").read_text() for rank in (0, 1)}
    assert len(verdicts) == 1
    (why,) = verdicts
    assert ("earlier engine of this process" in why) == bool(rank_0_tried), why
    assert rank_0_tried or why == "one-shot all-reduce needs CUDA devices, not cpu"

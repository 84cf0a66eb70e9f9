"""Tensor parallelism's split of our decoder, in one process: every rank's weights are slices of the
single-process model's (random weights and checkpoints alike), heads and KV heads land where the
query heads read them, and a model that does not split is a clear error."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from helpers import SHARP, sharp_model, write_hf_model
from fullgraph_backend import compat
from fullgraph_backend.distributed import (Shard, TensorParallel, check_tensor_parallel, rank_cache_config,
                                           shard_decoder, symmetric)
from fullgraph_backend.distributed.layers import RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from fullgraph_backend.engine.loader import load_model
from fullgraph_backend.models import build_model, get_config


def rank_model(config, rank: int, size: int, seed: int = 0):
    return build_model(config, seed=seed, shard=functools.partial(shard_decoder, tp=TensorParallel(rank, size, "tp")))


def assert_slices_of(whole, part, size: int) -> None:
    """Every parameter of ``part`` is its module's slice of ``whole``'s; the replicated ones equal it."""
    full = dict(whole.named_parameters())
    for name, p in part.named_parameters():
        module, _, leaf = name.rpartition(".")
        shard = getattr(part.get_submodule(module), "shards", {}).get(leaf)
        assert torch.equal(p, shard.take(full[name]) if shard else full[name]), name
        assert (shard is None) == (p.shape == full[name].shape), name  # every large weight is split


def test_shard_takes_and_restores_the_whole_shape():
    shard = Shard(0, 10, ((2, 3), (7, 2)))
    whole = torch.arange(30).view(10, 3)
    assert shard.take(whole).tolist() == whole[[2, 3, 4, 7, 8]].tolist()
    assert shard.size == 5 and shard.full_shape((5, 3)) == (10, 3)


@pytest.mark.parametrize("size", [2, 4])  # 4 ranks over 2 KV heads: each KV head on two ranks
def test_random_weights_of_every_rank_are_slices_of_the_single_process_model(size):
    config = get_config("tiny")  # tied embeddings: the head shares the embedding's slice
    whole = build_model(config, seed=3)
    for rank in range(size):
        part = rank_model(config, rank, size, seed=3)
        assert_slices_of(whole, part, size)
        assert part.lm_head.weight is part.embed_tokens.weight
        attn = part.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (config.num_heads // size, max(config.num_kv_heads // size, 1))


def test_each_rank_holds_the_kv_head_its_query_heads_read():
    """4 query heads over 2 KV heads on 4 ranks: ranks 0, 1 read KV head 0, ranks 2, 3 KV head 1."""
    c = get_config("tiny")
    whole = build_model(c, seed=0).layers[0].self_attn.qkv_proj.weight
    q, k, v = whole.split([c.q_size, c.kv_size, c.kv_size])
    for rank in range(4):
        part = rank_model(c, rank, 4).layers[0].self_attn.qkv_proj.weight
        head, kv_head = slice(rank * c.head_dim, (rank + 1) * c.head_dim), slice((rank // 2) * c.head_dim,
                                                                                 (rank // 2 + 1) * c.head_dim)
        assert torch.equal(part, torch.cat([q[head], k[kv_head], v[kv_head]]))


def test_a_checkpoint_loads_into_every_rank_as_slices(tmp_path):
    model = sharp_model()
    path = write_hf_model(tmp_path / "m", model)
    for rank in range(2):
        shard = functools.partial(shard_decoder, tp=TensorParallel(rank, 2, "tp"))
        part = load_model(str(path), dtype=torch.float32, device=torch.device("cpu"), seed=0, shard=shard).model
        assert_slices_of(model, part, 2)
        assert isinstance(part.lm_head, VocabParallelHead) and part.lm_head.weight is not part.embed_tokens.weight


def test_the_split_modules_and_the_cache_of_a_rank():
    part = rank_model(SHARP, 1, 2)
    layer = part.layers[0]
    assert isinstance(layer.self_attn.o_proj, RowParallelLinear) and isinstance(layer.mlp.down_proj, RowParallelLinear)
    assert isinstance(part.embed_tokens, VocabParallelEmbedding) and part.embed_tokens.start == SHARP.vocab_size // 2
    assert layer.mlp.gate_up_proj.weight.shape == (SHARP.intermediate_size, SHARP.hidden_size)  # half of 2 x width
    assert rank_cache_config(SHARP, 2).num_kv_heads == 1 and rank_cache_config(SHARP, 4).num_kv_heads == 1
    assert part.config == SHARP  # the whole model's config: checkpoints are read by its shapes


@pytest.mark.parametrize("size, problem", [
    (3, r"attention heads \(4\), vocabulary size \(512\), intermediate size \(128\), KV heads \(2: 3 must divide"),
    (8, r"attention heads \(4\)"),
])
def test_a_model_that_does_not_split_is_an_error_naming_what_and_the_sizes_that_work(size, problem):
    with pytest.raises(ValueError, match=rf"tensor_parallel_size={size} does not divide 'tiny'.s {problem}.*"
                                         r"sizes that divide it: \[1, 2, 4\]"):
        check_tensor_parallel(get_config("tiny"), size)
    with pytest.raises(ValueError, match="does not divide"):
        rank_model(get_config("tiny"), 0, size)
    check_tensor_parallel(get_config("llama-3.1-8b"), 8)  # 32 heads, 8 KV heads, 128256 tokens, 14336 wide


@pytest.fixture
def one_rank():
    """A gloo process group of one rank in this process: the collectives run, as identities."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield TensorParallel(0, 1, dist.group.WORLD.group_name)
    dist.destroy_process_group()


def test_inductor_compiles_the_collectives_into_the_captured_graph(one_rank, tmp_path):
    """Inductor lowers the all-reduce in place and the all-gather, with their waits, inside the code
    the runner captures; the padded graph computes what eager does."""
    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.o = RowParallelLinear(Shard(1, 8, ((0, 8),)), 16, one_rank, torch.float32)
            self.head = VocabParallelHead(16, 32, one_rank, torch.float32)

        def forward(self, x):
            return self.head(self.o(x))

    model = Split().requires_grad_(False)
    compiled = torch.compile(model, backend="fullgraph", options={"dump_dir": str(tmp_path), "capture_sizes": (8,)})
    x = torch.randn(5, 8)
    compat.mark_unbacked(x, 0)  # as the engine marks its token inputs
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x))
    (code,) = tmp_path.glob("*/torchinductor/*/output_code.py")
    text = code.read_text()
    assert "torch.ops._c10d_functional.all_reduce_.default" in text  # in place, on Inductor's buffer
    assert "torch.ops._c10d_functional.all_gather_into_tensor.default" in text and "wait_tensor" in text


def test_the_head_gathers_logits_of_a_row_count_that_may_be_one(one_rank):
    """The logits' rows are ``request_ends``' count, unbacked and possibly 1: Inductor compiles the
    head's gather of them (torch 2.11 refused a gather laid out as [1, n, k]: a data-dependent guard
    on n * k > k)."""
    head = VocabParallelHead(16, 32, one_rank, torch.float32).requires_grad_(False)

    def last_rows(x, n):
        k = n.item()
        torch._check(k >= 1)
        return head(x[: torch.sym_max(1, torch.sym_min(k, x.shape[0] - 1))])

    compiled = torch.compile(last_rows, backend="inductor", fullgraph=True)
    x = torch.randn(5, 16)
    compat.mark_unbacked(x, 0)
    for n in (1, 3):
        torch.testing.assert_close(compiled(x, torch.tensor(n)), head(x[:n]))


def test_the_one_shot_all_reduce_is_one_op_in_the_captured_code_falling_back_without_symmetric_memory(one_rank, tmp_path):
    """With ``one_shot`` the row-parallel layer's all-reduce is our op, opaque to Inductor, in the
    code the runner captures; on CPU (no symmetric memory) the op falls back to the collective, so
    the graph still computes what eager does."""
    assert symmetric.set_up(one_rank.group, torch.device("cpu"), torch.float32) == \
        "one-shot all-reduce needs CUDA devices, not cpu"
    tp = dataclasses.replace(one_rank, one_shot=True)
    o = RowParallelLinear(Shard(1, 8, ((0, 8),)), 16, tp, torch.float32).requires_grad_(False)
    compiled = torch.compile(o, backend="fullgraph", options={"dump_dir": str(tmp_path), "capture_sizes": (8,)})
    x = torch.randn(5, 8)
    compat.mark_unbacked(x, 0)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), o(x))
    (code,) = tmp_path.glob("*/torchinductor/*/output_code.py")
    text = code.read_text()
    assert "torch.ops.fullgraph.one_shot_all_reduce.default" in text and "_c10d_functional" not in text

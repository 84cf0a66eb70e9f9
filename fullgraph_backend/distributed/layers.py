"""Our decoder split over tensor-parallel ranks (Megatron's split), on collectives Dynamo traces.

Each rank holds a slice of every large weight and computes on it; the collectives put the pieces
together where the next op needs whole values:

| module | what rank ``r`` of ``N`` holds | after it |
|---|---|---|
| ``qkv_proj`` (column-parallel) | the rows of its ``num_heads / N`` query heads and its KV heads | - |
| ``o_proj`` (row-parallel) | the columns of its query heads | all-reduce (sum) |
| ``gate_up_proj`` (column-parallel) | its ``1 / N`` of the gate rows and of the up rows | - |
| ``down_proj`` (row-parallel) | the matching columns | all-reduce |
| ``embed_tokens`` (vocab-parallel) | ``vocab / N`` rows; other ids embed to zeros | all-reduce |
| ``lm_head`` (vocab-parallel) | ``vocab / N`` rows (tied: the embedding's) | all-gather: every rank has all logits |

KV heads are split like query heads when there are at least ``N``; with fewer, each rank holds the
one KV head its query heads read (replicated on ``N / num_kv_heads`` ranks). Norms and the rotary
table are replicated. A step costs two all-reduces of ``[tokens, hidden]`` per layer, one for the
embedding and an all-gather of ``[tokens, vocab / N]``.

The collectives are torch's functional collectives (``torch.ops._c10d_functional``: an op that
returns a new tensor, and ``wait_tensor``), or on GPUs that set it up, the all-reduces are
:mod:`~fullgraph_backend.distributed.symmetric`'s one-shot op (opaque to Inductor, NCCL inside it
for large inputs). Dynamo puts them in the FX graph, where the dump shows
them; Inductor lowers them in place and schedules the wait; the graph runner captures them inside
each CUDA graph (NCCL) or runs them at each emulated replay (gloo, on CPU). The ops are called
directly rather than through ``torch.distributed._functional_collectives``, whose gather wrapper
was renamed between torch 2.11 and 2.13.

Each split module keeps ``shards``: parameter name -> :class:`Shard`. :class:`~fullgraph_backend.models.Decoder`
loads weights through it (``Decoder.full_shape`` and ``Decoder.load_full``), so random weights and
checkpoints give every rank the single-process model's values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fullgraph_backend.distributed.symmetric import one_shot_all_reduce
from fullgraph_backend.models import Decoder, DecoderConfig

_c10d = torch.ops._c10d_functional


@dataclass(frozen=True)
class TensorParallel:
    """Where this process sits: ``rank`` of ``size``, and the name of the process group whose
    collectives the model's layers call (a string: Dynamo keeps it as a constant of the graph).
    ``one_shot``: every rank set up :mod:`~fullgraph_backend.distributed.symmetric`'s buffer, so
    small all-reduces read the peers' memory instead of going through NCCL."""

    rank: int
    size: int
    group: str
    one_shot: bool = False


@dataclass(frozen=True)
class Shard:
    """The slice of a whole tensor one rank holds: along ``dim``, the ``(start, size)`` ranges of
    the whole tensor (``full_size`` long), concatenated in order."""

    dim: int
    full_size: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        """The slice's length along ``dim``."""
        return sum(n for _, n in self.ranges)

    def full_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole tensor's shape, from the slice's ``shape``."""
        return tuple(self.full_size if d == self.dim else s for d, s in enumerate(shape))

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``full``."""
        return torch.cat([full.narrow(self.dim, start, n) for start, n in self.ranges], self.dim)


# ---- collectives ---------------------------------------------------------------------------------
def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``tp``'s group: one shot over symmetric memory where the
    ranks set it up (small inputs; NCCL for the rest, inside the op), else Inductor's collective."""
    if tp.one_shot:
        return one_shot_all_reduce(x, tp.group)
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", tp.group))


def all_gather_columns(x: torch.Tensor, size: int, group: str) -> torch.Tensor:
    """``[n, k]`` on each of ``size`` ranks -> ``[n, size * k]``, rank 0's columns first.

    The collective gathers ``x`` itself ([size * n, k], strides (k, 1)): gathering ``x.unsqueeze(0)``
    gave its wait a stride ``n * k`` that torch 2.11's Inductor compares with ``k`` to fix the
    layout, a data-dependent guard when ``n`` is the logits' row count (``request_ends``), which
    may be 1. The result is viewed back with ``-1`` rows: an ``unflatten`` by ``n`` made Dynamo
    specialise the batch size, and the graph unpaddable.
    """
    gathered = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), size, group))
    return gathered.view(size, -1, x.shape[-1]).movedim(0, -2).flatten(-2)


# ---- split layers --------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Linear):
    """A linear computing some of the output features (``shard``'s rows), no collective: the
    outputs stay split until a row-parallel layer sums them."""

    def __init__(self, in_features: int, shard: Shard, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, shard.size, bias=bias, dtype=dtype)
        self.shards = {"weight": shard, "bias": shard}


class RowParallelLinear(nn.Linear):
    """A linear over some of the input features (``shard``'s columns), summed over the ranks."""

    def __init__(self, shard: Shard, out_features: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__(shard.size, out_features, bias=False, dtype=dtype)
        self.shards, self.tp = {"weight": shard}, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: this rank's share of the input features -> the whole output, on every rank."""
        return all_reduce(F.linear(x, self.weight), self.tp)


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of one slice of the vocabulary; ids outside it embed to zeros, and the
    sum over the ranks is every id's row."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        shard = _even_slice(vocab_size, tp)
        super().__init__(shard.size, hidden_size, dtype=dtype)
        self.shards, self.tp, self.start = {"weight": shard}, tp, shard.ranges[0][0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any in the vocabulary) -> their rows, on every rank."""
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(torch.where(inside, local, 0), self.weight)
        return all_reduce(torch.where(inside.unsqueeze(-1), x, 0), self.tp)


class VocabParallelHead(nn.Linear):
    """The LM head's rows of one slice of the vocabulary; the logits are gathered, so every rank
    holds all of them and samples the same tokens (see :mod:`fullgraph_backend.engine.parallel`)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel, dtype: torch.dtype) -> None:
        shard = _even_slice(vocab_size, tp)
        super().__init__(hidden_size, shard.size, bias=False, dtype=dtype)
        self.shards, self.group, self.ranks = {"weight": shard}, tp.group, tp.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states -> the logits over the whole vocabulary, on every rank."""
        return all_gather_columns(F.linear(x, self.weight), self.ranks, self.group)


# ---- the decoder -------------------------------------------------------------------------------
def check_tensor_parallel(config: DecoderConfig, size: int) -> None:
    """A ValueError naming what does not divide, and the sizes that work, unless ``config`` splits
    over ``size`` ranks: heads, vocabulary and MLP width divide by it, and KV heads divide by it or
    it by them."""
    kv = config.num_kv_heads
    problems = [f"{name} ({value})" for name, value in (("attention heads", config.num_heads),
                                                         ("vocabulary size", config.vocab_size),
                                                         ("intermediate size", config.intermediate_size))
                if value % size]
    if kv % size and size % kv:
        problems.append(f"KV heads ({kv}: {size} must divide them or be a multiple of them)")
    if problems:
        fits = [n for n in range(1, 65) if not (config.num_heads % n or config.vocab_size % n
                                                 or config.intermediate_size % n or (kv % n and n % kv))]
        raise ValueError(f"tensor_parallel_size={size} does not divide {config.name!r}'s {', '.join(problems)}; "
                         f"sizes that divide it: {fits}")


def kv_heads_per_rank(config: DecoderConfig, size: int) -> int:
    """KV heads one rank holds: ``num_kv_heads / size``, or 1 where ranks share (replicate) a KV head."""
    return max(config.num_kv_heads // size, 1)


def rank_cache_config(config: DecoderConfig, size: int) -> DecoderConfig:
    """``config`` with the KV heads one rank holds: the shapes of that rank's KV cache."""
    return config.replace(num_kv_heads=kv_heads_per_rank(config, size))


def shard_decoder(model: Decoder, tp: TensorParallel) -> None:
    """Make ``model`` (on the meta device, before its weights exist) the part rank ``tp.rank`` runs:
    split layers swapped in per the module docstring, attention over this rank's heads."""
    c = model.config
    check_tensor_parallel(c, tp.size)
    dtype, d = model.embed_tokens.weight.dtype, c.head_dim
    heads, kv_heads = c.num_heads // tp.size, kv_heads_per_rank(c, tp.size)
    first_kv = tp.rank * c.num_kv_heads // tp.size  # the first KV head this rank's query heads read
    qkv = Shard(0, c.q_size + 2 * c.kv_size, ((tp.rank * heads * d, heads * d),
                                               (c.q_size + first_kv * d, kv_heads * d),
                                               (c.q_size + c.kv_size + first_kv * d, kv_heads * d)))
    o = Shard(1, c.q_size, ((tp.rank * heads * d, heads * d),))
    width = c.intermediate_size // tp.size
    gate_up = Shard(0, 2 * c.intermediate_size, ((tp.rank * width, width),
                                                 (c.intermediate_size + tp.rank * width, width)))
    down = Shard(1, c.intermediate_size, ((tp.rank * width, width),))
    with torch.device("meta"):
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.num_heads, attn.num_kv_heads, attn.sizes = heads, kv_heads, [heads * d, kv_heads * d, kv_heads * d]
            attn.qkv_proj = ColumnParallelLinear(c.hidden_size, qkv, c.qkv_bias, dtype)
            attn.o_proj = RowParallelLinear(o, c.hidden_size, tp, dtype)
            mlp.gate_up_proj = ColumnParallelLinear(c.hidden_size, gate_up, False, dtype)
            mlp.down_proj = RowParallelLinear(down, c.hidden_size, tp, dtype)
        model.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, tp, dtype)
        model.lm_head = VocabParallelHead(c.hidden_size, c.vocab_size, tp, dtype)
    model.requires_grad_(False)
    model.tie_weights()


def _even_slice(total: int, tp: TensorParallel) -> Shard:
    n = total // tp.size
    return Shard(0, total, ((tp.rank * n, n),))


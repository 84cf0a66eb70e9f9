"""A Llama / Qwen2-family decoder on packed tokens, attention through ``fullgraph_backend.attention``.

``forward(input_ids [N], positions [N]) -> logits [N, vocab]``: requests are packed one after
another and the active :class:`~fullgraph_backend.ForwardContext` says which token belongs to
which request. Nothing branches on ``N`` or reads tensor values on the host, so Dynamo traces
it as one graph with a dynamic token dimension. Parameter names are Hugging Face's without the
``model.`` prefix, with q/k/v fused into ``qkv_proj`` and gate/up into ``gate_up_proj``::

    model = build_model("tiny")
    ctx = model.config.forward_context(max_num_seqs=4, max_num_tokens=64, max_model_len=128)
    with fullgraph_backend.use_forward_context(ctx):
        positions = ctx.prepare(query_lens=[3], seq_lens=[3], block_tables=[[1]])
        logits = model(torch.tensor([1, 2, 3]), positions)
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

import fullgraph_backend
from fullgraph_backend.models.config import DecoderConfig, get_config

# our fused projection -> the Hugging Face projections concatenated into it, in order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as Hugging Face: normalise in float32, cast back, then scale
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """RoPE, rotate-half (neox) style: a ``[max_position_embeddings, head_dim]`` table of cos | sin."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos_sin_cache", self.table(), persistent=False)

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Computed in float32 (as Hugging Face does) and cast to the buffer's dtype."""
        c = self.config
        exponents = torch.arange(0, c.head_dim, 2, dtype=torch.int64, device=device).float() / c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** exponents)
        if c.rope_scaling is not None:
            inv_freq = c.rope_scaling.scale(inv_freq)
        freqs = torch.outer(torch.arange(c.max_position_embeddings, device=device).float(), inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def reset(self) -> None:
        """Recompute the table in place (after ``to_empty``)."""
        with torch.no_grad():
            self.cos_sin_cache.copy_(self.table(self.cos_sin_cache.device))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``[N, 1, head_dim // 2]``, broadcasting over heads."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.sliding_window = layer_idx, config.sliding_window
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.sizes = [config.q_size, config.kv_size, config.kv_size]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.sizes), bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = apply_rotary(q.unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        k = apply_rotary(k.unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        o = fullgraph_backend.attention(q, k, v, self.layer_idx, sliding_window=self.sliding_window)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding -> ``num_layers`` x (norm, attention, norm, SwiGLU MLP) -> norm -> LM head."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *, request_ends: bool = False) -> torch.Tensor:
        """``input_ids``, ``positions``: ``[N]`` int64 packed tokens -> logits ``[N, vocab_size]``;
        with ``request_ends``, logits at :func:`fullgraph_backend.request_ends`'s rows only."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, cos, sin)
        if request_ends:
            x = x.index_select(0, fullgraph_backend.request_ends(x))
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random weights from ``seed``: normal(0, 0.02) for matrices and biases, ones for norms.

        Drawn in float32 by a generator on the model's device, then cast: the same seed gives the
        same weights at every dtype on one device (CPU and CUDA draw different numbers).
        """
        device = self.embed_tokens.weight.device
        gen = torch.Generator(device).manual_seed(seed)
        for name, p in self.named_parameters():  # a tied head is listed once, as embed_tokens.weight
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif p.dtype == torch.float32 and self._shard(name) is None:
                p.normal_(0.0, 0.02, generator=gen)  # the same numbers, drawn in place: no copy
            else:  # drawn whole, so a tensor-parallel rank's slice holds the single-process model's values
                self.load_full(name, torch.empty(self.full_shape(name), device=device).normal_(0.0, 0.02,
                                                                                              generator=gen))
        self.rotary.reset()

    def full_shape(self, name: str) -> tuple[int, ...]:
        """Parameter ``name``'s shape in the whole model. A tensor-parallel rank holds a slice of some
        parameters (:func:`fullgraph_backend.distributed.shard_decoder`); their modules say which."""
        shard = self._shard(name)
        shape = tuple(self.get_parameter(name).shape)
        return shard.full_shape(shape) if shard else shape

    def load_full(self, name: str, value: torch.Tensor) -> None:
        """Copy ``value``, parameter ``name`` of the whole model, into this model: whole, or the slice this
        tensor-parallel rank holds."""
        shard = self._shard(name)
        self.get_parameter(name).copy_(shard.take(value) if shard else value)

    def _shard(self, name: str):
        module, _, leaf = name.rpartition(".")
        return getattr(self.get_submodule(module), "shards", {}).get(leaf)

    @torch.no_grad()
    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                           origin: Mapping[str, str] | None = None) -> None:
        """Load a Hugging Face ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` state dict, strictly.

        ``model.`` prefixes are dropped, q/k/v and gate/up are concatenated into our fused
        projections, rotary ``inv_freq`` buffers are ignored, and with tied embeddings so is
        ``lm_head.weight``. A missing, unexpected, mis-shaped or non-float tensor is an error
        naming it, and the file it came from when ``origin`` (tensor name -> file) says.
        """
        hf_names = {k.removeprefix("model."): k for k in state_dict if not k.endswith("rotary_emb.inv_freq")}
        if self.config.tie_word_embeddings:
            hf_names.pop("lm_head.weight", None)
        used, missing = set(), []
        for name, param in self.named_parameters():
            sources = self._hf_sources(name, self.full_shape(name))
            if any(s not in hf_names for s in sources):
                missing += [s for s in sources if s not in hf_names]
                continue
            for source, shape in sources.items():
                key = hf_names[source]
                tensor = state_dict[key]
                where = key + (f" (in {origin[key]})" if origin and key in origin else "")
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"{where}: shape {tuple(tensor.shape)}, expected {shape} for {self.config.name!r} "
                                     f"(our {name} is {self.full_shape(name)}); is the config right?")
                if not tensor.is_floating_point():
                    raise ValueError(f"{where}: dtype {tensor.dtype}, expected a floating-point tensor")
            values = [state_dict[hf_names[s]] for s in sources]
            self.load_full(name, torch.cat(values) if len(values) > 1 else values[0])
            used.update(sources)
        unexpected = sorted(set(hf_names) - used)
        if missing or unexpected:
            raise ValueError(f"state dict does not match {self.config.name!r}: missing {missing}, "
                             f"unexpected {unexpected}")

    def _hf_sources(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The Hugging Face tensors (without ``model.``) that make our parameter ``name``, and their shapes."""
        module, _, leaf = name.rpartition(".")
        parent, _, proj = module.rpartition(".")
        if proj not in FUSED:
            return {name: shape}
        c = self.config
        rows = [c.q_size, c.kv_size, c.kv_size] if proj == "qkv_proj" else [c.intermediate_size] * 2
        return {f"{parent}.{p}.{leaf}": (r, *shape[1:]) for p, r in zip(FUSED[proj], rows)}


def build_model(config: DecoderConfig | str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", shard: Callable[[Decoder], None] | None = None) -> Decoder:
    """A :class:`Decoder` with random weights from ``seed``, in eval mode without gradients.

    Built on the ``meta`` device and then materialised, so a large model is allocated once, at
    ``dtype``, on ``device``; ``device="meta"`` returns it unmaterialised (for shapes and counts).
    ``shard`` changes the model on the meta device, before anything is allocated: tensor
    parallelism swaps in the layers of one rank there (:func:`fullgraph_backend.distributed.shard_decoder`).
    """
    config = get_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        model = Decoder(config)
    model = model.to(dtype).eval().requires_grad_(False)
    if shard is not None:
        shard(model)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(seed)
    return model

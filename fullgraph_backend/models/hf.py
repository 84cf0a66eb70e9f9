"""Any transformers decoder on packed tokens: its own modeling code, attention through fullgraph's.

Importing this module registers ``"fullgraph"`` with transformers' ``AttentionInterface``. A model
loaded with ``attn_implementation="fullgraph"`` sends every layer's attention to
:func:`fullgraph_backend.attention` (the paged KV cache of the active forward context), so its
modeling code runs unchanged, eager or compiled, and the attention swap and full graphs apply as
they do to our own :class:`~fullgraph_backend.models.Decoder`. :class:`TransformersDecoder` gives
it the engine's contract, ``forward(input_ids [N], positions [N]) -> logits [N, vocab]``: the
step's packed tokens go in as one sequence (batch 1), our positions as ``position_ids``, with no
transformers cache (``use_cache=False``)::

    model = load_transformers_model("path/to/mistral", dtype=torch.float32, device="cpu")
    ctx = model.config.forward_context(max_num_seqs=4, max_num_tokens=64, max_model_len=128)
    with fullgraph_backend.use_forward_context(ctx):
        positions = ctx.prepare(query_lens=[3], seq_lens=[3], block_tables=[[1]])
        logits = model(torch.tensor([1, 2, 3]), positions)

No mask function is registered, on purpose: transformers' mask helpers return None at once for an
attention implementation without one (``masking_utils._preprocess_mask_arguments``, 5.17 to 5.24),
while a registered one makes them scan ``position_ids`` for packed sequences first. Which request
a token belongs to, causality and sliding windows come from the forward context's metadata.

Each rotary embedding becomes a table of its own outputs (:class:`RotaryTable`), so compiled code
looks cos and sin up instead of computing them, which Inductor on torch 2.11 did again in every
layer (docs/perf-notes.md, section 29); the lookup returns what the module returns, bit for bit.

Before any weight is read, :func:`inspect_model` runs the family's code on the meta device and
checks that every layer attends once through the interface, with no feature the paged kernels
lack (soft-capping, attention sinks, bidirectional attention, a dense mask); a family that fails
is a ValueError naming the family and the feature.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

try:
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, PretrainedConfig
except ImportError as missing:  # an optional dependency: only this module needs it
    raise ImportError(f"model_impl='transformers' needs transformers >= 5 ({missing}): "
                      f"pip install 'transformers>=5'") from missing

import fullgraph_backend
from fullgraph_backend.attention.op import attention_node
from fullgraph_backend.models.config import ForwardContextMixin
from fullgraph_backend.models.hf_configs import NAMED_CONFIGS
from fullgraph_backend.models.packing import RecordLinearInputs, pack_linears

ATTN_IMPLEMENTATION = "fullgraph"
LAYER_TYPES = ("full_attention", "sliding_attention")  # the layer types the paged kernels compute

log = logging.getLogger("fullgraph")


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, *, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
                            is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                            **_: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract on :func:`fullgraph_backend.attention`.

    ``query [1, heads, N, head_dim]``, ``key``/``value [1, kv_heads, N, head_dim]``: the step's
    packed tokens as one sequence; ``module.layer_idx`` picks the KV cache. Returns
    ``([1, N, heads, head_dim], None)`` (no attention weights). Arguments asking for what the paged
    kernels lack are a ValueError naming the module; the other keywords transformers passes
    (``position_ids``, ``use_cache``, ...) do not change attention.
    """
    lacking = [what for what, asked in [
        ("a dense attention mask from its modeling code", attention_mask is not None),
        (f"attention logit soft-capping (softcap={softcap})", bool(softcap)),
        ("attention sinks (s_aux)", s_aux is not None),
        (f"attention dropout {dropout} (training mode)", bool(dropout)),
        ("bidirectional attention", not (is_causal if is_causal is not None else getattr(module, "is_causal", True))),
        (f"a batch of {query.shape[0]} sequences (packed tokens come as one)", query.shape[0] != 1),
    ] if asked]
    if lacking:
        raise ValueError(f"{type(module).__name__} asks for {' and '.join(lacking)}, which fullgraph's paged "
                         f"attention does not support; run this model with transformers itself")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = fullgraph_backend.attention(q, k, v, module.layer_idx, scale=scaling, sliding_window=sliding_window)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


@dataclass(frozen=True)
class TransformersConfig(ForwardContextMixin):
    """What the engine reads of a transformers model, as :func:`inspect_model` found it: name and
    family, vocabulary, position limit, the paged KV cache's layout, each layer's sliding window
    (None: full attention), and the groups of linears that read one input (module names, packed
    into one tensor each by :class:`TransformersDecoder`)."""

    name: str
    model_type: str
    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    sliding_windows: tuple[int | None, ...]
    sibling_linears: tuple[tuple[str, ...], ...]


class TransformersDecoder(nn.Module):
    """A transformers causal LM loaded with ``attn_implementation="fullgraph"``, behind the
    engine's model contract; in eval mode, without gradients. Each group of linears that reads one
    input (``config.sibling_linears``) has its weights packed into one tensor
    (:mod:`~fullgraph_backend.models.packing`), for the ``merge_linears`` pass."""

    def __init__(self, model: nn.Module, config: TransformersConfig) -> None:
        super().__init__()
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{config.name}: the model runs attn_implementation="
                             f"{model.config._attn_implementation!r}, which would attend across the packed "
                             f"requests; load it with attn_implementation={ATTN_IMPLEMENTATION!r}")
        self.model, self.config = model, config
        pack_linears(model, config.sibling_linears)
        tabulate_rotary(model, config.max_position_embeddings, model.dtype)
        self.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *, request_ends: bool = False) -> torch.Tensor:
        """``input_ids``, ``positions``: ``[N]`` int64 packed tokens -> logits ``[N, vocab_size]``;
        with ``request_ends``, logits at :func:`fullgraph_backend.request_ends`'s rows only."""
        keep = fullgraph_backend.request_ends(input_ids) if request_ends else 0
        return self.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                          logits_to_keep=keep).logits[0]


class RotaryTable(nn.Module):
    """A transformers rotary embedding as a lookup: its ``(cos, sin)`` for every position below
    ``num_positions``, made once by the module's own forward (its ``inv_freq`` and
    ``attention_scaling``, in float32, cast to ``dtype`` as its forward casts), one table per layer
    type where the module keeps one set of frequencies each (Gemma 3's ``rope_type`` dict).

    Only for frequencies fixed at construction: :func:`tabulate_rotary` keeps the forward of the
    rope types that reset them from each call's positions.
    """

    def __init__(self, rotary: nn.Module, num_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_types = list(rotary.rope_type) if isinstance(rotary.rope_type, dict) else [None]
        device = next(rotary.buffers()).device
        x = torch.empty(0, dtype=dtype, device=device)  # the forward reads only its dtype and device
        positions = torch.arange(num_positions, device=device)[None]
        with torch.no_grad():
            tables = [_rotary_call(rotary, x, positions, layer_type) for layer_type in self.layer_types]
        rows = [torch.cat([cos[0], sin[0]], dim=-1) for cos, sin in tables]  # cos | sin: one gather a step
        self.register_buffer("cos_sin", torch.stack(rows), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary module's contract: ``position_ids [batch, tokens]`` -> ``cos``, ``sin`` of
        ``[batch, tokens, head_dim]`` (``x`` is not read: the table has the forward's dtype)."""
        table = self.cos_sin[self.layer_types.index(layer_type)]
        # index_select of flat positions: Inductor gathers cos | sin rows once a step, in one launch
        # (indexing with position_ids itself became two launches, cos and sin, on torch 2.11)
        rows = table.index_select(0, position_ids.flatten()).view(*position_ids.shape, -1)
        cos, sin = rows.chunk(2, dim=-1)
        return cos, sin


def _rotary_call(rotary: nn.Module, x: torch.Tensor, positions: torch.Tensor,
                 layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary(x, positions) if layer_type is None else rotary(x, positions, layer_type)


def tabulate_rotary(model: nn.Module, num_positions: int, dtype: torch.dtype) -> None:
    """Replace every rotary embedding of ``model`` (a module with transformers' ``rope_type``) by a
    :class:`RotaryTable` of ``num_positions`` positions in ``dtype`` (the hidden states', to which
    the forward casts cos and sin), unless its frequencies follow each call's positions
    (``dynamic`` and ``longrope`` types) or the table would not return what it returns; each
    module kept says why in the log."""
    for name, rotary in list(model.named_modules()):
        if getattr(rotary, "rope_type", None) is None:
            continue
        table, why = _tabulate(rotary, num_positions, dtype)
        if table is None:
            log.info("fullgraph: %s keeps its own rotary forward: %s", name, why)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, table)


def _tabulate(rotary: nn.Module, num_positions: int, dtype: torch.dtype) -> tuple[RotaryTable | None, str]:
    """``rotary``'s table, or None and why not. The table must return what the forward returns on a
    few positions out of order, which guards families whose rotary takes other positions
    (multimodal RoPE) or other arguments."""
    kinds = set(rotary.rope_type.values()) if isinstance(rotary.rope_type, dict) else {rotary.rope_type}
    moving = sorted(k for k in kinds if "dynamic" in k or k == "longrope")
    if moving:
        return None, f"rope type {moving} sets its frequencies from each call's positions (dynamic_rope_update)"
    try:
        table = RotaryTable(rotary, num_positions, dtype)
        probe = torch.tensor([[num_positions - 1, 0, num_positions // 2, 1]], device=table.cos_sin.device)
        x = torch.empty(0, dtype=dtype, device=probe.device)
        with torch.no_grad():
            for layer_type in table.layer_types:
                want, got = _rotary_call(rotary, x, probe, layer_type), table(x, probe, layer_type)
                if any(w.shape != g.shape or not torch.equal(w, g) for w, g in zip(want, got)):
                    return None, f"a table of its outputs differs from its forward on positions {probe.tolist()}"
    except Exception as error:  # a forward that does not take (x, position_ids[, layer_type])
        return None, f"its forward cannot be tabulated ({type(error).__name__}: {error})"
    return table, ""


class _AttentionCall(NamedTuple):
    layer_idx: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None


class _RecordAttention(TorchDispatchMode):
    """Records every ``fullgraph::attention`` call (layer, KV shape, window) of the ops it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_AttentionCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is attention_node._opoverload:
            _, k, _, layer_idx, _, window = args
            self.calls.append(_AttentionCall(layer_idx, k.shape[1], k.shape[2], window or None))
        return func(*args, **(kwargs or {}))


def inspect_model(hf_config: PretrainedConfig, name: str, dtype: torch.dtype) -> TransformersConfig:
    """Check that fullgraph can run this family and read its shapes, from the config alone.

    Builds the model on the meta device (no memory, no weights) and runs one two-token step,
    recording each attention call. A ValueError names the family and what it lacks: a causal-LM
    class in transformers, attention through ``AttentionInterface``, one call per layer with one
    KV shape, or a feature :func:`paged_attention_forward` refuses. The same run finds the linears
    that read one input (:class:`~fullgraph_backend.models.packing.RecordLinearInputs`).
    """
    family = hf_config.model_type
    text = hf_config.get_text_config()
    other = sorted(set(getattr(text, "layer_types", None) or ()) - set(LAYER_TYPES))
    if other:
        raise ValueError(f"{family}: layer types {other} are not supported; fullgraph's paged attention "
                         f"computes {list(LAYER_TYPES)}")
    try:
        with torch.device("meta"):
            # a copy: from_config writes the attention implementation into the config it gets
            model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), attn_implementation=ATTN_IMPLEMENTATION,
                                                     dtype=dtype)
    except ValueError as error:
        raise ValueError(f"{family}: transformers has no causal LM for this config "
                         f"({str(error).splitlines()[0]})") from error
    if not model.is_backend_compatible():
        raise ValueError(f"{family}: transformers' {type(model).__name__} does not call attention through "
                         f"AttentionInterface, so fullgraph's paged attention cannot take its place")
    record, linears = _RecordAttention(), RecordLinearInputs(model)
    try:
        with record, linears, torch.inference_mode():
            logits = model.eval()(input_ids=torch.zeros(1, 2, dtype=torch.int64, device="meta"),
                                  position_ids=torch.arange(2, device="meta")[None], use_cache=False).logits
    except ValueError as error:  # a feature paged_attention_forward refuses
        raise ValueError(f"{family}: {error}") from error
    except Exception as error:
        raise ValueError(f"{family}: its forward fails on the meta device, where fullgraph checks its attention "
                         f"({type(error).__name__}: {error})") from error
    calls = sorted(record.calls)
    num_layers = text.num_hidden_layers
    if [c.layer_idx for c in calls] != list(range(num_layers)):
        raise ValueError(f"{family}: attention ran for layers {[c.layer_idx for c in calls]} of {num_layers}; "
                         f"fullgraph's paged KV cache needs every layer to attend once through "
                         f"AttentionInterface into a cache of its own")
    shapes = sorted({c[1:3] for c in calls})
    if len(shapes) > 1:
        raise ValueError(f"{family}: layers differ in (KV heads, head dim): {shapes}; fullgraph's paged KV "
                         f"cache has one shape for every layer")
    windows = tuple(c.sliding_window for c in calls)
    expected = tuple(_config_window(text, i) for i in range(num_layers))
    if windows != expected:
        raise ValueError(f"{family}: layers pass sliding windows {list(windows)} to attention, but the config "
                         f"makes them {list(expected)}; fullgraph applies the windows passed")
    return TransformersConfig(name=name, model_type=family, vocab_size=logits.shape[-1],
                              max_position_embeddings=text.max_position_embeddings, num_layers=num_layers,
                              num_kv_heads=shapes[0][0], head_dim=shapes[0][1], sliding_windows=windows,
                              sibling_linears=linears.groups())


def _config_window(text: PretrainedConfig, layer: int) -> int | None:
    """The sliding window transformers' own masks give ``layer`` (``layer_types`` where the family
    has them, else ``sliding_window`` on every layer)."""
    window = getattr(text, "sliding_window", None) or None
    layer_types = getattr(text, "layer_types", None)
    return window if not layer_types or layer_types[layer] == "sliding_attention" else None


def build_transformers_model(name: str, *, dtype: torch.dtype, device: torch.device | str,
                             seed: int = 0) -> TransformersDecoder:
    """The named config (:data:`NAMED_CONFIGS`) with transformers' own random initialisation from
    ``seed``, built directly on ``device`` at ``dtype``; the global RNG is left as it was."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"no transformers config named {name!r}; known: {sorted(NAMED_CONFIGS)}")
    kwargs = dict(NAMED_CONFIGS[name])
    hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config = inspect_model(hf_config, name, dtype)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    return TransformersDecoder(model, config)


def load_transformers_model(path: str | Path, *, dtype: torch.dtype, device: torch.device | str) -> TransformersDecoder:
    """A local Hugging Face directory through transformers' modeling code, weights from
    ``*.safetensors`` only (never pickle), strictly: a missing, unexpected or mis-shaped tensor is
    an error naming it."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model directory {path} has no *.safetensors weights; pickle checkpoints are not loaded "
                         f"(convert them to safetensors)")
    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    config = inspect_model(hf_config, path.name, dtype)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), config=hf_config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype, use_safetensors=True,
        local_files_only=True, output_loading_info=True)
    # a mis-shaped tensor is already an error in from_pretrained (ignore_mismatched_sizes=False)
    problems = {kind: sorted(map(str, info[kind])) for kind in ("missing_keys", "unexpected_keys", "error_msgs")
                if info.get(kind)}
    if problems:
        raise ValueError(f"{path}: the weights do not match its {hf_config.model_type} config: {problems}")
    return TransformersDecoder(model.to(device), config)

"""Shapes of the Llama / Qwen2 decoders we build, as one frozen dataclass, and the named ones.

``get_config("qwen2.5-1.5b")`` gives the benchmark model's shapes; ``DecoderConfig.from_hf_config``
reads a Hugging Face ``config.json`` dict (``model_type`` ``qwen2`` or ``llama``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from fullgraph_backend.forward_context import ForwardContext


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's RoPE frequency scaling (``rope_type: "llama3"``), the only scaling supported.

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are stretched by
    ``factor``, those shorter than ``... / high_freq_factor`` kept, the band between interpolated.
    """

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported (only 'llama3')")
        if not self.factor > 0 or not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"llama3 rope scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, "
                             f"got factor={self.factor}, low={self.low_freq_factor}, high={self.high_freq_factor}")
        _check_positive("original_max_position_embeddings", self.original_max_position_embeddings, "rope_scaling")

    def scale(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Scaled inverse frequencies (the formula of Hugging Face's ``_compute_llama3_parameters``)."""
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)


class ForwardContextMixin:
    """What the engine asks of every model's config: ``forward_context(...)`` from the fields
    ``num_layers``, ``num_kv_heads``, ``head_dim``, ``max_position_embeddings`` and ``name``.

    Shared by our :class:`DecoderConfig` and the transformers adapter's config
    (:mod:`fullgraph_backend.models.hf`), so both size the paged KV cache the same way.
    """

    def forward_context(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        **kw: Any) -> ForwardContext:
        """A :class:`ForwardContext` with this model's layers and KV heads; ``kw`` go to it as is.

        ``max_model_len`` defaults to ``min(2048, max_position_embeddings)`` and may not exceed
        ``max_position_embeddings`` (the rotary table's length).
        """
        max_model_len = kw.pop("max_model_len", min(2048, self.max_position_embeddings))
        if max_model_len > self.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds {self.name!r}'s max_position_embeddings "
                             f"{self.max_position_embeddings}")
        return ForwardContext(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                              dtype=dtype, device=device, max_model_len=max_model_len, **kw)


@dataclass(frozen=True)
class DecoderConfig(ForwardContextMixin):
    """Shapes and constants of a Llama / Qwen2-family decoder; validated on construction.

    ``sliding_window`` (if set) applies to every layer; ``rope_scaling`` is None or Llama 3's.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    rope_scaling: Optional[RopeScaling] = None
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings"):
            _check_positive(f, getattr(self, f), self.name)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config {self.name!r}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        for f in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"config {self.name!r}: {f} must be a positive number, got {value!r}")
        for f in ("qkv_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"config {self.name!r}: {f} must be a bool, got {getattr(self, f)!r}")
        if self.sliding_window is not None:
            _check_positive("sliding_window", self.sliding_window, self.name)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"config {self.name!r}: rope_scaling must be None or a RopeScaling, "
                             f"got {self.rope_scaling!r}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "DecoderConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], name: str | None = None) -> "DecoderConfig":
        """Build from a Hugging Face ``config.json`` dict of a ``qwen2`` or ``llama`` model.

        Features our decoder lacks (other families, biases on o_proj or the MLP, activations other
        than SiLU, RoPE scalings other than llama3, sliding windows on some layers only) are an
        :class:`UnsupportedConfig`. A missing required key is a ``KeyError`` naming it; a value of
        the wrong type is a ``ValueError`` naming its key.
        """
        model_type = hf.get("model_type")
        if model_type not in ("qwen2", "llama"):
            raise UnsupportedConfig(f"from_hf_config supports model_type 'qwen2' and 'llama', got {model_type!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfig(f"only hidden_act 'silu' is supported, got {hf['hidden_act']!r}")
        if _hf(hf, "mlp_bias", _BOOL, False):
            raise UnsupportedConfig("mlp_bias=True is not supported")
        attention_bias = _hf(hf, "attention_bias", _BOOL, False)
        if model_type == "llama" and attention_bias:
            raise UnsupportedConfig("llama attention_bias=True (biases on q, k, v and o_proj) is not supported")
        heads = _hf(hf, "num_attention_heads", _POSITIVE)
        hidden = _hf(hf, "hidden_size", _POSITIVE)
        rope_key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        rope = hf.get(rope_key) or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"{rope_key} must be an object, got {rope!r:.80}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            where = rope_key + "."
            scaling = RopeScaling(factor=_hf(rope, "factor", _NUMBER, where=where),
                                  low_freq_factor=_hf(rope, "low_freq_factor", _NUMBER, where=where),
                                  high_freq_factor=_hf(rope, "high_freq_factor", _NUMBER, where=where),
                                  original_max_position_embeddings=_hf(rope, "original_max_position_embeddings",
                                                                       _POSITIVE, where=where))
        elif rope_type == "default":
            scaling = None
        else:
            raise UnsupportedConfig(f"rope scaling type {rope_type!r} is not supported (only 'default' and 'llama3')")
        return cls(
            vocab_size=_hf(hf, "vocab_size", _POSITIVE),
            hidden_size=hidden,
            intermediate_size=_hf(hf, "intermediate_size", _POSITIVE),
            num_layers=_hf(hf, "num_hidden_layers", _POSITIVE),
            num_heads=heads,
            num_kv_heads=_hf(hf, "num_key_value_heads", _POSITIVE, heads),
            head_dim=_hf(hf, "head_dim", _POSITIVE, hidden // heads),
            rms_norm_eps=_hf(hf, "rms_norm_eps", _NUMBER, 1e-6),
            rope_theta=_hf(hf, "rope_theta", _NUMBER, _hf(rope, "rope_theta", _NUMBER, 10000.0, rope_key + ".")),
            max_position_embeddings=_hf(hf, "max_position_embeddings", _POSITIVE),
            qkv_bias=model_type == "qwen2" or attention_bias,
            tie_word_embeddings=_hf(hf, "tie_word_embeddings", _BOOL, False),
            sliding_window=_hf_sliding_window(hf),
            rope_scaling=scaling,
            name=name or hf.get("_name_or_path") or model_type,
        )


class UnsupportedConfig(ValueError):
    """A valid config of a model our decoder does not define (transformers' modeling code may)."""


def _check_positive(field: str, value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config {name!r}: {field} must be a positive int, got {value!r}")


def _hf_sliding_window(hf: Mapping[str, Any]) -> int | None:
    """Qwen2: ``use_sliding_window`` makes layers ``>= max_window_layers`` slide; we need all or none."""
    layer_types = hf.get("layer_types")
    if layer_types is not None and not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        raise ValueError(f"layer_types must be a list of strings, got {layer_types!r:.80}")
    window = _hf(hf, "sliding_window", _COUNT, 0)  # 0 or null: no window
    if layer_types:
        sliding = [t == "sliding_attention" for t in layer_types]
    elif _hf(hf, "use_sliding_window", _BOOL, False) and window:
        first = _hf(hf, "max_window_layers", _COUNT, 0)
        sliding = [i >= first for i in range(_hf(hf, "num_hidden_layers", _POSITIVE))]
    else:
        return None
    if all(sliding) and window:
        return window
    if not any(sliding):
        return None
    raise UnsupportedConfig(f"sliding window on some layers only is not supported (sliding layers: "
                     f"{[i for i, s in enumerate(sliding) if s]}); the decoder applies one window to all layers")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


# what a config.json value must be: a description for the error, and the test
_POSITIVE = ("a positive int", lambda v: _is_int(v) and v > 0)
_COUNT = ("an int >= 0", lambda v: _is_int(v) and v >= 0)
_NUMBER = ("a finite number", _is_number)
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_REQUIRED = object()


def _hf(hf: Mapping[str, Any], key: str, kind: tuple, default: Any = _REQUIRED, where: str = "") -> Any:
    """``hf[key]`` of ``kind``; missing or null gives ``default`` (a ``KeyError`` naming it if required).

    Numbers come back as floats; ``where`` prefixes the key in messages (``"rope_scaling."``).
    """
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise KeyError(where + key)
        return default
    description, test = kind
    if not test(value):
        raise ValueError(f"{where}{key} must be {description}, got {value!r:.80}")
    return float(value) if kind is _NUMBER else value


CONFIGS: dict[str, DecoderConfig] = {
    c.name: c
    for c in [
        # CPU tests: every feature on (qkv bias, GQA, tied embeddings), small enough for 2 cores
        DecoderConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=1024, qkv_bias=True, tie_word_embeddings=True, name="tiny"),
        # Qwen/Qwen2.5-1.5B-Instruct: ~1.54B parameters, the model of the decode and serving benchmarks
        DecoderConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                      num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                      qkv_bias=True, tie_word_embeddings=True, name="qwen2.5-1.5b"),
        # meta-llama/Llama-3.2-1B: ~1.24B parameters
        DecoderConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=131072, qkv_bias=False, tie_word_embeddings=True,
                      rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=8192),
                      name="llama-3.2-1b"),
        # meta-llama/Llama-3.1-8B: ~8.03B parameters, the tensor-parallel benchmark's model
        DecoderConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=131072, qkv_bias=False, tie_word_embeddings=False,
                      rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=8192),
                      name="llama-3.1-8b"),
    ]
}


def get_config(name: str) -> DecoderConfig:
    """The named config; an unknown name is an error listing the known ones."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name]

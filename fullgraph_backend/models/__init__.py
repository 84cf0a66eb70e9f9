"""Reference decoders (Llama / Qwen2 family) on packed tokens, built from configs with random weights.

Any other transformers decoder runs through :mod:`fullgraph_backend.models.hf` (imported on its own:
it needs transformers).
"""
from fullgraph_backend.models.config import CONFIGS, DecoderConfig, RopeScaling, get_config
from fullgraph_backend.models.decoder import Decoder, build_model

__all__ = ["DecoderConfig", "RopeScaling", "CONFIGS", "get_config", "Decoder", "build_model"]

"""Named transformers configs: random-weight models of public checkpoints' shapes, for benchmarks.

``LLM(model="mistral-7b", model_impl="transformers")`` builds one with transformers' modeling code
(:func:`fullgraph_backend.models.hf.build_transformers_model`); nothing is downloaded. Kept apart
from :mod:`~fullgraph_backend.models.hf` so the engine can know the names without importing
transformers.
"""
from __future__ import annotations

from typing import Any

# model_type and config.json values; llama-3.2-1b and qwen2.5-1.5b have our own named configs' shapes
NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(  # meta-llama/Llama-3.2-1B
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(  # Qwen/Qwen2.5-1.5B-Instruct
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=True),
    "mistral-7b": dict(  # mistralai/Mistral-7B-v0.1: a 4096-token sliding window on every layer
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False),
    "gemma3-1b": dict(  # google/gemma-3-1b-it: 5 sliding-window layers (512) to 1 global, head dim 256
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
}

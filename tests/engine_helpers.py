"""Helpers for the engine tests: a tiny model written as a Hugging Face directory, prompts, a reference loop.

The named ``tiny`` config ties its embeddings and draws weights of std 0.02, so greedy decoding
mostly repeats the last token whatever attention computes. The model written here unties the
head and draws std 0.2, so its tokens depend on the whole context and a token-for-token match
between execution modes means something.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

import fullgraph_backend as fg
from fullgraph_backend.engine import LLM
from fullgraph_backend.models import Decoder, DecoderConfig, build_model, get_config

SHARP = get_config("tiny").replace(tie_word_embeddings=False, name="sharp-tiny")
MAX_MODEL_LEN = 64


def make_llm(model_dir: Path, level: int = 0, **options) -> LLM:
    """An engine on ``model_dir`` with the tests' limits (8 requests, a 32-token budget,
    :data:`MAX_MODEL_LEN`); compiled levels use Dynamo's eager compiler unless ``compile_options`` is given."""
    limits = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=MAX_MODEL_LEN, seed=0)
    if level:
        limits["compile_options"] = options.pop("compile_options", {"compiler": "eager"})
    return LLM(str(model_dir), optimization_level=level, **{**limits, **options})


def hf_config_dict(config: DecoderConfig, eos_token_id: int | None = None) -> dict:
    """A Qwen2 ``config.json`` for ``config``."""
    return {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": "silu", "eos_token_id": eos_token_id,
    }


def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Our fused parameters split back into Hugging Face's names."""
    c = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        prefix = "" if name.startswith("lm_head") else "model."
        if ".qkv_proj." in name:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split([c.q_size, c.kv_size, c.kv_size])):
                out[prefix + name.replace("qkv_proj", part)] = piece.contiguous()
        elif ".gate_up_proj." in name:
            for part, piece in zip(("gate_proj", "up_proj"), t.chunk(2)):
                out[prefix + name.replace("gate_up_proj", part)] = piece.contiguous()
        else:
            out[prefix + name] = t.contiguous()
    return out


def sharp_model(config: DecoderConfig = SHARP, seed: int = 0, std: float = 0.2) -> Decoder:
    """``config`` with weights of std ``std`` (norms stay ones), float32 on the CPU."""
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def write_hf_model(path: Path, model: Decoder, eos_token_id: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` into ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.config, eos_token_id)))
    save_file(hf_state_dict(model), str(path / "model.safetensors"))
    return path


def mixed_prompts(num: int, seed: int = 0, vocab: int = 512, max_len: int = 40) -> list[list[int]]:
    """``num`` prompts of random lengths 1..max_len."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(num)]


def reference_greedy(model: Decoder, prompt: list[int], max_tokens: int, max_model_len: int = 64) -> list[int]:
    """Greedy decoding of one prompt alone with the eager model: prefill, then a token per step,
    stopping after ``max_tokens`` or at ``max_model_len`` tokens in all, as the engine does."""
    ctx = model.config.forward_context(max_num_seqs=1, max_num_tokens=max_model_len, max_model_len=max_model_len)
    table = [list(range(1, 1 + ctx.max_blocks_per_seq))]
    tokens = list(prompt)
    with fg.use_forward_context(ctx), torch.inference_mode():
        fed = 0
        while len(tokens) - len(prompt) < max_tokens and len(tokens) < max_model_len:
            positions = ctx.prepare([len(tokens) - fed], [len(tokens)], table)
            logits = model(torch.tensor(tokens[fed:]), positions)
            fed = len(tokens)
            tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt):]

"""The engine's model: a named reference config with random weights, or a Hugging Face directory.

A directory holds ``config.json`` (``model_type`` ``qwen2`` or ``llama``) and one or more
``*.safetensors`` files, read with the safetensors library; EOS ids come from ``config.json``
and ``generation_config.json``; a tokenizer (``tokenizer.json``) is loaded with transformers
when both are there, and is optional.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fullgraph_backend.models import CONFIGS, Decoder, DecoderConfig, build_model, get_config

log = logging.getLogger("fullgraph")


@dataclass
class LoadedModel:
    model: Decoder
    eos_token_ids: frozenset[int]
    tokenizer: Any = None  # a transformers tokenizer, or None


def load_model(model: str, *, dtype: torch.dtype, device: torch.device, seed: int) -> LoadedModel:
    """Build a named config (random weights from ``seed``) or load a local HF-format directory."""
    path = Path(model)
    if model in CONFIGS:
        return LoadedModel(build_model(get_config(model), seed=seed, dtype=dtype, device=device), frozenset())
    if not path.is_dir():
        raise ValueError(f"model {model!r} is neither a named config ({sorted(CONFIGS)}) nor a local directory "
                         f"(nothing is downloaded)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {path} has no config.json")
    hf = json.loads(config_file.read_text())
    try:
        config = DecoderConfig.from_hf_config(hf, name=path.name)
    except KeyError as missing:
        raise ValueError(f"{config_file} lacks {missing}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {path} has no *.safetensors weights")
    decoder = build_model(config, dtype=dtype, device="meta")
    decoder.to_empty(device=device)
    decoder.tie_weights()
    decoder.rotary.reset()
    decoder.load_hf_state_dict(_read_safetensors(files))
    return LoadedModel(decoder, _eos_ids(path, hf), _tokenizer(path))


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            if name in state:
                raise ValueError(f"tensor {name!r} appears in more than one safetensors file ({f.name})")
            state[name] = tensor
    return state


def _eos_ids(path: Path, hf: dict) -> frozenset[int]:
    ids: set[int] = set()
    sources = [hf]
    generation = path / "generation_config.json"
    if generation.is_file():
        sources.append(json.loads(generation.read_text()))
    for source in sources:
        eos = source.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return frozenset(int(i) for i in ids)


def _tokenizer(path: Path) -> Any:
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning("fullgraph: %s has a tokenizer but transformers is not installed: no text", path)
        return None
    return AutoTokenizer.from_pretrained(str(path))

"""The engine's model: a named reference config with random weights, or a Hugging Face directory.

A directory holds ``config.json`` and one or more ``*.safetensors`` files, read with the
safetensors library; EOS ids come from ``config.json`` and ``generation_config.json``; a
tokenizer (``tokenizer.json``) is loaded with transformers when both are there, and is optional.
``model_impl`` picks who defines the model: our decoder (``model_type`` ``qwen2`` or ``llama``)
or transformers' modeling code for any family (:mod:`fullgraph_backend.models.hf`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fullgraph_backend.models import CONFIGS, DecoderConfig, build_model, get_config
from fullgraph_backend.models.hf_configs import NAMED_CONFIGS

log = logging.getLogger("fullgraph")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a Decoder, or a models.hf.TransformersDecoder
    eos_token_ids: frozenset[int]
    tokenizer: Any = None  # a transformers tokenizer, or None


def load_model(model: str, *, dtype: torch.dtype, device: torch.device, seed: int,
               model_impl: str = "auto") -> LoadedModel:
    """Build a named config (random weights from ``seed``) or load a local HF-format directory,
    as our decoder or through transformers' modeling code (``model_impl``, see :func:`_uses_transformers`)."""
    path = Path(model)
    if model in CONFIGS or model in NAMED_CONFIGS:
        if _uses_transformers(model_impl, model, None if model in CONFIGS else "fullgraph has no config of that name"):
            from fullgraph_backend.models.hf import build_transformers_model  # imports transformers: only here

            return LoadedModel(build_transformers_model(model, dtype=dtype, device=device, seed=seed), frozenset())
        return LoadedModel(build_model(get_config(model), seed=seed, dtype=dtype, device=device), frozenset())
    if not path.is_dir():
        raise ValueError(f"model {model!r} is neither a named config ({sorted({*CONFIGS, *NAMED_CONFIGS})}) nor a "
                         f"local directory (nothing is downloaded)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {path} has no config.json")
    hf = json.loads(config_file.read_text())
    if _uses_transformers(model_impl, str(path), _why_not_ours(hf)):
        from fullgraph_backend.models.hf import load_transformers_model

        return LoadedModel(load_transformers_model(path, dtype=dtype, device=device), _eos_ids(path, hf),
                           _tokenizer(path))
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


def _uses_transformers(model_impl: str, model: str, why_not_ours: str | None) -> bool:
    """Whether ``model`` runs through transformers' modeling code (else our decoder).

    ``why_not_ours`` is None where our decoder can run it. ``auto`` takes ours then, transformers'
    otherwise, and logs which; ``fullgraph`` where ours cannot is an error saying why.
    """
    if model_impl == "auto":
        log.info("fullgraph: model_impl='auto' runs %s with %s", model,
                 "fullgraph's own decoder" if why_not_ours is None else f"transformers' modeling code ({why_not_ours})")
        return why_not_ours is not None
    if model_impl == "fullgraph" and why_not_ours is not None:
        raise ValueError(f"model_impl='fullgraph' cannot run {model}: {why_not_ours}; use model_impl='transformers' "
                         f"or 'auto'")
    return model_impl == "transformers"


def _why_not_ours(hf: dict) -> str | None:
    """Why our decoder cannot run this ``config.json``, or None. A missing key is None: the
    fullgraph path reports it by name."""
    try:
        DecoderConfig.from_hf_config(hf)
    except ValueError as error:
        return str(error)
    except KeyError:
        pass
    return None


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

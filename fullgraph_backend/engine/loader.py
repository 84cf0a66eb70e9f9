"""The engine's model: a named reference config with random weights, or a Hugging Face directory.

A directory holds ``config.json`` and one or more ``*.safetensors`` files, read with the
safetensors library; EOS ids come from ``config.json`` and ``generation_config.json``; a
tokenizer (``tokenizer.json``) is loaded with transformers when both are there, and is optional.
``model_impl`` picks who defines the model: our decoder (``model_type`` ``qwen2`` or ``llama``)
or transformers' modeling code for any family (:mod:`fullgraph_backend.models.hf`). A file that
cannot be read, or a value or tensor that does not fit, is a ``ValueError`` naming the file and
the key or tensor.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fullgraph_backend.models import CONFIGS, Decoder, DecoderConfig, build_model, get_config
from fullgraph_backend.models.config import UnsupportedConfig
from fullgraph_backend.models.hf_configs import NAMED_CONFIGS

log = logging.getLogger("fullgraph")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a Decoder, or a models.hf.TransformersDecoder
    eos_token_ids: frozenset[int]
    tokenizer: Any = None  # a transformers tokenizer, or None


def load_model(model: str, *, dtype: torch.dtype, device: torch.device, seed: int,
               model_impl: str = "auto", shard: Callable[[Decoder], None] | None = None) -> LoadedModel:
    """Build a named config (random weights from ``seed``) or load a local HF-format directory,
    as our decoder or through transformers' modeling code (``model_impl``, see :func:`_uses_transformers`).

    Which one ``model`` means is :func:`model_directory`'s rule. ``shard`` (tensor parallelism:
    :func:`fullgraph_backend.distributed.shard_decoder`) makes our decoder one rank's part before
    its weights are allocated; transformers' code has no such split, so it is an error there.
    """
    config = decoder_config(model, model_impl)
    path = model_directory(model)
    if config is None:
        if shard is not None:
            raise ValueError(f"tensor_parallel_size > 1 runs fullgraph's own decoder (Llama, Qwen2) only; {model} "
                             f"needs transformers' modeling code: use tensor_parallel_size=1")
        # imports transformers: only here
        from fullgraph_backend.models.hf import build_transformers_model, load_transformers_model

        if path is None:
            return LoadedModel(build_transformers_model(model, dtype=dtype, device=device, seed=seed), frozenset())
        return LoadedModel(load_transformers_model(path, dtype=dtype, device=device),
                           _eos_ids(path, _config_json(path)), _tokenizer(path))
    if path is None:
        return LoadedModel(build_model(config, seed=seed, dtype=dtype, device=device, shard=shard), frozenset())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {path} has no *.safetensors weights")
    state, origin = _read_safetensors(files)
    decoder = build_model(config, dtype=dtype, device="meta", shard=shard)
    decoder.to_empty(device=device)
    decoder.tie_weights()
    decoder.rotary.reset()
    decoder.load_hf_state_dict(state, origin)
    return LoadedModel(decoder, _eos_ids(path, _config_json(path)), _tokenizer(path))


def decoder_config(model: str, model_impl: str = "auto") -> DecoderConfig | None:
    """The config our decoder runs ``model`` with (a named config, or the directory's ``config.json``),
    read without weights; None where ``model_impl`` picks transformers' modeling code."""
    path = model_directory(model)
    if path is None:
        why_not_ours = None if model in CONFIGS else "fullgraph has no config of that name"
        return None if _uses_transformers(model_impl, model, why_not_ours) else get_config(model)
    hf = _config_json(path)
    if _uses_transformers(model_impl, str(path), _why_not_ours(hf)):
        return None
    try:
        return DecoderConfig.from_hf_config(hf, name=path.name)
    except KeyError as missing:
        raise ValueError(f"{path / 'config.json'} lacks {missing}") from None
    except ValueError as bad:
        raise ValueError(f"{path / 'config.json'}: {bad}") from None


def model_directory(model: str) -> Path | None:
    """The directory ``model`` names, or None when it names a built-in config.

    An existing path always means the directory. A built-in config name that is also an
    existing path (``tiny`` with a ``./tiny`` folder) is ambiguous, so an error; so is a name
    that is neither, and a path-looking name (``./x``, ``a/b``, ``~/x``) that does not exist.
    """
    path = Path(model).expanduser()
    if model in CONFIGS or model in NAMED_CONFIGS:
        if path.exists():
            raise ValueError(f"model {model!r} is both a built-in config (random weights) and the path "
                             f"{path.resolve()}: pass {'./' + model!r} (or an absolute path) to load the directory; "
                             f"for the built-in config, run from a folder without {model!r} in it or rename it")
        return None
    if not path.exists():
        if os.sep in model or "/" in model or model.startswith((".", "~")):
            raise ValueError(f"model directory {model!r} does not exist ({path.absolute()}); nothing is downloaded: "
                             f"a Hugging Face hub id must be downloaded first and its directory passed")
        raise ValueError(f"model {model!r} is neither a named config ({sorted({*CONFIGS, *NAMED_CONFIGS})}) nor a "
                         f"local directory (nothing is downloaded)")
    if not path.is_dir():
        raise ValueError(f"model {model!r} is a file; pass the directory that holds config.json and *.safetensors")
    return path


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


def _config_json(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {path} has no config.json")
    return _read_json(config_file)


def _why_not_ours(hf: dict) -> str | None:
    """Why our decoder cannot run this ``config.json``, or None. A missing key or a bad value is
    None: the fullgraph path reports it by name."""
    try:
        DecoderConfig.from_hf_config(hf)
    except UnsupportedConfig as error:
        return str(error)
    except (KeyError, ValueError):
        pass
    return None


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; anything else is a ValueError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError covers bad JSON and bad UTF-8
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _read_safetensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of ``files`` by name, and the file each came from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read weights file {f}: {e}; it is truncated, empty or not a safetensors file "
                             f"(download it again)") from None
        for name, tensor in tensors.items():
            if name in state:
                raise ValueError(f"tensor {name!r} appears in more than one safetensors file ({origin[name]} and "
                                 f"{f.name})")
            state[name], origin[name] = tensor, f.name
    return state, origin


def _eos_ids(path: Path, hf: dict) -> frozenset[int]:
    ids: set[int] = set()
    sources = {path / "config.json": hf}
    generation = path / "generation_config.json"
    if generation.is_file():
        sources[generation] = _read_json(generation)
    for file, source in sources.items():
        eos = source.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
            raise ValueError(f"{file}: eos_token_id must be a token id or a list of them, got "
                             f"{source.get('eos_token_id')!r:.80}")
        ids.update(eos)
    return frozenset(ids)


def _tokenizer(path: Path) -> Any:
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning("fullgraph: %s has a tokenizer but transformers is not installed: no text", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises whatever its parsers raise (JSON, KeyError, tokenizers' own)
        raise ValueError(f"cannot load the tokenizer in {path} (tokenizer.json and tokenizer_config.json): "
                         f"{type(e).__name__}: {e}") from e

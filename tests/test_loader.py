"""The engine's loader: which model a name means, and errors that name the file and the key or tensor."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import SHARP, hf_config_dict, hf_state_dict, sharp_model, write_hf_model
from fullgraph_backend.engine.loader import load_model, model_directory
from fullgraph_backend.models import CONFIGS


def load(model: str | Path):
    return load_model(str(model), dtype=torch.float32, device=torch.device("cpu"), seed=0)


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return write_hf_model(tmp_path / "m", sharp_model())


# ---- which model a name means -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_built_in_name_that_is_also_a_directory_is_an_error_naming_both(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_directory(name) is None  # no folder: the built-in config
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=rf"both a built-in config .* {tmp_path / name}: pass '\./{name}'") as e:
        load(name)
    assert "for the built-in config" in str(e.value)
    assert model_directory(f"./{name}") == Path(f"./{name}")


def test_dot_slash_loads_the_directory_shadowing_a_built_in_name(tmp_path, monkeypatch):
    model = sharp_model()
    write_hf_model(tmp_path / "tiny", model)
    monkeypatch.chdir(tmp_path)
    loaded = load("./tiny").model
    assert loaded.config.tie_word_embeddings is False  # the built-in tiny ties them
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["./nope", "no/such/dir", "~/no-such-fullgraph-model", "Qwen/Qwen2.5-1.5B"])
def test_a_missing_path_is_a_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"model directory '{name}' does not exist .*nothing is downloaded"):
        load(name)


def test_a_file_is_not_a_model_directory(hf_dir):
    with pytest.raises(ValueError, match="is a file; pass the directory"):
        load(hf_dir / "model.safetensors")


# ---- weights files ----------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def replace_with_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent / "missing-blob")  # what a half-deleted HF cache leaves


@pytest.mark.parametrize("damage", [
    truncate,
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(b"not a safetensors file at all" * 20),
    replace_with_link,
])
def test_an_unreadable_weights_file_is_named(hf_dir, damage):
    damage(hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"cannot read weights file .*model\.safetensors: .*download it again"):
        load(hf_dir)


def test_a_tensor_in_two_files_names_both(hf_dir):
    save_file({"model.norm.weight": torch.ones(SHARP.hidden_size)}, str(hf_dir / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"'model.norm.weight' appears in more than one .*extra.safetensors and "
                                         r"model.safetensors"):
        load(hf_dir)


def rewrite_weights(path: Path, change) -> None:
    state = hf_state_dict(sharp_model())
    change(state)
    save_file(state, str(path / "model.safetensors"))


def shift_rows(state: dict, frm: str, to: str, rows: int) -> None:
    """Move ``rows`` rows from tensor ``frm`` to tensor ``to``: the fused total stays the same."""
    state[to] = torch.cat([state[to], state[frm][:rows]])
    state[frm] = state[frm][rows:].contiguous()


@pytest.mark.parametrize("frm, to", [
    ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("model.layers.1.self_attn.v_proj.bias", "model.layers.1.self_attn.k_proj.bias"),
    ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"),
])
def test_each_projection_is_checked_on_its_own_not_by_the_fused_total(hf_dir, frm, to):
    rewrite_weights(hf_dir, lambda s: shift_rows(s, frm, to, 8))
    with pytest.raises(ValueError, match=rf"{to} \(in model\.safetensors\): shape \([\d, ]+\), expected"):
        load(hf_dir)


def test_a_non_float_tensor_is_named(hf_dir):
    rewrite_weights(hf_dir, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight \(in model\.safetensors\): dtype torch\.int32"):
        load(hf_dir)


# ---- config files ---------------------------------------------------------------------------------
def hf_config(**changes) -> dict:
    return {**hf_config_dict(SHARP), **changes}


@pytest.mark.parametrize("text, message", [
    ("{not json", r"cannot read .*config\.json: Expecting property name"),
    ("", r"cannot read .*config\.json"),
    ("[1, 2]", r"config\.json must hold a JSON object, got list"),
    ('"qwen2"', r"config\.json must hold a JSON object, got str"),
    (json.dumps(hf_config(num_attention_heads="4")), r"config\.json: num_attention_heads must be a positive int"),
    (json.dumps(hf_config(num_attention_heads=0)), r"config\.json: num_attention_heads must be a positive int"),
    (json.dumps(hf_config(hidden_size=[64])), r"config\.json: hidden_size must be a positive int"),
    (json.dumps(hf_config(rms_norm_eps="tiny")), r"config\.json: rms_norm_eps must be a finite number"),
    (json.dumps(hf_config(tie_word_embeddings="false")), r"config\.json: tie_word_embeddings must be true or false"),
    (json.dumps(hf_config(rope_scaling="yes")), r"config\.json: rope_scaling must be an object"),
    (json.dumps(hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0})),
     r"config\.json lacks 'rope_scaling\.low_freq_factor'"),
    (json.dumps(hf_config(layer_types="sliding_attention")), r"config\.json: layer_types must be a list of strings"),
    (json.dumps(hf_config(use_sliding_window=True, sliding_window="4k")), r"sliding_window must be an int >= 0"),
    (json.dumps(hf_config(eos_token_id="</s>")), r"config\.json: eos_token_id must be a token id"),
    (json.dumps(hf_config(eos_token_id=[1, None])), r"config\.json: eos_token_id must be a token id"),
])
def test_a_bad_config_json_names_the_file_and_the_key(hf_dir, text, message):
    (hf_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load(hf_dir)


@pytest.mark.parametrize("text, message", [
    ("garbage", r"cannot read .*generation_config\.json"),
    ("[]", r"generation_config\.json must hold a JSON object"),
    ('{"eos_token_id": {"id": 2}}', r"generation_config\.json: eos_token_id must be a token id"),
])
def test_a_bad_generation_config_names_the_file(hf_dir, text, message):
    (hf_dir / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load(hf_dir)


def test_a_broken_tokenizer_names_the_directory(hf_dir):
    (hf_dir / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match=rf"cannot load the tokenizer in {hf_dir}"):
        load(hf_dir)

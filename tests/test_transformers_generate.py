"""transformers' own ``generate`` with its forward compiled by ``backend="fullgraph"`` gives eager's greedy
tokens, with the static cache (tensors written in place, a CPU position counter) and the dynamic one.

Tiny random fp32 configs of each family the installed transformers has; batch 1 and 3 (left-padded).
"""
from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

DEVICE = torch.device("cpu")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
}
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tiny_model(family: str, device: torch.device = DEVICE, dtype: torch.dtype = torch.float32):
    """A tiny random model of ``family``; skips when this transformers lacks it."""
    config_name, model_name, extra = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(**TINY, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).to(device, dtype).eval()


def prompts(batch: int, device: torch.device = DEVICE):
    """``batch`` prompts of different lengths, left-padded, with their attention mask."""
    gen = torch.Generator().manual_seed(batch)
    lengths = [7, 4, 9][:batch]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, TINY["vocab_size"], (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def greedy(model, ids, mask, cache: str | None, new_tokens: int = 8) -> torch.Tensor:
    kwargs = {"cache_implementation": cache} if cache else {}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              disable_compile=True, **kwargs)


@pytest.mark.parametrize("cache", ["static", None])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_with_compiled_forward_matches_eager(family, cache):
    model = tiny_model(family)
    expected = {batch: greedy(model, *prompts(batch), cache) for batch in (1, 3)}
    model.forward = torch.compile(model.forward, backend="fullgraph", options={"compiler": "eager"})
    for batch in (3, 1, 3):
        got = greedy(model, *prompts(batch), cache)
        assert torch.equal(got, expected[batch]), f"{family}, {cache or 'dynamic'} cache, batch {batch}"


def test_static_cache_generate_with_inductor_matches_eager():
    model = tiny_model("llama")
    expected = greedy(model, *prompts(3), "static")
    model.forward = torch.compile(model.forward, backend="fullgraph")
    assert torch.equal(greedy(model, *prompts(3), "static"), expected)
    assert torch.equal(greedy(model, *prompts(3), "static"), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["static", None])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_in_cuda_graphs_matches_eager(family, cache):
    cuda = torch.device("cuda")
    model = tiny_model(family, cuda)
    expected = {batch: greedy(model, *prompts(batch, cuda), cache) for batch in (1, 3)}
    # Inductor for one family (its compile time adds up); the FX graph as traced for the others
    options = {} if family == "llama" else {"compiler": "eager"}
    model.forward = torch.compile(model.forward, backend="fullgraph", options=options)
    for batch in (3, 1, 3):
        got = greedy(model, *prompts(batch, cuda), cache)
        assert torch.equal(got, expected[batch]), f"{family}, {cache or 'dynamic'} cache, batch {batch}"


def grouped_query_heads_match_eager(family: str, device: torch.device, caplog, monkeypatch) -> None:
    """With ``group_query_heads`` at every batch (the tiny models' 2 key/value heads give too few
    pairs for the default), the static cache's decode SDPA reads the shared key/value heads (the pass
    says so in the log) and greedy tokens stay eager's, batch 3 and 1."""
    monkeypatch.setattr(sys.modules["passes.group_query_heads"], "MIN_GROUPED_PAIRS", 0)
    model = tiny_model(family, device)
    expected = {batch: greedy(model, *prompts(batch, device), "static") for batch in (1, 3)}
    model.forward = torch.compile(model.forward, backend="fullgraph")
    with caplog.at_level("INFO", logger="fullgraph"):
        for batch in (3, 1):
            assert torch.equal(greedy(model, *prompts(batch, device), "static"), expected[batch]), f"{family} {batch}"
    assert f"grouped {TINY['num_hidden_layers']} SDPA calls" in caplog.text


def test_static_cache_generate_with_grouped_query_heads_matches_eager(caplog, monkeypatch):
    grouped_query_heads_match_eager("llama", DEVICE, caplog, monkeypatch)  # Gemma too on the GPU; the pass's own tests cover the rest


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_grouped_query_heads_in_cuda_graphs_match_eager(family, caplog, monkeypatch):
    grouped_query_heads_match_eager(family, torch.device("cuda"), caplog, monkeypatch)


def models_sharing_code_match_eager(device: torch.device, caplog) -> None:
    """Several models on one forward code, as a user compiles them one after another without
    ``torch._dynamo.reset()``: two Llamas of different weights (the second runs the first's graphs,
    captured again for its weights) and a Gemma (whose attention's float ``scaling`` differs, which
    Dynamo then passes as a tensor made at each call)."""
    torch.manual_seed(1)
    other = tiny_model("llama", device)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 0.05)
    models = [tiny_model("llama", device), other, tiny_model("gemma", device)]
    expected = [greedy(m, *prompts(3, device), "static") for m in models]
    for model in models:
        model.forward = torch.compile(model.forward, backend="fullgraph", options={"compiler": "eager"})
    with caplog.at_level("INFO", logger="fullgraph"):
        for i in (0, 1, 2, 0):
            assert torch.equal(greedy(models[i], *prompts(3, device), "static"), expected[i]), f"model {i}"
    assert "moved since the capture" in caplog.text  # the second Llama ran the first's graphs
    assert "without CUDA graphs" not in caplog.text  # two moves, and Gemma's scaling is no fixed-address input


def test_models_sharing_compiled_code_in_one_process_match_eager(caplog):
    models_sharing_code_match_eager(DEVICE, caplog)


@pytest.mark.gpu
def test_models_sharing_compiled_code_in_cuda_graphs_match_eager(caplog):
    models_sharing_code_match_eager(torch.device("cuda"), caplog)

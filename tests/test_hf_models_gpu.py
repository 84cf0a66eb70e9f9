"""transformers' modeling code in the engine on the GPU (``model_impl="transformers"``): -O4 float32
greedy tokens equal transformers' own greedy ``generate`` for 1, 7 and 45 prompts, and -O4 bfloat16
logits along the engine's tokens agree with transformers' eager forward within the tolerance of
test_engine_gpu. Skipped without CUDA."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import hf_greedy, hf_logits, sharpen
from fullgraph_backend.engine import LLM
from test_engine_gpu import BF16_LOGIT_TOLERANCE, relative_error, run_forced, workload

pytestmark = pytest.mark.gpu

BATCHES = (1, 7, 45)
MAX_MODEL_LEN = 512
# test_engine_gpu's SMALL layout (its workload draws prompts from a vocabulary of 4096)
SMALL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
# windows of 64 tokens, crossed by prompts of up to 300
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": 64},
    "gemma3_text": {"sliding_window": 64, "query_pre_attn_scalar": 96,
                    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]},
}


def engine(model: str, dtype: str, **kw) -> LLM:
    options = dict(max_num_seqs=128, max_num_batched_tokens=512, max_model_len=MAX_MODEL_LEN,
                   gpu_memory_utilization=0.4, seed=0)
    return LLM(model, model_impl="transformers", optimization_level=4, dtype=dtype, **{**options, **kw})


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A small random model of the family in float32 on the GPU, saved with ``save_pretrained``; its
    weights of std 1.6 / sqrt(hidden) make greedy tokens depend on the context."""
    config = AutoConfig.for_model(request.param, **SMALL, **FAMILIES[request.param])
    model = sharpen(AutoModelForCausalLM.from_config(config).cuda(), std=1.6 / math.sqrt(SMALL["hidden_size"]))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path), model


def test_float32_o4_tokens_equal_transformers_generate(family):
    path, model = family
    llm = engine(path, "float32")
    assert llm.startup.num_graphs > 0
    for batch in BATCHES:
        prompts, params = workload(batch)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        want = [hf_greedy(model, p, sp.max_tokens) for p, sp in zip(prompts, params)]
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        assert not bad, f"batch {batch}: prompts {bad[:5]} differ, e.g. {got[bad[0]]} vs {want[bad[0]]}"


def test_bf16_o4_logits_match_transformers_eager(family):
    path, _ = family
    llm = engine(path, "bfloat16")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    for batch in (7, 45):
        tokens, got = run_forced(llm, batch)
        assert relative_error(got, hf_logits(reference, workload(batch)[0], tokens)) < BF16_LOGIT_TOLERANCE, \
            f"batch {batch}"


@pytest.mark.slow
@pytest.mark.parametrize("name, max_len", [("gemma3-1b", 700), ("mistral-7b", 300)])
def test_named_config_bf16_o4_logits_match_transformers_eager(name, max_len):
    """Benchmark shapes with random weights (gemma3-1b: prompts past its 512-token window). The
    reference is the engine's own transformers model, switched to transformers' SDPA attention.
    Random weights 32 layers deep drift in bf16 beyond the fixed tolerance whoever computes them,
    so the bar is float32: the engine's logits are no further from the float32 forward than
    transformers' own bf16 forward is (with half again as margin), or within the fixed tolerance."""
    llm = engine(name, "bfloat16", max_model_len=1024)
    shape = dict(vocab=llm.model_config.vocab_size, max_len=max_len)
    tokens, got = run_forced(llm, 7, **shape)
    prompts = workload(7, **shape)[0]
    reference = llm.runner.eager_model.model
    reference.set_attn_implementation("sdpa")
    bf16 = hf_logits(reference, prompts, tokens)
    exact = hf_logits(reference.float(), prompts, tokens)
    ours, theirs = relative_error(got, exact), relative_error(bf16, exact)
    assert ours < max(BF16_LOGIT_TOLERANCE, 1.5 * theirs), f"engine {ours:.4f}, transformers bf16 {theirs:.4f}"

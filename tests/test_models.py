"""Reference decoders: config validation, named shapes, batch independence, Dynamo tracing, HF parity."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from fullgraph_backend import use_forward_context
from fullgraph_backend.models import Decoder, DecoderConfig, RopeScaling, build_model, get_config

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16)


# ---- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(vocab_size=True), "vocab_size must be a positive int"),
    (dict(hidden_size=64.0), "hidden_size must be a positive int"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number"),
    (dict(rope_theta=-1.0), "rope_theta must be a positive number"),
    (dict(qkv_bias=1), "qkv_bias must be a bool"),
    (dict(sliding_window=0), "sliding_window must be a positive int"),
    (dict(rope_scaling={"rope_type": "llama3"}), "rope_scaling must be None or a RopeScaling"),
])
def test_config_rejects_bad_fields(change, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig(**{**TINY, **change})


def test_rope_scaling_validation_and_unknown_name():
    with pytest.raises(ValueError, match="only 'llama3'"):
        RopeScaling(rope_type="yarn")
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"known: \['llama-3.1-8b', 'llama-3.2-1b', 'qwen2.5-1.5b', 'tiny'\]"):
        get_config("qwen-7b")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        get_config("tiny").forward_context(max_model_len=4096)


@pytest.mark.parametrize("name, params, shapes", [
    # (layers, hidden, intermediate, heads, kv heads, head dim, vocab)
    ("qwen2.5-1.5b", 1_543_714_304, (28, 1536, 8960, 12, 2, 128, 151936)),
    ("llama-3.2-1b", 1_235_814_400, (16, 2048, 8192, 32, 8, 64, 128256)),
    ("llama-3.1-8b", 8_030_261_248, (32, 4096, 14336, 32, 8, 128, 128256)),  # untied head
    ("tiny", 107_072, (2, 64, 128, 4, 2, 16, 512)),
])
def test_named_configs_shapes_and_parameter_counts(name, params, shapes):
    c = get_config(name)
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
            c.vocab_size) == shapes
    model = build_model(name, device="meta", dtype=torch.bfloat16)
    assert (model.lm_head.weight is model.embed_tokens.weight) == c.tie_word_embeddings  # tied: counted once below
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.layers[0].self_attn.qkv_proj.weight.shape == (c.q_size + 2 * c.kv_size, c.hidden_size)
    assert model.embed_tokens.weight.dtype == torch.bfloat16


def test_from_hf_config_reads_the_hub_config_files():
    qwen = {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": 151936, "hidden_size": 1536,
            "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
            "max_window_layers": 21}
    assert DecoderConfig.from_hf_config(qwen, name="qwen2.5-1.5b") == get_config("qwen2.5-1.5b")
    llama = {"model_type": "llama", "hidden_act": "silu", "vocab_size": 128256, "hidden_size": 2048,
             "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
             "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
             "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert DecoderConfig.from_hf_config(llama, name="llama-3.2-1b") == get_config("llama-3.2-1b")
    # all layers sliding is one window; some layers only is an error
    assert DecoderConfig.from_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 0,
                                         "sliding_window": 4096}).sliding_window == 4096
    with pytest.raises(ValueError, match="some layers only"):
        DecoderConfig.from_hf_config({**qwen, "use_sliding_window": True})
    with pytest.raises(ValueError, match="model_type"):
        DecoderConfig.from_hf_config({**qwen, "model_type": "mistral"})
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        DecoderConfig.from_hf_config({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_build_model_is_deterministic_by_seed():
    a, b, c = build_model("tiny", seed=0), build_model("tiny", seed=0), build_model("tiny", seed=1)
    half = build_model("tiny", seed=0, dtype=torch.bfloat16)
    for (name, pa), pb, pc, ph in zip(a.named_parameters(), b.parameters(), c.parameters(), half.parameters()):
        assert torch.equal(pa, pb), name
        assert torch.equal(pa.bfloat16(), ph), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    assert a.layers[0].self_attn.qkv_proj.bias.abs().max() > 0  # small random biases, not zeros
    assert not a.training and not any(p.requires_grad for p in a.parameters())


# ---- running the tiny decoder ------------------------------------------------------------------
def _ctx(config: DecoderConfig, max_model_len=64):
    return config.forward_context(max_num_seqs=4, max_num_tokens=64, max_model_len=max_model_len)


def _blocks(ctx, num_reqs):
    w = ctx.max_blocks_per_seq
    return [list(range(1 + i * w, 1 + (i + 1) * w)) for i in range(num_reqs)]


def run_requests(model: Decoder, prompts: list[list[int]], decode_tokens: list[list[int]], max_model_len=64):
    """Prefill ``prompts`` packed in one step, then one decode step per column of ``decode_tokens``.

    Returns each request's logits, ``[len(prompt) + len(decode), vocab]``, in token order.
    """
    ctx = _ctx(model.config, max_model_len)
    tables = _blocks(ctx, len(prompts))
    lens = [len(p) for p in prompts]
    outs = []
    with use_forward_context(ctx):
        positions = ctx.prepare(lens, lens, tables)
        logits = model(torch.tensor(sum(prompts, [])), positions)
        outs.append(list(logits.split(lens)))
        for step in zip(*decode_tokens):
            lens = [s + 1 for s in lens]
            positions = ctx.prepare([1] * len(lens), lens, tables)
            outs.append(list(model(torch.tensor(step), positions).split(1)))
    return [torch.cat(per_req) for per_req in zip(*outs)]


def _tokens(gen, vocab, lengths):
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_packed_batch_equals_each_request_alone():
    model = build_model("tiny", seed=3)
    gen = torch.Generator().manual_seed(0)
    prompts = _tokens(gen, 512, [5, 14, 1, 17])  # 14 + 3 decode steps crosses a 16-token block
    decode = _tokens(gen, 512, [3] * 4)
    together = run_requests(model, prompts, decode)
    for i, (p, d) in enumerate(zip(prompts, decode)):
        alone = run_requests(model, [p], [d])[0]
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5, msg=f"request {i}")
    assert together[0].shape == (5 + 3, 512)


def test_traces_as_one_graph_with_dynamic_tokens():
    model = build_model("tiny")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    ctx = _ctx(model.config)
    tables = _blocks(ctx, 3)
    gen = torch.Generator().manual_seed(0)
    with use_forward_context(ctx):
        for query_lens, seq_lens in [([4, 3], [4, 3]), ([1, 1], [5, 4]), ([2, 6, 1], [7, 10, 1])]:
            ids = torch.randint(0, 512, (sum(query_lens),), generator=gen)
            positions = ctx.prepare(query_lens, seq_lens, tables[: len(query_lens)])
            out = compiled(ids, positions)
            # the compiled step wrote the cache; rerunning eager over the same slots writes the same K/V
            torch.testing.assert_close(out, model(ids, positions), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # no graph breaks, no recompiles across token counts


# ---- parity with Hugging Face -----------------------------------------------------------------
def _hf_model(kind: str, **extra):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, **extra)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**{**common, **extra})
        cls = transformers.LlamaForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = cls(config).eval()
    # HF inits norms to ones and biases to zeros: randomise everything so a mis-mapped tensor shows
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return hf


def _check_hf_parity(hf, *, prompt_lens=(7, 3, 12, 18), decode_steps=3):
    config = DecoderConfig.from_hf_config(hf.config.to_dict(), name="hf")
    ours = Decoder(config).eval().requires_grad_(False)
    ours.load_hf_state_dict(hf.state_dict())
    gen = torch.Generator().manual_seed(2)
    vocab = config.vocab_size
    prompts = _tokens(gen, vocab, prompt_lens)
    decode = _tokens(gen, vocab, [decode_steps] * len(prompt_lens))
    got = run_requests(ours, prompts, decode)
    for i, (p, d) in enumerate(zip(prompts, decode)):
        with torch.no_grad():  # HF over the whole sequence: the logits at every prefill and decode position
            want = hf(torch.tensor([p + d])).logits[0]
        err = (got[i] - want).abs().max() / want.abs().max()
        assert err < 1e-4, f"request {i}: relative error {err:.2e}"
    return config


def test_parity_with_hf_qwen2():
    config = _check_hf_parity(_hf_model("qwen2", rope_theta=10000.0))
    assert config.qkv_bias and config.tie_word_embeddings and config.sliding_window is None


def test_parity_with_hf_llama_with_llama3_rope_scaling():
    # original_max_position_embeddings 16 puts the head's frequencies in all three llama3 bands
    scaling = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
    config = _check_hf_parity(_hf_model("llama", rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=False))
    assert config.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=16)
    assert not config.qkv_bias and not config.tie_word_embeddings
    plain = Decoder(config.replace(rope_scaling=None)).rotary.cos_sin_cache
    assert not torch.allclose(Decoder(config).rotary.cos_sin_cache, plain)  # the scaling is not a no-op


def test_parity_with_hf_qwen2_sliding_window():
    hf = _hf_model("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=0)
    assert set(hf.config.layer_types) == {"sliding_attention"}
    config = _check_hf_parity(hf, prompt_lens=(9, 2, 16), decode_steps=3)
    assert config.sliding_window == 5


def test_load_hf_state_dict_reports_missing_and_unexpected():
    model = build_model("tiny")
    sd = {f"model.{k}": v for k, v in model.state_dict().items() if "qkv" not in k and "gate_up" not in k}
    with pytest.raises(ValueError, match=r"missing \['layers.0.self_attn.q_proj.weight'"):
        model.load_hf_state_dict({**sd, "model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        model.load_hf_state_dict({**sd, "model.extra.weight": torch.zeros(1)})

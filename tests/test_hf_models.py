"""transformers' modeling code in the engine (``model_impl="transformers"``): every supported family
equals transformers' own greedy ``generate`` token for token at -O0 and -O4, traces as one Dynamo
graph, and what the paged kernels lack is a clear error at load."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from helpers import mixed_prompts
from helpers import hf_greedy, sharpen
from fullgraph_backend import compat, use_forward_context
from fullgraph_backend.attention.op import attention_node
from fullgraph_backend.cli import main
from fullgraph_backend.engine import LLM, SamplingParams
from fullgraph_backend.models import Decoder, DecoderConfig, get_config
from fullgraph_backend.models.hf import (ATTN_IMPLEMENTATION, NAMED_CONFIGS, RotaryTable, TransformersDecoder,
                                         build_transformers_model, inspect_model, load_transformers_model,
                                         paged_attention_forward, tabulate_rotary)

VOCAB, MAX_MODEL_LEN, MAX_TOKENS = 256, 64, 12
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
# what each family adds to Llama's layout; windows of 8 tokens are crossed by prompts of up to 30
FAMILIES = {
    "llama": {},
    "qwen2": {},  # biases on q, k, v
    "qwen3": {},  # RMSNorm on each head of q and k
    "mistral": {"sliding_window": 8},  # one window on every layer
    # a window on one layer of two, its own scale (query_pre_attn_scalar), (1 + w) norms, GELU,
    # embeddings scaled by sqrt(hidden)
    "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                    "query_pre_attn_scalar": 24},
}


def hf_config(family: str, **changes):
    return AutoConfig.for_model(family, **{**TINY, **FAMILIES.get(family, {}), **changes})


@dataclass
class Family:
    name: str
    path: Path
    prompts: list[list[int]]
    want: list[list[int]]  # transformers' greedy tokens per prompt


def write_family(name: str, path: Path) -> Family:
    """A tiny random model of the family saved with ``save_pretrained`` (safetensors), and its tokens."""
    model = sharpen(AutoModelForCausalLM.from_config(hf_config(name)), std=0.2)
    model.save_pretrained(path)
    prompts = mixed_prompts(6, seed=7, vocab=VOCAB, max_len=30)
    want = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    assert len({tuple(w) for w in want}) > 1  # the tokens depend on the prompt
    return Family(name, path, prompts, want)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    return write_family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Family:
    """One family for the tests that do not depend on it."""
    return write_family("mistral", tmp_path_factory.mktemp("mistral"))


def make_llm(model, level: int = 0, **kw) -> LLM:
    options = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=MAX_MODEL_LEN, seed=0)
    return LLM(str(model), optimization_level=level, **{**options, **kw})


def run_all(llm: LLM, prompts: list[list[int]]) -> list:
    """Every prompt through ``add_request`` / ``step``; the outputs in request order."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    ids = [llm.add_request(p, params) for p in prompts]
    outputs = {}
    while llm.has_unfinished():
        outputs.update((o.request_id, o) for o in llm.step())
    return [outputs[i] for i in ids]


# ---- the engine against transformers --------------------------------------------------------------
@pytest.mark.parametrize("level", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_engine_equals_transformers_generate(family, level, caplog):
    """-O4 on CPU: the graph runner's emulated graphs, on Inductor's code for the families whose
    modeling code adds to Llama's (Llama and Qwen2 compile as our own decoder's tests do: Dynamo's
    graph, swapped and padded, runs as is; one Inductor compile fewer each on 2 CI cores). 6 blocks
    of 16 tokens hold about two requests: the others wait or are preempted and recomputed."""
    compile_options = {"compiler": "eager"} if level and family.name in ("llama", "qwen2") else None
    with caplog.at_level(logging.INFO, logger="fullgraph"):
        llm = make_llm(family.path, level, model_impl="transformers", num_kv_blocks=2 + 6,
                       compile_options=compile_options)
    model = llm.runner.eager_model
    assert isinstance(model, TransformersDecoder) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    outs = run_all(llm, family.prompts)
    assert [o.token_ids for o in outs] == family.want
    assert sum(o.num_preemptions for o in outs) > 0
    assert llm.block_manager.num_free == 6
    if level:  # graphs (emulated on CPU) were captured, and the swap pass found every layer's attention
        assert llm.startup.num_graphs > 0
        swapped = [r.getMessage() for r in caplog.records if "swapped" in r.getMessage()]
        assert len(swapped) == 1 and all(f"(layer {i})" in swapped[0] for i in range(2)), swapped


def test_auto_takes_our_decoder_for_llama_and_qwen2_and_says_which(family, caplog):
    """A directory transformers wrote: ``auto`` takes our decoder where it can (Llama, Qwen2), which then
    gives transformers' tokens too; transformers' code for the other families. Either way it says so."""
    with caplog.at_level(logging.INFO, logger="fullgraph"):
        llm = make_llm(family.path)
    ours = family.name in ("llama", "qwen2")
    assert isinstance(llm.runner.eager_model, Decoder if ours else TransformersDecoder)
    said = [r.getMessage() for r in caplog.records if "model_impl='auto'" in r.getMessage()]
    assert len(said) == 1 and ("fullgraph's own decoder" if ours else f"got '{family.name}'") in said[0], said
    if ours:
        greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        assert [o.token_ids for o in llm.generate(family.prompts, greedy)] == family.want


def test_dynamo_traces_one_graph_with_a_dynamic_token_dim(family):
    """``fullgraph=True`` (a graph break is an error), unbacked token counts as in the engine: one
    graph serves 8, 1 and 10 tokens, with each layer's ``fullgraph::attention`` node and window."""
    model = load_transformers_model(family.path, dtype=torch.float32, device="cpu")
    ctx = model.config.forward_context(max_num_seqs=4, max_num_tokens=32, max_model_len=MAX_MODEL_LEN)
    graphs = []
    compiled = torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)
    with use_forward_context(ctx), torch.inference_mode():
        for query_lens in ([5, 3], [1], [2, 7, 1]):
            positions = ctx.prepare(query_lens, query_lens, [[1], [2], [3]][:len(query_lens)])
            ids = torch.arange(sum(query_lens)) * 7 % VOCAB
            compat.mark_unbacked(ids, 0)
            compat.mark_unbacked(positions, 0)
            torch.testing.assert_close(compiled(ids, positions), model(ids, positions))
    assert len(graphs) == 1
    nodes = [n for n in graphs[0].graph.nodes if n.target is attention_node._opoverload]
    assert [n.args[3] for n in nodes] == [0, 1]
    assert tuple(n.args[5] or None for n in nodes) == model.config.sliding_windows
    if family.name == "gemma3_text":
        assert model.config.sliding_windows == (8, None)


def test_text_prompts_use_the_directory_tokenizer(mistral, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(shutil.copytree(mistral.path, tmp_path / "with-tokenizer"))
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(path)
    llm = make_llm(path, model_impl="transformers")
    prompt = mistral.prompts[0]
    out = llm.generate(" ".join(f"w{i}" for i in prompt), SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))[0]
    assert out.prompt_token_ids == prompt and out.token_ids == mistral.want[0]
    assert out.text.split() == [f"w{i}" for i in mistral.want[0]]


# ---- RoPE as a table -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rotary_table_returns_what_the_rotary_module_returns(family):
    """The wrapper swaps the rotary module for a table of its outputs, which returns its cos and sin
    bit for bit in float32 on random positions (per layer type for Gemma 3: local and global)."""
    config = hf_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    rotary = model.model.rotary_emb
    TransformersDecoder(model, inspect_model(config, family, torch.float32))
    table = model.model.rotary_emb
    assert isinstance(table, RotaryTable) and table.cos_sin.shape[1] == TINY["max_position_embeddings"]
    if family == "gemma3_text":
        assert table.layer_types == ["full_attention", "sliding_attention"]
    positions = torch.randint(0, TINY["max_position_embeddings"], (1, 50), generator=torch.Generator().manual_seed(0))
    x = torch.empty(0)
    for layer_type in table.layer_types:
        extra = () if layer_type is None else (layer_type,)
        for want, got in zip(rotary(x, positions, *extra), table(x, positions, *extra)):
            assert want.dtype == got.dtype == torch.float32 and torch.equal(want, got)


def test_rotary_modules_a_table_cannot_stand_for_keep_their_forward(caplog):
    """Frequencies that follow each call's positions (``dynamic``), or a forward that depends on the
    call's positions as a whole, keep the module's own forward, and the log says why."""
    class WholeCall(torch.nn.Module):
        rope_type = "default"

        def __init__(self):
            super().__init__()
            self.inv_freq = torch.nn.Buffer(torch.ones(2), persistent=False)

        def forward(self, x, position_ids):
            cos = (position_ids - position_ids.float().mean())[..., None].expand(-1, -1, 4)
            return cos, cos

    dynamic = AutoModelForCausalLM.from_config(hf_config("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                                               attn_implementation=ATTN_IMPLEMENTATION)
    parent = torch.nn.Module()
    parent.rotary = WholeCall()
    with caplog.at_level(logging.INFO, logger="fullgraph"):
        tabulate_rotary(dynamic, 64, torch.float32)
        tabulate_rotary(parent, 64, torch.float32)
    assert not isinstance(dynamic.model.rotary_emb, RotaryTable) and isinstance(parent.rotary, WholeCall)
    said = [r.getMessage() for r in caplog.records if "keeps its own rotary forward" in r.getMessage()]
    assert len(said) == 2 and "['dynamic']" in said[0] and "differs from its forward" in said[1], said


# ---- what fails, and how -----------------------------------------------------------------------
@pytest.mark.parametrize("family, changes, message", [
    ("gemma2", {"sliding_window": 8}, r"gemma2: Gemma2Attention asks for attention logit soft-capping "
                                      r"\(softcap=50.0\), which fullgraph's paged attention does not support"),
    ("gpt_oss", {"num_local_experts": 2, "num_experts_per_tok": 1}, r"gpt_oss: .* attention sinks \(s_aux\)"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "gemma3_text: .* bidirectional attention"),
    ("qwen3_next", {}, r"qwen3_next: layer types \['linear_attention'\] are not supported"),
    ("bloom", {}, "bloom: transformers' BloomForCausalLM does not call attention through AttentionInterface"),
])
def test_unsupported_families_are_named_with_the_missing_feature(family, changes, message):
    with pytest.raises(ValueError, match=message):
        inspect_model(hf_config(family, **changes), family, torch.float32)


def test_gemma2_fails_at_load(tmp_path):
    path = tmp_path / "gemma2"
    AutoModelForCausalLM.from_config(hf_config("gemma2", sliding_window=8)).save_pretrained(path)
    with pytest.raises(ValueError, match="gemma2: .*soft-capping .*run this model with transformers itself"):
        make_llm(path)


class Layer(torch.nn.Module):
    layer_idx, is_causal = 0, True


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_mask=torch.zeros(1, 1, 4, 4)), "a dense attention mask"),
    (dict(softcap=30.0), r"soft-capping \(softcap=30.0\)"),
    (dict(s_aux=torch.zeros(4)), "attention sinks"),
    (dict(dropout=0.1), "attention dropout 0.1"),
    (dict(is_causal=False), "bidirectional attention"),
    (dict(batch=2), "a batch of 2 sequences"),
])
def test_attention_function_refuses_what_the_kernels_lack(kwargs, message):
    batch = kwargs.pop("batch", 1)
    q = torch.randn(batch, 4, 4, 16)
    kv = torch.randn(batch, 2, 4, 16)
    with pytest.raises(ValueError, match=f"Layer asks for .*{message}.*run this model with transformers itself"):
        paged_attention_forward(Layer(), q, kv, kv, kwargs.pop("attention_mask", None), **kwargs)


def test_the_wrapper_refuses_a_model_without_fullgraph_attention():
    config = hf_config("mistral")
    shape = inspect_model(config, "mistral", torch.float32)
    with pytest.raises(ValueError, match="attn_implementation='sdpa', which would attend across the packed requests"):
        TransformersDecoder(AutoModelForCausalLM.from_config(config), shape)


def test_weights_are_safetensors_only_and_must_match(mistral, tmp_path):
    from safetensors.torch import load_file, save_file

    pickled = Path(shutil.copytree(mistral.path, tmp_path / "pickled"))
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors weights; pickle checkpoints are not loaded"):
        make_llm(pickled, model_impl="transformers")
    broken = Path(shutil.copytree(mistral.path, tmp_path / "broken"))
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.extra.weight"] = weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys.*layers.1.mlp.up_proj.weight.*unexpected_keys.*extra"):
        make_llm(broken, model_impl="transformers")


# ---- model_impl ---------------------------------------------------------------------------------
def test_model_impl_is_validated_and_fullgraph_says_what_it_cannot_run(mistral):
    with pytest.raises(ValueError, match=r"model_impl must be one of \['auto', 'fullgraph', 'transformers'\]"):
        make_llm(mistral.path, model_impl="hf")
    with pytest.raises(ValueError, match="model_impl='fullgraph' cannot run .*got 'mistral'; use "
                                         "model_impl='transformers'"):
        make_llm(mistral.path, model_impl="fullgraph")
    with pytest.raises(ValueError, match="model_impl='fullgraph' cannot run mistral-7b: fullgraph has no config"):
        make_llm("mistral-7b", model_impl="fullgraph")
    with pytest.raises(ValueError, match="no transformers config named 'tiny'; known: .*'mistral-7b'"):
        make_llm("tiny", model_impl="transformers")
    with pytest.raises(ValueError, match="model_impl='fullgraph' cannot run"):  # the bench CLI passes it on
        main(["bench", "latency", "--model", str(mistral.path), "--model-impl", "fullgraph"])


@pytest.mark.parametrize("name, params, layout", [
    # (layers, KV heads, head dim, vocab, sliding windows)
    ("llama-3.2-1b", 1_235_814_400, (16, 8, 64, 128256, (None,) * 16)),
    ("qwen2.5-1.5b", 1_543_714_304, (28, 2, 128, 151936, (None,) * 28)),
    ("mistral-7b", 7_241_732_096, (32, 8, 128, 32000, (4096,) * 32)),
    ("gemma3-1b", 999_885_952, (26, 1, 256, 262144, ((512,) * 5 + (None,)) * 4 + (512, 512))),
])
def test_named_configs_have_the_checkpoints_shapes(name, params, layout):
    """Checked on the meta device (nothing allocated); parameter counts as the public checkpoints'."""
    kwargs = dict(NAMED_CONFIGS[name])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    c = inspect_model(config, name, torch.bfloat16)
    assert (c.num_layers, c.num_kv_heads, c.head_dim, c.vocab_size, c.sliding_windows) == layout
    with torch.device("meta"):
        assert sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) == params
    if name in ("llama-3.2-1b", "qwen2.5-1.5b"):  # the same shapes as our own named configs
        assert DecoderConfig.from_hf_config(NAMED_CONFIGS[name], name=name) == get_config(name)


def test_a_named_config_builds_from_its_seed(monkeypatch):
    """A named transformers config (here a tiny one added for the test): ``auto`` picks transformers'
    code for it, the weights come from ``seed`` and the global RNG is left alone."""
    monkeypatch.setitem(NAMED_CONFIGS, "tiny-mistral", dict(model_type="mistral", **TINY, sliding_window=8))
    rng = torch.get_rng_state()
    a, b = (build_transformers_model("tiny-mistral", dtype=torch.float32, device="cpu", seed=s) for s in (3, 3))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_transformers_model("tiny-mistral", dtype=torch.float32, device="cpu", seed=4)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    llm = make_llm("tiny-mistral")
    assert isinstance(llm.runner.eager_model, TransformersDecoder) and llm.model_config.sliding_windows == (8, 8)
    assert len(llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=3))[0].token_ids) == 3

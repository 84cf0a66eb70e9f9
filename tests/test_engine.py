"""The engine end to end on CPU: greedy tokens at every level equal a reference loop, bad input is
a clear error, a request that must wait corrupts nothing, HF directories load, sampling is seeded."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import (MAX_MODEL_LEN, SHARP, make_llm, mixed_prompts, reference_greedy, sharp_model,
                            write_hf_model)
from fullgraph_backend.engine import LLM, SamplingParams
from fullgraph_backend.engine.levels import OPTIMIZATION_LEVELS, backend_options
from fullgraph_backend.engine.model_runner import attention_calls
from fullgraph_backend.models import Decoder, get_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return write_hf_model(tmp_path_factory.mktemp("sharp"), sharp_model())


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of each prompt run alone through the eager model, cached per prompt."""
    model, cache = sharp_model(), {}

    def tokens(prompt: list[int], max_tokens: int = GREEDY.max_tokens, max_model_len: int = MAX_MODEL_LEN) -> list[int]:
        key = (tuple(prompt), max_tokens, max_model_len)
        if key not in cache:
            cache[key] = reference_greedy(model, prompt, max_tokens, max_model_len)
        return cache[key]

    return tokens


def greedy(llm, prompts, params=GREEDY):
    return [o.token_ids for o in llm.generate(prompts, params)]


# ---- greedy tokens ------------------------------------------------------------------------------
def test_o0_greedy_equals_the_reference_loop(sharp_dir, reference):
    prompts = mixed_prompts(7, seed=1)  # lengths up to 40 > the 32-token budget: chunked prefill
    llm = make_llm(sharp_dir)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [reference(p) for p in prompts]
    assert all(o.finish_reason == "length" and o.prompt_token_ids == p for o, p in zip(outs, prompts))
    assert len({tuple(o.token_ids) for o in outs}) > 1  # the model's tokens depend on the prompt


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_compiled_levels_equal_o0_token_for_token(sharp_dir, reference, level):
    """-O2..-O4 on CPU take the graph runner's emulated path: padding, static buffers, one 'graph' per key."""
    llm = make_llm(sharp_dir, level)
    for batch, seed in ((1, 2), (7, 3), (25, 4)):
        prompts = mixed_prompts(batch, seed=seed)
        params = [SamplingParams(temperature=0.0, max_tokens=2 + i % 6) for i in range(batch)]
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == [reference(p, sp.max_tokens) for p, sp in zip(prompts, params)], f"batch {batch}"
    assert len(llm.runner.graph_runners) == 1  # one compile: one-token steps reuse the unbacked-size graph
    assert llm.block_manager.num_free == llm.block_manager.num_usable


@pytest.mark.parametrize("level", [2, 4])
def test_graphs_compute_logits_only_for_request_lanes(sharp_dir, level):
    """A captured step of N tokens has logits for min(N, lanes) rows, lanes = the context's
    max_num_seqs (the engine's + 1): 9 rows at the 32-token budget, not 32 (docs/perf-notes.md, 22)."""
    llm = make_llm(sharp_dir, level)
    (runner,) = llm.runner.graph_runners
    lanes = llm.runner.ctx.max_num_seqs
    rows = {key.size: rec.call.outputs[0].shape[0] for key, rec in runner.pieces[-1].recordings.items()}
    assert lanes == 9 and rows[32] == lanes
    assert rows == {size: min(size, lanes) for size in rows}
    vocab = llm.runner.eager_model.config.vocab_size
    assert all(rec.call.outputs[0].shape[1] == vocab for rec in runner.pieces[-1].recordings.values())


@pytest.mark.slow
def test_inductor_o4_equals_o0(sharp_dir, reference):
    llm = make_llm(sharp_dir, 4, compile_options={"capture_sizes": (1, 2, 4, 8, 16, 32)})
    prompts = mixed_prompts(7, seed=5)
    assert greedy(llm, prompts) == [reference(p) for p in prompts]
    assert llm.startup.num_graphs == 6 and llm.startup.compile_s > 0


def test_startup_report(sharp_dir):
    eager, full = make_llm(sharp_dir, 0), make_llm(sharp_dir, 4)
    assert (eager.startup.cudagraph_mode, eager.startup.num_graphs) == ("eager", 0)
    report = full.startup
    assert report.cudagraph_mode == "full" and report.num_graphs == 7  # sizes 1, 2, 4, 8, 16, 24, 32
    assert report.capture_s >= 0 and report.load_s > 0 and report.kv_blocks > 2 and "graphs" in str(report)
    assert report.precompiled == "" and "precompiled" not in str(report)  # CPU: no attention kernel to compile


def test_attention_calls_are_each_layers_heads_and_window():
    """What the attention kernels' precompile reads of a model besides its KV cache."""
    config = get_config("tiny")
    assert attention_calls(Decoder(config)) == {(config.num_heads, 0)}
    assert attention_calls(Decoder(config.replace(sliding_window=64))) == {(config.num_heads, 64)}


def test_startup_captures_every_key_when_the_budget_is_beyond_the_capture_sizes(sharp_dir):
    """A token budget (32) beyond the largest capture size (4): the warm-up's first step runs without
    graphs, and its decode step, within the capture sizes, captures every key at startup, not in the
    first request; compile and capture are reported apart."""
    llm = make_llm(sharp_dir, 4, compile_options={"compiler": "eager", "capture_sizes": (1, 2, 4)})
    report = llm.startup
    assert report.num_graphs == 3 and report.capture_s > 0 and report.compile_s > 0, str(report)
    captured = [len(r.capture_table) for r in llm.runner.graph_runners]
    greedy(llm, [[1, 2, 3], [4, 5]])
    assert [len(r.capture_table) for r in llm.runner.graph_runners] == captured


def test_a_one_token_prompt_and_max_model_len(sharp_dir, reference, monkeypatch):
    llm = make_llm(sharp_dir, 4)
    calls = []
    forward = llm.runner._forward
    monkeypatch.setattr(llm.runner, "_forward", lambda q, *rest, **kw: calls.append(list(q)) or forward(q, *rest, **kw))
    out = llm.generate([5], SamplingParams(temperature=0.0, max_tokens=3))[0]  # one prompt, one token
    assert out.token_ids == reference([5], 3)
    assert calls and all(q == [1] for q in calls)  # one request, one token a step: no dummy request beside it
    prompt = [i * 7 % SHARP.vocab_size for i in range(60)]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=50))[0]
    assert len(out.token_ids) == MAX_MODEL_LEN - 60 and out.finish_reason == "length"
    assert out.token_ids == reference(prompt, 50)


def test_a_prompt_of_max_model_len_in_chunks_gets_its_one_token(sharp_dir, reference):
    llm = make_llm(sharp_dir)  # a 32-token budget: two chunks
    prompt = [i * 5 % SHARP.vocab_size for i in range(MAX_MODEL_LEN)]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0]
    # the reference loop stops before sampling at max_model_len tokens; one more lets it sample once
    assert out.token_ids == reference(prompt, 1, MAX_MODEL_LEN + 1) and out.finish_reason == "length"


# ---- waiting, preemption ------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 4])
def test_requests_that_do_not_fit_wait_or_are_preempted_and_corrupt_nothing(sharp_dir, reference, level):
    llm = make_llm(sharp_dir, level, num_kv_blocks=2 + 6)  # 6 blocks: about two requests at a time
    prompts = mixed_prompts(6, seed=7, max_len=30)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    ids = [llm.add_request(p, params) for p in prompts]
    outputs, waited = {}, False
    while llm.has_unfinished():
        waited |= bool(llm.scheduler.waiting) and bool(llm.scheduler.running)
        outputs.update((o.request_id, o) for o in llm.step())
    assert waited and sum(o.num_preemptions for o in outputs.values()) > 0  # recomputed after preemption
    assert [outputs[i].token_ids for i in ids] == [reference(p, 12) for p in prompts]
    assert llm.block_manager.num_free == 6


# ---- asynchronous scheduling --------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 4])
def test_async_scheduling_gives_the_tokens_of_one_step_at_a_time(sharp_dir, reference, level):
    """Stop tokens found a step late, preemption with tokens in flight and max_model_len, async
    against sync: the same tokens as the reference loop, cut at the first stop token."""
    prompts = mixed_prompts(6, seed=11, max_len=30)
    want = [reference(p, 12) for p in prompts]
    stop = max({t for w in want for t in w[1:]}, key=lambda t: sum(w.count(t) for w in want))
    expected = [w[: w.index(stop) + 1] if stop in w else w for w in want]
    assert any(len(e) < 12 for e in expected) and any(len(e) == 12 for e in expected)
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop,))
    for async_scheduling in (True, False):
        llm = make_llm(sharp_dir, level, num_kv_blocks=2 + 6, async_scheduling=async_scheduling)
        ids = [llm.add_request(p, params) for p in prompts]
        outputs, most_in_flight = {}, 0
        while llm.has_unfinished():
            outputs.update((o.request_id, o) for o in llm.step())
            most_in_flight = max(most_in_flight, len(llm._in_flight))
        assert most_in_flight == int(async_scheduling)
        assert sum(o.num_preemptions for o in outputs.values()) > 0
        assert [outputs[i].token_ids for i in ids] == expected, f"async_scheduling={async_scheduling}"
        assert all(len(outputs[i].token_times) == len(e) for i, e in zip(ids, expected))
        assert llm.block_manager.num_free == 6 and not llm.has_unfinished()


# ---- sampling -----------------------------------------------------------------------------------
def test_seeded_sampling_does_not_depend_on_the_batch(sharp_dir):
    llm = make_llm(sharp_dir)
    prompts = mixed_prompts(4, seed=8)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=123)
    alone = llm.generate(prompts[:1], seeded)[0].token_ids
    together = llm.generate(prompts, [seeded] + [SamplingParams(temperature=0.7, max_tokens=8)] * 3)[0].token_ids
    assert alone == together
    other = llm.generate(prompts[:1], SamplingParams(temperature=1.0, max_tokens=8, seed=7))[0].token_ids
    assert other != alone


def test_sampling_filters(sharp_dir, reference):
    llm = make_llm(sharp_dir)
    prompts = mixed_prompts(3, seed=9)
    want = [reference(p) for p in prompts]
    sampled = greedy(llm, prompts, SamplingParams(temperature=2.0, max_tokens=6))
    assert sampled != want and all(0 <= t < SHARP.vocab_size for toks in sampled for t in toks)
    assert greedy(llm, prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=6)) == want
    assert greedy(llm, prompts, SamplingParams(temperature=5.0, top_k=1, max_tokens=6)) == want
    again = make_llm(sharp_dir)  # the same engine seed draws the same unseeded samples
    assert greedy(again, prompts, SamplingParams(temperature=2.0, max_tokens=6)) == sampled


def test_sampler_top_p_and_top_k_keep_the_right_tokens():
    from fullgraph_backend.engine.sampler import Sampler

    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log().expand(4000, 4)
    sampler = Sampler(torch.device("cpu"), seed=0)
    for params in (SamplingParams(top_p=0.6), SamplingParams(top_k=2), SamplingParams(top_k=3, top_p=0.7)):
        counts = torch.bincount(sampler(logits, [params] * 4000, list(range(4000))), minlength=4)
        assert counts[2:].sum() == 0 and abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03, (params, counts)
    counts = torch.bincount(sampler(logits, [SamplingParams(temperature=1.0)] * 4000, list(range(4000))), minlength=4)
    assert abs(counts[2] / 4000 - 0.2) < 0.03 and counts[3] == 0


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_bad_sampling_params(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


@pytest.fixture(scope="module")
def eager_llm(sharp_dir):
    return make_llm(sharp_dir, num_kv_blocks=2 + 3)


@pytest.mark.parametrize("prompt, params, message", [
    ([], GREEDY, "empty prompt"),
    ([1] * (MAX_MODEL_LEN + 1), GREEDY, "longer than max_model_len=64"),
    ([1, 512], GREEDY, r"token id 512 is outside the vocabulary \[0, 512\)"),
    ([-1], GREEDY, "outside the vocabulary"),
    (["a", "b"], GREEDY, "list of int token ids"),
    ("hello", GREEDY, "need a tokenizer"),
    ([1] * 40, SamplingParams(max_tokens=20), "can never fit in the KV cache"),
    ([1], {"max_tokens": 3}, "must be a SamplingParams"),
])
def test_bad_requests_are_clear_errors_and_run_nothing(eager_llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        eager_llm.generate([[1, 2, 3], prompt], params)
    assert not eager_llm.has_unfinished()
    assert eager_llm.generate([[1, 2, 3]], GREEDY)[0].token_ids  # still works


@pytest.mark.parametrize("kw, error, message", [
    ({"optimization_level": 5}, ValueError, "optimization_level"),
    ({"optimization_level": 0, "cudagraph_mode": "full"}, ValueError, "need compilation"),
    ({"cudagraph_mode": "fast"}, ValueError, "cudagraph_mode"),
    ({"max_num_seqs": 0}, ValueError, "max_num_seqs"),
    ({"dtype": "int8"}, ValueError, "dtype"),
    ({"max_num_seq": 4}, ValueError, "did you mean 'max_num_seqs'"),
    ({"max_model_len": 4096}, ValueError, "max_position_embeddings"),
    ({"gpu_memory_utilization": 1.5}, ValueError, "gpu_memory_utilization"),
    ({"async_scheduling": "yes"}, ValueError, "async_scheduling must be True or False"),
    ({"all_reduce": "ring"}, ValueError, "all_reduce must be 'auto' or 'nccl'"),
    ({"attention_impl": "fast"}, ValueError, "attention_impl must be one of"),
    ({"seed": 2**64}, ValueError, "seed"),
])
def test_bad_engine_options(sharp_dir, kw, error, message):
    with pytest.raises(error, match=message):
        LLM(str(sharp_dir), **kw)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a named config"):
        LLM("no-such-model")


def test_levels_table():
    assert OPTIMIZATION_LEVELS[0] is None and OPTIMIZATION_LEVELS[4] == {"cudagraph_mode": "full"}
    assert backend_options(2) == {"cudagraph_mode": "piecewise"}
    assert backend_options(4, "piecewise", {"compiler": "eager"}) == {"cudagraph_mode": "piecewise",
                                                                     "compiler": "eager"}
    assert backend_options(3) == {"cudagraph_mode": "full_and_piecewise"}


# ---- loading ------------------------------------------------------------------------------------
def test_hf_directory_loads_weights_and_eos(tmp_path, reference):
    model = sharp_model()
    prompt = mixed_prompts(1, seed=10)[0]
    first = reference(prompt)[0]
    path = write_hf_model(tmp_path / "m", model, eos_token_id=first)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [first, 3]}))
    llm = make_llm(path)
    assert llm.eos_token_ids == {first, 3} and llm.tokenizer is None
    loaded = llm.runner.eager_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    out = llm.generate([prompt], GREEDY)[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.text is None
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert out.token_ids == reference(prompt) and out.finish_reason == "length"


def test_hf_directory_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path / "empty"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="config.json lacks 'num_attention_heads'"):
        LLM(str(tmp_path))
    write_hf_model(tmp_path / "m", sharp_model()).joinpath("model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(tmp_path / "m"))


class WordTokenizer:
    """Stands in for a transformers tokenizer: "w5 w6" <-> [5, 6]."""

    def encode(self, text: str) -> list[int]:
        return [int(word[1:]) for word in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{i}" for i in ids)


def test_text_prompts_and_outputs_go_through_the_tokenizer(eager_llm, reference):
    eager_llm.tokenizer = WordTokenizer()
    try:
        out = eager_llm.generate("w5 w6 w7", GREEDY)[0]
    finally:
        eager_llm.tokenizer = None
    assert out.prompt_token_ids == [5, 6, 7] and out.token_ids == reference([5, 6, 7])
    assert out.text == " ".join(f"w{i}" for i in out.token_ids)

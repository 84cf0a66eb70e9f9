"""Helpers the tests share: tiny models, contexts and batches, Dynamo graphs, engines on a model
written as a Hugging Face directory, and transformers' own references.

``conftest.py`` holds only pytest's hooks and fixtures; tests import what they use from here.

The engine's named ``tiny`` config ties its embeddings and draws weights of std 0.02, so greedy
decoding mostly repeats the last token whatever attention computes. The model written by
:func:`write_hf_model` unties the head and draws std 0.2 (:data:`SHARP`), so its tokens depend on
the whole context and a token-for-token match between execution modes means something.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn as nn

import fullgraph_backend
from fullgraph_backend.backend import RecordingBackend
from fullgraph_backend.engine import LLM
from fullgraph_backend.forward_context import ForwardContext
from fullgraph_backend.models import Decoder, DecoderConfig, build_model, get_config


# ---- backends, contexts, batches ----------------------------------------------------------------
class RunnerCapture(RecordingBackend):
    """The recording backend with options as keywords, and the last runner at hand."""

    def __init__(self, **options) -> None:
        super().__init__(options)

    @property
    def runner(self):
        assert len(self.runners) >= 1, "nothing was compiled"
        return self.runners[-1]


def make_ctx(num_layers=2, num_kv_heads=2, head_dim=8, *, max_num_seqs=8, max_num_tokens=64, max_model_len=64,
             block_size=16, **kw) -> ForwardContext:
    return ForwardContext(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=torch.float32,
                          max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens, max_model_len=max_model_len,
                          block_size=block_size, **kw)


def own_block_tables(ctx: ForwardContext, num_reqs: int) -> list[list[int]]:
    """Request ``i`` owns its own contiguous run of blocks, enough for max_model_len."""
    w = ctx.max_blocks_per_seq
    assert 1 + num_reqs * w <= ctx.num_blocks
    return [list(range(1 + i * w, 1 + (i + 1) * w)) for i in range(num_reqs)]


def random_batch(rng, num_tokens: int, max_seqs: int, max_len: int, decode: bool = False):
    """``query_lens, seq_lens`` of a batch of ``num_tokens`` new tokens with random cached context."""
    if decode:
        query = [1] * num_tokens
    else:
        reqs = rng.randint(1, min(num_tokens, max_seqs))
        cuts = sorted(rng.sample(range(1, num_tokens), reqs - 1)) if reqs > 1 else []
        query = [b - a for a, b in zip([0, *cuts], [*cuts, num_tokens])]
    seq = [q + rng.randint(0, max_len - q) for q in query]
    return query, seq


def eager_then_compiled(model, compiled, ctx: ForwardContext, ids: torch.Tensor, positions: torch.Tensor):
    """``(expected, got, caches_after_eager)``: the step in eager mode, then compiled from the same KV
    caches (restored in between), so both outputs and both caches can be compared."""
    before = [c.clone() for c in ctx.kv_caches]
    expected = model(ids, positions)
    after_eager = [c.clone() for c in ctx.kv_caches]
    for cache, saved in zip(ctx.kv_caches, before):
        cache.copy_(saved)
    return expected, compiled(ids, positions), after_eager


# ---- tiny models calling fullgraph attention ----------------------------------------------------
class TinyAttention(nn.Module):
    """Embedding -> ``layers`` x (qkv, fullgraph attention, out proj, residual, MLP) -> head, packed tokens."""

    def __init__(self, vocab=64, hidden=32, heads=4, kv_heads=2, head_dim=8, layers=2, sliding_window=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, head_dim, sliding_window
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = nn.ModuleList(nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(heads * head_dim, hidden) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
                                 for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        angle = positions.float()[:, None, None] * 0.01
        n = input_ids.shape[0]
        for i, (qkv, out, mlp) in enumerate(zip(self.qkv, self.out, self.mlp)):
            q, k, v = qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                    self.kv_heads * self.head_dim], dim=-1)
            q = q.view(n, self.heads, self.head_dim) * torch.cos(angle)
            k = k.view(n, self.kv_heads, self.head_dim) + torch.sin(angle)
            v = v.view(n, self.kv_heads, self.head_dim)
            a = fullgraph_backend.attention(q, k, v, i, sliding_window=self.window)
            x = x + out(a.reshape(n, -1))
            x = x + mlp(x)
        return self.head(x)


def tiny_attention_model(seed=0, **kw) -> TinyAttention:
    torch.manual_seed(seed)
    model = TinyAttention(**kw).eval().requires_grad_(False)
    return model


def ctx_for(model: TinyAttention, **kw) -> ForwardContext:
    return make_ctx(num_layers=len(model.qkv), num_kv_heads=model.kv_heads, head_dim=model.head_dim, **kw)


def naive_attention(q, k_cache, v_cache, query_lens, seq_lens, block_tables, block_size, scale, window=0):
    """Per request: gather its keys from its block table, causal (+window) mask, softmax. fp64."""
    outs = []
    start = 0
    q_heads = q.shape[1]
    for ql, sl, blocks in zip(query_lens, seq_lens, block_tables):
        pos = torch.arange(sl)
        slots = torch.tensor(blocks)[pos // block_size] * block_size + pos % block_size
        keys = k_cache.flatten(0, 1)[slots].double()  # [sl, kv_heads, d]
        values = v_cache.flatten(0, 1)[slots].double()
        group = q_heads // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        qr = q[start:start + ql].double()  # [ql, h, d]
        scores = torch.einsum("qhd,khd->hqk", qr, keys) * scale
        qpos = torch.arange(sl - ql, sl)[:, None]
        mask = pos[None, :] <= qpos
        if window:
            mask &= pos[None, :] > qpos - window
        scores = scores.masked_fill(~mask[None], -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
        start += ql
    return torch.cat(outs).float()


# ---- Dynamo graphs for pass and padding tests ----------------------------------------------------
def dynamo_graph(fn, *args, dynamic=((0, 0),), read=lambda gm, example_inputs: (gm, example_inputs)):
    """The one FX graph Dynamo hands a backend for ``fn(*args)``, with its example inputs; or what
    ``read(gm, example_inputs)`` returns, called while Dynamo is calling the backend.

    ``dynamic`` lists ``(arg index, dim)`` pairs marked dynamic before the call.
    """
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(read(gm, example_inputs))
        return gm.forward

    for i, d in dynamic:
        torch._dynamo.mark_dynamic(args[i], d)
    with torch.inference_mode():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]


# ---- engines on a model written as a Hugging Face directory ------------------------------------
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
    with fullgraph_backend.use_forward_context(ctx), torch.inference_mode():
        fed = 0
        while len(tokens) - len(prompt) < max_tokens and len(tokens) < max_model_len:
            positions = ctx.prepare([len(tokens) - fed], [len(tokens)], table)
            logits = model(torch.tensor(tokens[fed:]), positions)
            fed = len(tokens)
            tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt):]


# ---- transformers' own references ----------------------------------------------------------------
@torch.no_grad()
def sharpen(model: torch.nn.Module, std: float, seed: int = 0) -> torch.nn.Module:
    """Weights and biases of std ``std`` (norms as initialised), drawn on the model's device, so
    that greedy tokens depend on the whole context (as :func:`sharp_model`)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one prompt (its attention, its cache)."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_logits(model: torch.nn.Module, prompts: list[list[int]], tokens: list[list[int]]) -> dict[int, list]:
    """transformers' logits at every step that sampled ``tokens``, by request index: one forward
    over the prompt and the tokens fed back (all but the last)."""
    device = next(model.parameters()).device
    out = {}
    for i, (prompt, toks) in enumerate(zip(prompts, tokens)):
        logits = model(input_ids=torch.tensor([prompt + toks[:-1]], device=device)).logits[0]
        out[i] = list(logits[len(prompt) - 1:].float().cpu())
    return out


# ---- Triton's real compiler ------------------------------------------------------------------------
SM90_PDL_PRELUDE = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def pdl_ptx(fn, types, flags, tiles):
    """PTX of ``fn`` compiled for sm_90 with PDL: arguments typed by ``types`` (pointers and ints
    16-divisible, as a launch specialises them), the rest constexpr from ``flags``. Checks that it
    launches with PDL and waits before it triggers; returns the PTX and where the wait is."""
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in types and types[name] != "fp32"}
    consts = {(fn.arg_names.index(n),): v for n, v in flags.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=True))
    ptx = kernel.asm["ptx"]
    wait, trigger = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
    assert kernel.metadata.launch_pdl and wait < trigger, ptx
    return ptx, wait
'''
"""Prepended to a :func:`run_compiler_script` script: Triton's compiler set up for sm_90 and
``pdl_ptx``, which compiles one of our PDL kernels and checks its wait-then-trigger order."""


def run_compiler_script(script: str) -> None:
    """Run ``script`` (which compiles kernels for sm_90 with Triton's own ptxas, no GPU needed, and
    prints "compiled") in a fresh interpreter without ``TRITON_INTERPRET``; skips without ptxas."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                            timeout=300)
    if result.returncode and ("ptxas" in result.stderr and "not found" in result.stderr):
        pytest.skip("no ptxas in this Triton install")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

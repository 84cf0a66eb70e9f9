"""Linears that read one input, merged (``passes/merge_linears.py``) over weights packed at load
(``models/packing.py``): q/k/v and gate/up merge in 16-bit for every family, float32 and weights
that are not one block stay apart, and the engine's bfloat16 logits still match transformers'."""
from __future__ import annotations

import collections
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import hf_logits
from fullgraph_backend import compat, use_forward_context
from fullgraph_backend.engine import LLM
from fullgraph_backend.models.hf import ATTN_IMPLEMENTATION, TransformersDecoder, inspect_model
from fullgraph_backend.models.packing import pack_linears
from passes import merge_linears
from passes.swap_linear import LINEAR_TARGETS
from test_engine_gpu import BF16_LOGIT_TOLERANCE, relative_error, run_forced, workload
from test_hf_models import MAX_MODEL_LEN, TINY, VOCAB, hf_config, write_family

LAYERS = TINY["num_hidden_layers"]
QKV_ROWS = (TINY["num_attention_heads"] + 2 * TINY["num_key_value_heads"]) * TINY["head_dim"]
GATE_UP_ROWS = 2 * TINY["intermediate_size"]


def tiny_model(family: str, dtype: torch.dtype) -> TransformersDecoder:
    """A tiny random model of the family behind the engine's wrapper, which packs its linears."""
    config = hf_config(family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    return TransformersDecoder(model, inspect_model(config, family, dtype))


def merged_graph(model: TransformersDecoder):
    """Dynamo's graph of a 3-token step, merged and run; with its report, its code before the merge,
    its output and eager's."""
    ctx = model.config.forward_context(max_num_seqs=2, max_num_tokens=16, max_model_len=MAX_MODEL_LEN)
    seen = []

    def backend(gm, example_inputs):
        gm = compat.copy_dynamo_graph(gm)  # Dynamo keeps reading its own graph
        seen.append((gm, gm.code))
        seen.append(merge_linears(gm, example_inputs))
        return gm.forward

    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([3], [3], [[1]])
        ids = torch.tensor([5, 6, 7])
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, positions)
        expected = model(ids, positions)
    (gm, before), report = seen
    return gm, report, before, got, expected


def linears(gm) -> int:
    return sum(n.op == "call_function" and n.target in LINEAR_TARGETS for n in gm.graph.nodes)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3_text"])
def test_qkv_and_gate_up_merge_in_bf16(family):
    """Per layer q/k/v -> one linear (Qwen2's biases too) and gate/up -> one; o, down and the head
    stay: 4 linears a layer and the head, and the same logits."""
    gm, report, _, got, expected = merged_graph(tiny_model(family, torch.bfloat16))
    assert [(len(m.nodes), m.shape) for m in report.merged] == [(3, (QKV_ROWS, 64)), (2, (GATE_UP_ROWS, 64))] * LAYERS
    assert not report.left
    assert linears(gm) == 4 * LAYERS + 1
    assert "merged 2 groups of 3 linears -> weight [128, 64]" in report.summary()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_float32_stays_as_traced():
    """Packed, but not merged: float32 greedy tokens keep equal to eager's."""
    gm, report, before, got, expected = merged_graph(tiny_model("qwen2", torch.float32))
    assert not report.merged and gm.code == before
    assert len(report.left) == 2 * LAYERS and all("torch.float32 linears stay as traced" in why
                                                  for _, why in report.left)
    torch.testing.assert_close(got, expected)


def test_only_row_blocks_of_one_tensor_merge():
    """Layer 0: v's weight moved out of the block (q and k still merge, v stays alone); layer 1:
    q's bias moved out of its block (then q/k/v stay apart)."""
    model = tiny_model("qwen2", torch.bfloat16)
    layer0, layer1 = model.model.model.layers
    layer0.self_attn.v_proj.weight = torch.nn.Parameter(layer0.self_attn.v_proj.weight.clone(), requires_grad=False)
    layer1.self_attn.q_proj.bias = torch.nn.Parameter(layer1.self_attn.q_proj.bias.clone(), requires_grad=False)
    gm, report, _, got, expected = merged_graph(model)
    assert [(len(m.nodes), m.shape) for m in report.merged] == [(2, (QKV_ROWS - 32, 64)), (2, (GATE_UP_ROWS, 64)),
                                                                 (2, (GATE_UP_ROWS, 64))]
    assert [(len(nodes), why) for nodes, why in report.left] == [
        (3, "their weights or biases are not row blocks of one tensor")]
    assert linears(gm) == 5 + 6 + 1
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_packing_shares_one_tensor_and_keeps_the_values():
    config = hf_config("llama")
    shape = inspect_model(config, "llama", torch.bfloat16)
    assert shape.sibling_linears[:2] == (tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"),
                                         ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"))
    assert len(shape.sibling_linears) == 2 * LAYERS
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.bfloat16)
    values = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = TransformersDecoder(model, shape)
    attn = model.model.layers[0].self_attn
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1
    assert [w.storage_offset() for w in weights] == [0, 64 * 64, 64 * 64 + 32 * 64]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in values.items())
    assert not any(p.requires_grad for p in wrapped.parameters())


def test_tied_weights_are_not_packed():
    """Packing a shared parameter would untie it from the other module that uses it."""
    model = AutoModelForCausalLM.from_config(hf_config("llama"), attn_implementation=ATTN_IMPLEMENTATION)
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight = attn.q_proj.weight = torch.nn.Parameter(torch.randn(64, 64))
    pack_linears(model, (tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv"),))
    assert attn.k_proj.weight is attn.q_proj.weight and attn.v_proj.weight.storage_offset() == 0


@pytest.mark.slow
def test_engine_bf16_logits_match_transformers_with_one_mm_per_group(tmp_path):
    """Qwen2 (biases on q/k/v) at -O4 in bfloat16 on Inductor, graphs captured (emulated on CPU):
    the compiled code runs 4 matrix products a layer and the head (7 a layer without the merge), and
    teacher-forced logits match transformers' eager forward within the GPU tests' tolerance."""
    family = write_family("qwen2", tmp_path / "qwen2")
    llm = LLM(str(family.path), model_impl="transformers", optimization_level=4, dtype="bfloat16", max_num_seqs=8,
              max_num_batched_tokens=32, max_model_len=MAX_MODEL_LEN, seed=0,
              compile_options={"dump_dir": str(tmp_path / "dump")})
    assert llm.startup.num_graphs > 0  # packed weights share memory, and nothing writes them
    code = [p.read_text() for p in (tmp_path / "dump").rglob("output_code.py")]
    assert len(code) == 1
    products = collections.Counter(re.findall(r"extern_kernels\.(mm|addmm)\(", code[0]))
    assert products == {"addmm": LAYERS, "mm": 3 * LAYERS + 1}
    tokens, got = run_forced(llm, 3, vocab=VOCAB, max_len=30)
    reference = AutoModelForCausalLM.from_pretrained(family.path, dtype=torch.bfloat16).eval()
    want = hf_logits(reference, workload(3, vocab=VOCAB, max_len=30)[0], tokens)
    assert relative_error(got, want) < BF16_LOGIT_TOLERANCE

"""Helpers for the transformers-adapter tests: sharpened random weights and transformers' own
greedy tokens and logits, the references the engine is held to."""
from __future__ import annotations

import torch


@torch.no_grad()
def sharpen(model: torch.nn.Module, std: float, seed: int = 0) -> torch.nn.Module:
    """Weights and biases of std ``std`` (norms as initialised), drawn on the model's device, so
    that greedy tokens depend on the whole context (as engine_helpers.sharp_model)."""
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

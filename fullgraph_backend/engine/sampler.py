"""Next tokens from logits rows: greedy, temperature, top-k and top-p, reproducible by seed.

Sampled rows draw one token by the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``,
equivalent to sampling from ``p``; vLLM does the same), so one batched argmax serves greedy and
sampled rows alike. The noise of a request with ``SamplingParams.seed`` comes from its own
generator, created on first use, so its tokens do not depend on what it is batched with;
the others share the engine's generator.
"""
from __future__ import annotations

import torch

from fullgraph_backend.engine.host import to_device
from fullgraph_backend.engine.params import SamplingParams

FLOAT32_MAX = torch.finfo(torch.float32).max


class Sampler:
    """``sampler(logits [rows, vocab], params per row, request ids) -> token ids [rows]``."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)
        self._request_generators: dict[int, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[int]) -> torch.Tensor:
        if all(p.greedy for p in params):
            return logits.argmax(-1)  # widening to float32 is exact: the same argmax, one kernel less
        logits = logits.float()
        probs = self.probabilities(logits, params)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, (p, rid) in enumerate(zip(params, request_ids)):
            if p.seed is not None and not p.greedy:
                noise[row].exponential_(generator=self._generator_of(rid, p.seed))
        sampled = (probs / noise.clamp_(min=1e-20)).argmax(-1)  # an exact 0 from Exp(1) is (barely) possible
        greedy = to_device([p.greedy for p in params], torch.bool, logits.device)
        return torch.where(greedy, logits.argmax(-1), sampled)

    @classmethod
    def probabilities(cls, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Each row's distribution after temperature, top-k and top-p (greedy rows at temperature 1).

        Finite for finite float32 ``logits`` at every temperature ``SamplingParams`` accepts.
        """
        # a float32 temperature of inf (from a huge float) would turn -inf logits into NaN
        temperature = to_device([1.0 if p.greedy else min(p.temperature, FLOAT32_MAX) for p in params],
                                torch.float32, logits.device)
        # with the largest logit at 0, dividing by a small temperature can only overflow to -inf (probability 0),
        # never to +inf (NaN after softmax)
        shifted = logits - logits.amax(-1, keepdim=True)
        return cls._filter(shifted / temperature.unsqueeze(1), params).softmax(-1)

    def forget(self, request_id: int) -> None:
        """Drop a finished request's generator."""
        self._request_generators.pop(request_id, None)

    def _generator_of(self, request_id: int, seed: int) -> torch.Generator:
        gen = self._request_generators.get(request_id)
        if gen is None:
            gen = self._request_generators[request_id] = torch.Generator(self.device).manual_seed(seed)
        return gen

    @staticmethod
    def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Mask (to -inf) tokens outside each row's top-k and top-p sets."""
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if all(k == -1 for k in top_k) and all(p == 1.0 for p in top_p):
            return logits
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)
        k = to_device([vocab if k == -1 else min(k, vocab) for k in top_k], torch.int64, logits.device)
        drop = ranks.unsqueeze(0) >= k.unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop |= before >= to_device(top_p, torch.float32, logits.device).unsqueeze(1)
        drop[:, 0] = False  # the most likely token always stays
        return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))

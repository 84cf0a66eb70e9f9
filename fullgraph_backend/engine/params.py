"""How to sample one request: ``SamplingParams``, validated on construction (vLLM's names)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# what torch.Generator.manual_seed accepts (a negative seed wraps modulo 2**64)
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1
# below this a temperature is greedy in all but rounding, and dividing logits by it overflows
# float32 (vLLM's _SAMPLING_EPS)
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request.

    - ``temperature``: below ``1e-5`` (0 included) is greedy (argmax); otherwise samples from
      ``softmax(logits / temperature)``.
    - ``top_p``: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = all).
    - ``top_k``: keep the ``top_k`` most likely tokens (-1 = all).
    - ``max_tokens``: stop after this many generated tokens (or at ``max_model_len``, whichever first).
    - ``ignore_eos``: keep generating past the model's EOS token(s) (benchmarks).
    - ``stop_token_ids``: extra token ids that end the request (the token is kept in the output).
    - ``seed``: a per-request generator, so its samples do not depend on what it is batched with;
      None draws from the engine's generator (seeded by ``LLM(seed=...)``). An int in
      ``[-2**63, 2**64 - 1]``, the range ``torch.Generator.manual_seed`` accepts.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_number(t) or not _is_finite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if not _is_number(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (off) or a positive int, got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        stops = tuple(self.stop_token_ids) if isinstance(self.stop_token_ids, Iterable) else None
        if stops is None or not all(_is_int(s) and s >= 0 for s in stops):
            raise ValueError(f"stop_token_ids must be a sequence of non-negative ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        if self.seed is not None and not (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64 - 1] (what torch.Generator.manual_seed "
                             f"accepts), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Whether this request takes the most likely token (temperature below ``1e-5``)."""
        return self.temperature < GREEDY_TEMPERATURE


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False

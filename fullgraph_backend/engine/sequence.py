"""One request's state as it moves through the engine, and what ``generate`` hands back."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fullgraph_backend.engine.params import SamplingParams


PENDING = -1  # placeholder value of a token still being sampled on the device


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV cache was freed)
    RUNNING = "running"  # owns blocks; scheduled every step until it finishes
    FINISHED = "finished"


class Sequence:
    """A request: its tokens, how many of them are in the KV cache, its blocks and its timings.

    ``token_ids`` holds the prompt followed by the generated tokens. ``num_computed`` counts the
    leading tokens whose K/V are in the cache; the scheduler feeds the rest (a prefill chunk, or
    the one new token of a decode) and the model runner samples once all are computed.

    With steps in flight (asynchronous scheduling), a token being sampled on the device is
    already counted: the last ``num_pending`` entries of ``token_ids`` hold :data:`PENDING` until
    their steps' results arrive (:meth:`resolve`, oldest first), and the next step can feed such
    a token from the device.
    """

    def __init__(self, request_id: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float) -> None:
        self.request_id = request_id
        self.prompt_len = len(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0
        self.block_table: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length", or "abort" (never handed back)
        self.arrival_time = arrival_time
        self.token_times: list[float] = []  # when each generated token became known (time.perf_counter)
        self.num_preemptions = 0
        self.num_pending = 0  # trailing tokens still being sampled on the device

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def append_pending(self) -> None:
        """Count the token the step just launched will sample, before its value is known."""
        self.token_ids.append(PENDING)
        self.num_pending += 1

    def resolve(self, token: int, now: float) -> None:
        """The oldest pending token's value arrived at ``now``."""
        if not self.num_pending:
            raise RuntimeError(f"request {self.request_id} has no token in flight")
        self.token_ids[self.num_tokens - self.num_pending] = token
        self.token_times.append(now)
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the request finished before them: their steps were spare)."""
        del self.token_ids[self.num_tokens - self.num_pending:]
        self.num_pending = 0

    def __repr__(self) -> str:
        return (f"Sequence(id={self.request_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")


@dataclass
class RequestOutput:
    """One finished request, as ``LLM.generate`` returns it (in prompt order).

    ``finish_reason`` is ``"stop"`` (EOS or a stop token) or ``"length"`` (``max_tokens`` or
    ``max_model_len``). Times are ``time.perf_counter()`` seconds: ``arrival_time`` when the request
    was added, ``token_times[i]`` when output token ``i`` was sampled.
    """

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    arrival_time: float
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    text: str | None = None  # where the model directory has a tokenizer

    @property
    def ttft(self) -> float:
        """Time to first token, seconds."""
        return self.token_times[0] - self.arrival_time

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies, seconds (one fewer than the output tokens)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, seconds; None for one-token outputs."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @classmethod
    def of(cls, seq: Sequence, text: str | None = None) -> "RequestOutput":
        return cls(seq.request_id, seq.token_ids[: seq.prompt_len], seq.output_token_ids, seq.finish_reason or "",
                   seq.arrival_time, list(seq.token_times), seq.num_preemptions, text)

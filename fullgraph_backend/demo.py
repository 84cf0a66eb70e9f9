"""The demo job: one model decoded greedily in several execution modes, timed side by side.

Each mode starts from the same prompts and an identical KV cache, prefills every request in one
mixed step, then decodes; the greedy tokens of every compiled mode are compared with eager's.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch

from fullgraph_backend.backend import RecordingBackend
from fullgraph_backend.forward_context import ForwardContext, use_forward_context

MODES = ("eager", "none", "piecewise", "full")


@dataclass
class ModeResult:
    """What one mode did: setup (compile + capture) time, step times, graphs, tokens."""

    mode: str
    setup_s: float
    step_ms: list[float]
    graphs: int
    tokens: list[list[int]] = field(default_factory=list)  # [batch][steps], greedy
    logit_error: float | None = None  # max |logits - first mode's| / max |first mode's|, teacher-forced

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)


def block_tables(ctx: ForwardContext, batch: int) -> list[list[int]]:
    """Give request ``i`` its own contiguous run of blocks, enough for max_model_len."""
    per_seq = ctx.max_blocks_per_seq
    if 1 + batch * per_seq > ctx.num_blocks:
        raise ValueError(f"{batch} requests of max_model_len={ctx.max_model_len} need {batch * per_seq} blocks, "
                         f"the cache has {ctx.num_blocks - 1}")
    return [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]


def greedy_decode(model, ctx: ForwardContext, prompts: torch.Tensor, steps: int,
                  forced: list[list[int]] | None = None) -> tuple[list[float], list[list[int]], list[torch.Tensor]]:
    """Prefill ``prompts [batch, len]`` in one step, then decode ``steps`` tokens greedily.

    With ``forced`` (``[batch][steps]`` tokens, e.g. eager's), each step is fed those tokens instead
    of its own choice (teacher forcing), so logits stay comparable after a near-tie flips a token.
    Returns the per-decode-step times (ms, synchronised), the greedy tokens ``[batch][steps]`` and
    the logits of the prefill's last tokens and of every decode step (float32, on the CPU).
    """
    batch, length = prompts.shape
    tables = block_tables(ctx, batch)
    device = ctx.device
    times, tokens, logits_seen = [], [], []
    with use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([length] * batch, [length] * batch, tables)
        ids = prompts.reshape(-1).to(device, copy=True)  # an inference tensor, like the decode ids
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        logits = model(ids, positions).view(batch, length, -1)[:, -1]
        for step in range(steps):
            logits_seen.append(logits.to("cpu", torch.float32, copy=True))  # replays overwrite outputs
            tokens.append(logits.argmax(-1).tolist())
            feed = forced[step] if forced else tokens[-1]
            positions = ctx.prepare([1] * batch, [length + step + 1] * batch, tables)
            ids = torch.tensor(feed, device=device)
            _sync(device)
            start = time.perf_counter()
            logits = model(ids, positions)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        logits_seen.append(logits.to("cpu", torch.float32, copy=True))  # replays overwrite outputs
    return times, tokens, logits_seen


def run_modes(build, ctx: ForwardContext, prompts: torch.Tensor, steps: int, modes: tuple[str, ...],
              options: dict | None = None,
              around_compile: Callable[[str], ContextManager] | None = None) -> list[ModeResult]:
    """Decode the same prompts in every mode; ``build()`` returns a fresh eager model.

    The first mode's tokens (eager's, when listed first) are fed to every later mode, and each
    later mode's logits are compared with the first's. ``around_compile(mode)``, if given, is a
    context entered around each compiled mode's first call, where compilation and capture happen
    (``fullgraph demo --dump-dir`` dumps there).
    """
    results: list[ModeResult] = []
    initial = [c.clone() for c in ctx.kv_caches]
    reference = None
    for mode in modes:
        for cache, saved in zip(ctx.kv_caches, initial):
            cache.copy_(saved)
        torch._dynamo.reset()
        model = build()
        counter = None
        start = time.perf_counter()
        if mode != "eager":
            counter = RecordingBackend({**(options or {}), "cudagraph_mode": mode})
            model = torch.compile(model, backend=counter)
            with around_compile(mode) if around_compile else contextlib.nullcontext():
                greedy_decode(model, ctx, prompts, 1)  # compile and capture happen here
        setup = time.perf_counter() - start
        for cache, saved in zip(ctx.kv_caches, initial):
            cache.copy_(saved)
        forced = [list(t) for t in zip(*reference.tokens)] if reference else None
        times, tokens, logits = greedy_decode(model, ctx, prompts, steps, forced)
        result = ModeResult(mode, setup, times, counter.graphs if counter else 0, [list(t) for t in zip(*tokens)])
        if reference is None:
            reference, ref_logits = result, logits
        else:
            scale = max(float(r.abs().max()) for r in ref_logits)
            result.logit_error = max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits)) / scale
        results.append(result)
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""The demo job: one model decoded greedily in several execution modes, timed side by side.

Each mode starts from the same prompts and an identical KV cache, prefills every request in one
mixed step, then decodes; the greedy tokens of every compiled mode are compared with eager's.
:func:`print_report` shows the table with notes on what each column means, :func:`check` what
failed.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import textwrap
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator

import torch
from rich.console import Console
from rich.table import Table

from fullgraph_backend.backend import RecordingBackend
from fullgraph_backend.forward_context import ForwardContext, use_forward_context

MODES = ("eager", "none", "piecewise", "full")
# relative to the largest |logit|: bf16 rounding of a 28-layer model stays well inside this
BF16_LOGIT_TOLERANCE = 5e-2


@dataclass
class ModeResult:
    """What one mode did: setup (compile + capture) time, step times, graphs, tokens."""

    mode: str
    setup_s: float
    step_ms: list[float]
    graphs: int
    tokens: list[list[int]] = field(default_factory=list)  # [batch][steps], greedy
    logit_error: float | None = None  # max |logits - first mode's| / max |first mode's|, teacher-forced
    agreement: float | None = None  # share of its greedy tokens equal to the first mode's, teacher-forced

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
            result.agreement = token_agreement(result.tokens, reference.tokens)
        results.append(result)
    return results


def token_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the ``[batch][steps]`` tokens equal to ``reference``'s at the same place."""
    pairs = [(a, b) for row, ref in zip(tokens, reference) for a, b in zip(row, ref)]
    return sum(a == b for a, b in pairs) / len(pairs)


def check(results: list[ModeResult], dtype: torch.dtype) -> str | None:
    """What makes the run a failure, or None: in float32 every greedy token must equal the first
    mode's; in bf16 (random weights leave near-ties that rounding flips) the teacher-forced logits
    must stay within :data:`BF16_LOGIT_TOLERANCE`."""
    first = results[0].mode
    if dtype == torch.float32 and any(r.agreement not in (None, 1.0) for r in results):
        return f"greedy tokens differ from {first}'s in float32"
    if any(r.logit_error is not None and r.logit_error > BF16_LOGIT_TOLERANCE for r in results):
        return f"logits differ from {first}'s by more than {BF16_LOGIT_TOLERANCE:.0e} of their range"
    return None


def print_report(console: Console, results: list[ModeResult], heading: str, device: torch.device,
                 dtype: torch.dtype) -> None:
    """The results table under ``heading``, then what each column means (and, on CPU, why its
    timings and graphs are not a GPU's). Short headers keep the table whole at a pipe's 80 columns."""
    first = results[0].mode
    emulated = device.type != "cuda"
    table = Table()
    for column in ("mode", "setup s", "emulated graphs" if emulated else "CUDA graphs", "step ms", "same tokens",
                   "logit err"):
        table.add_column(column, justify="right")
    for r in results:
        compared = r.agreement is not None
        table.add_row(r.mode, f"{r.setup_s:.1f}", str(r.graphs) if r.mode != "eager" else "-", f"{r.median_ms:.2f}",
                      f"{r.agreement:.0%}" if compared else "-", f"{r.logit_error:.1e}" if compared else "-")
    if dtype == torch.float32:
        exact = "float32 must give 100%"
    else:
        exact = (f"in {dtype} random weights leave near-ties that rounding flips, so the check is "
                 f"logit err <= {BF16_LOGIT_TOLERANCE:.0e}")
    notes = {
        "setup s": "first call: compile and capture",
        "graphs": "graphs captured over all sizes and pieces"
                  + ("; on CPU emulated (a replay re-runs the compiled code)" if emulated else ""),
        "step ms": f"median of {len(results[0].step_ms)} decode steps, synchronised",
        "same tokens": f"share of greedy tokens equal to {first}'s, each step fed {first}'s token "
                       f"(teacher-forced); {exact}",
        "logit err": f"max |logits - {first}'s| over all steps / max |{first}'s logits|",
    }
    if emulated:
        notes["CPU"] = "timings vary widely between identical runs and say nothing about GPU speed"
    console.print(heading, highlight=False)
    console.print(table)
    for name, text in notes.items():  # wrapped here: rich would pad or cut a grid at a pipe's 80 columns
        console.print(textwrap.fill(text, console.width, initial_indent=f"{name:<13}", subsequent_indent=" " * 13),
                      highlight=False, soft_wrap=True)


@contextlib.contextmanager
def no_cuda_runtime_notice() -> Iterator[None]:
    """Drop torch's "No CUDA runtime is found" log line while the block runs, and nothing else.

    torch's CUDA build logs it when it finds a CUDA toolkit but no GPU (a CPU-only machine with
    pip's default Linux wheel), once per process, as Inductor first builds C++. The demo runs on
    CPU on purpose there; the README says how to install the CPU build instead.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

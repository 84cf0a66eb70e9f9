"""Host time of one decode step of transformers' static-cache ``generate`` under ``backend="fullgraph"``.

Builds a transformers model with a named config's structure (``--narrow``: same layer count, tied
embeddings and RoPE scaling, tiny widths, so the graph has the same inputs as the full model: 147
weights and 48 cache tensors for Llama-3.2-1B), compiles ``model.forward`` with
``backend="fullgraph"``, and runs ``--generates`` generates, as ``tools/bench_transformers.py`` warms up.
Each makes a new static cache: with fewer than ``STABLE_REPLAYS`` decode steps a generate (``--tokens``,
default 8) the decode graph ends up copying the moved cache in and out at every call
(``RECAPTURES_BEFORE_COPYING``); with more it is captured again per generate and reads the cache in
place. Then it calls the
last decode step's forward again and again, its graph replay replaced by a no-op, and prints
microseconds per call:

  through Dynamo    the compiled forward as generate calls it: Dynamo's guards + the runner
  runner            ``GraphRunner.__call__`` alone, with the arguments Dynamo passes it
  replay alone      the captured call's ``replay()`` alone, not stubbed: the ideal host path
                    (on a GPU: ``cudaGraphLaunch``; on CPU the emulation re-runs the compiled code)

then a cProfile of the runner calls, per function (``--top`` rows). ``--replay real`` keeps the
replay in the first two rows (on a GPU: host time of the whole step, the launch included).

``--generates 1`` (or ``--tokens 32``) times the step while the graph reads the cache where generate keeps it.

Usage (CPU, the graphs emulated; compiler eager keeps startup short, the host path is the same):
  PYTHONPATH=. python tools/profile_runner_host.py --narrow --compiler eager [--batch 1] [--generates 1]
Usage (GPU, where the replay is real):
  python tools/profile_runner_host.py --prompt-len 512 --tokens 32 [--batch 1] [--replay real]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.backend import RecordingBackend  # noqa: E402
from fullgraph_backend.graph_runner import RECAPTURES_BEFORE_COPYING, GraphRunner  # noqa: E402
from fullgraph_backend.models.hf_configs import NAMED_CONFIGS  # noqa: E402
from fullgraph_backend.staging import Role  # noqa: E402

NARROW = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16)


def transformers_model(name: str, narrow: bool, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(NAMED_CONFIGS[name])
    if narrow:
        values.update(NARROW)
    config = AutoConfig.for_model(values.pop("model_type"), **values, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def decode_step(model, ids: torch.Tensor, tokens: int, generates: int):
    """Run ``generates`` generates (bench_transformers warms up with ``RECAPTURES_BEFORE_COPYING + 2``);
    return the last decode step's forward kwargs, its cache's position counters as they were, the
    decode runner and the arguments Dynamo passed it."""
    compiled, seen = model.forward, {}

    def forward(*args, **kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
            seen["kwargs"] = kwargs
            seen["counters"] = [(t, t.clone()) for t in counters(kwargs)]
        return compiled(*args, **kwargs)

    model.forward = forward
    for _ in range(generates):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, cache_implementation="static", disable_compile=True)
    model.forward = compiled
    rewind(seen["counters"])
    calls = []
    original = GraphRunner.__call__

    def recording(self, *args):
        calls.append((self, args))
        return original(self, *args)

    GraphRunner.__call__ = recording
    try:
        with torch.no_grad():
            compiled(**seen["kwargs"])
    finally:
        GraphRunner.__call__ = original
    (runner, args), = calls
    rewind(seen["counters"])
    return seen["kwargs"], seen["counters"], runner, args


def counters(kwargs: dict) -> list[torch.Tensor]:
    """The static cache's per-layer position counters (where the next token is written)."""
    cache = next(v for v in kwargs.values() if hasattr(v, "layers"))
    return [layer.cumulative_length for layer in cache.layers]


def rewind(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Counters back to where they were: a real replay writes the cache at the next position."""
    for t, value in kept:
        t.copy_(value)


@contextlib.contextmanager
def stubbed(runner: GraphRunner, on: bool):
    """Every recording's replay a no-op (``on``): what is left of a call is host work around it."""
    recordings = [rec for piece in runner.pieces for rec in piece.recordings.values()]
    kept = [rec.call.replay for rec in recordings]
    if on:
        for rec in recordings:
            rec.call.replay = lambda: None
    try:
        yield
    finally:
        for rec, replay in zip(recordings, kept):
            rec.call.replay = replay


def us_per_call(fn, calls: int, repeats: int, sync, after=lambda: None) -> tuple[float, float]:
    """Median and minimum over ``repeats`` of the mean host microseconds of ``calls`` calls (on a shared
    machine the minimum is the steadier of the two). Each call is timed alone, then ``after`` runs
    and the device is waited for outside its time, so queued GPU work never blocks a timed launch."""
    for _ in range(min(calls, 20)):
        fn()
        after()
    sync()
    means = []
    for _ in range(repeats):
        total = 0
        for _ in range(calls):
            start = time.perf_counter_ns()
            fn()
            total += time.perf_counter_ns() - start
            after()
            sync()
        means.append(total / calls / 1e3)
    return statistics.median(means), min(means)


def breakdown(fn, calls: int, top: int) -> str:
    """cProfile of ``calls`` calls of ``fn``: per function, own and cumulative microseconds per call."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"{'own us':>8} {'cum us':>8} {'calls':>6}  function (per runner call; cProfile inflates Python rows)"]
    for (file, line, name), (_, ncalls, own, cum, _) in rows:
        where = f"{os.path.basename(file)}:{line}" if line else file
        lines.append(f"{own / calls * 1e6:8.1f} {cum / calls * 1e6:8.1f} {ncalls / calls:6.1f}  {name} ({where})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--narrow", action="store_true", help="same structure and input count, tiny widths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per warm-up generate")
    parser.add_argument("--generates", type=int, default=RECAPTURES_BEFORE_COPYING + 2,
                        help="generates before timing: from 3 on the moved cache is copied in and out "
                             "(when --tokens is below STABLE_REPLAYS); 1 reads it in place")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--replay", default="stub", choices=["stub", "real"])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    import transformers

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = transformers_model(args.model, args.narrow, args.device, dtype)
    # backend="fullgraph" with these options, without the entry point (a venv may not have the package installed)
    model.forward = torch.compile(model.forward, backend=RecordingBackend({"compiler": args.compiler}))
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    kwargs, kept, runner, runner_args = decode_step(model, ids, args.tokens, args.generates)
    compiled = model.forward
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    (piece,) = runner.pieces
    (key, rec), = piece.recordings.items()
    roles = runner.plan.roles
    print(f"{args.device}, torch {torch.__version__}, transformers {transformers.__version__}, {args.model}"
          f"{' (narrow)' if args.narrow else ''}, {dtype}, batch {args.batch}, compiler {args.compiler}, "
          f"replay {args.replay}")
    print(f"decode graph: {len(roles)} inputs ({roles.count(Role.IN_PLACE)} in place, {roles.count(Role.COPY)} copied, "
          f"{len(runner.plan.write_back)} written back), key {tuple(key)}, "
          f"cache {'copied in and out' if key in piece.copy_only else 'read in place'}")

    rewound = kept if args.replay == "real" else []  # a stubbed replay writes nothing

    with torch.no_grad():
        with stubbed(runner, args.replay == "stub"):
            dynamo_us = us_per_call(lambda: compiled(**kwargs), args.calls, args.repeats, sync, lambda: rewind(rewound))
            runner_us = us_per_call(lambda: runner(*runner_args), args.calls, args.repeats, sync,
                                    lambda: rewind(rewound))
            table = breakdown(lambda: (runner(*runner_args), rewind(rewound)), args.calls, args.top)
        # the replay reads the recording's own copies of the counters
        rec.staged.stage(runner_args)
        buffers = [(rec.reads[i], rec.reads[i].clone()) for i in rec.reads if rec.reads[i].dim() == 0]
        # (and, where the graph reads the cache in place, the caller's)
        replay_us = us_per_call(rec.call.replay, args.calls if args.device == "cuda" else 3, args.repeats, sync,
                                lambda: rewind(kept + buffers))
    print(f"\nus per call, median / min of {args.repeats} x {args.calls} calls")
    print(f"  through Dynamo  {dynamo_us[0]:8.1f} / {dynamo_us[1]:6.1f}   "
          f"(Dynamo's part: {dynamo_us[0] - runner_us[0]:.1f} / {dynamo_us[1] - runner_us[1]:.1f})")
    print(f"  runner          {runner_us[0]:8.1f} / {runner_us[1]:6.1f}")
    print(f"  replay alone    {replay_us[0]:8.1f} / {replay_us[1]:6.1f}   "
          f"({'cudaGraphLaunch' if args.device == 'cuda' else 'emulated: the compiled code'})")
    print(f"\ncProfile of {args.calls} runner calls\n{table}")


if __name__ == "__main__":
    main()

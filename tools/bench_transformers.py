"""transformers' own ``generate`` on its static cache, and our engine, side by side in one process.

A transformers model with a named config's shapes (random bf16 weights) decodes greedily from
``--prompt-len`` random tokens. TPOT is the time per token after the first: two ``generate`` calls
of ``--tokens`` and ``2 * --tokens`` new tokens, their difference over ``--tokens`` (prefill and
setup cancel out), median of ``--repeats``. The transformers modes also report ``step_ms``, the
median time between consecutive decode steps of those timed generates (a stopping criterion that
never stops notes each step's time; transformers syncs on every step's tokens on CUDA): one pause
moves a difference of two generates by its whole length over ``--tokens``, but a median of
steps not at all. Modes:
  eager            transformers, no compilation (``disable_compile=True``)
  hf-compiled      transformers' own auto-compiled static-cache decode (its default compile config)
  fullgraph        ``model.forward = torch.compile(model.forward, backend="fullgraph")``; ``fullgraph+FLAG``
                   with one option changed (:data:`FULLGRAPH_FLAGS`), to compare in the same rounds
  reduce-overhead  ``model.forward = torch.compile(model.forward, mode="reduce-overhead")``, a new
                   cudagraph-trees step marked before each call
  engine           fullgraph's engine (``LLM``, -O4) with our own decoder, ``generate`` with token ids
  engine-hf        the engine with ``model_impl="transformers"``: transformers' modeling code, our attention

Each mode runs in a process of its own (``tools/isolate.py``: a mode measured second in a process
has read slower); ``--one-process`` keeps them in one.

Results go to ``OUT_DIR/bench_transformers_<model>.json`` (one file per model, so runs of several
models in one command sit side by side).

Usage (GPU): python tools/bench_transformers.py --out OUT_DIR [--batches 1,8] [--model llama-3.2-1b]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.backend import RecordingBackend  # noqa: E402
from fullgraph_backend import few_rows  # noqa: E402
from fullgraph_backend.graph_runner import RECAPTURES_BEFORE_COPYING  # noqa: E402
from fullgraph_backend.models.hf_configs import NAMED_CONFIGS  # noqa: E402
from isolate import add_arguments, run_modes, runs_apart  # noqa: E402  (tools/ is on the path when run as a script)

MODES = ("eager", "hf-compiled", "fullgraph", "reduce-overhead", "engine", "engine-hf")
# fullgraph+FLAG: the backend's options with these on top of --options
FULLGRAPH_FLAGS = {
    "nogqa": {"group_query_heads": False},
    "nopdl": {"pdl": False},
    # Inductor's PDL and combo kernels asked for, in graphs where the backend leaves them off (no kernel of ours)
    "inductorpdl": {"inductor_config": {"triton.enable_pdl": True, "combo_kernels": True}},
    # linears of 2 to 16 rows on cuBLAS, as before session 19 (few_rows.MAX_ROWS = 1 for the mode: no option)
    "nofewrows": {},
}
ENGINE_IMPLS = {"engine": "fullgraph", "engine-hf": "transformers"}
# the decode keys (batch 1 and 8) and the prefill chunk: enough for TPOT, quick to capture
ENGINE_CAPTURE_SIZES = (1, 2, 4, 8, 16, 512)


def transformers_model(name: str):
    """A random bf16 transformers model on CUDA with the shapes of the named config ``name``, on its
    own SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(NAMED_CONFIGS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    return model


def warm_up(generate, tokens: int) -> None:
    """Compile and capture before anything is timed. transformers makes a new static cache per
    generate: the decode graph is captured again for it at the generate's first decode step (its
    setup, like the prefill, cancels out of TPOT), or, for generates shorter than STABLE_REPLAYS
    steps, copies the cache in and out after RECAPTURES_BEFORE_COPYING of them; the other captures
    stay out of the timed calls (on 2026-11-29 one warm-up generate let them into the fullgraph row)."""
    for _ in range(RECAPTURES_BEFORE_COPYING + 2):
        generate(2 * tokens)


class StepClock:
    """A transformers stopping criterion that never stops and notes the time of each call: once per
    decode step, after the step's token is picked."""

    def __init__(self) -> None:
        self.generates: list[list[float]] = []  # per generate since the last clear, its steps' times
        self._not_done: torch.Tensor | None = None

    def clear(self) -> None:
        """Forget what was noted (the warm-up's generates)."""
        self.generates.clear()

    def new_generate(self) -> None:
        """Start noting a new generate's steps."""
        self.generates.append([])

    def step_ms(self) -> float:
        """Median ms between consecutive steps of one generate, over every noted generate."""
        gaps = [(b - a) * 1e3 for times in self.generates for a, b in zip(times, times[1:])]
        return statistics.median(gaps)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.generates[-1].append(time.perf_counter())
        if self._not_done is None or self._not_done.shape[0] != input_ids.shape[0]:
            self._not_done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self._not_done


def tpot_ms(generate, tokens: int, repeats: int, clock: StepClock | None = None) -> float:
    """Median ms per token after the first, from generates of ``tokens`` and ``2 * tokens`` new tokens;
    ``clock``, if given, keeps the steps of the timed generates only."""
    warm_up(generate, tokens)
    if clock is not None:
        clock.clear()
    per_token = []
    for _ in range(repeats):
        times = []
        for n in (tokens, 2 * tokens):
            torch.cuda.synchronize()
            start = time.perf_counter()
            generate(n)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        per_token.append((times[1] - times[0]) / tokens * 1e3)
    return statistics.median(per_token)


def mode_options(mode: str, options: dict | None) -> tuple[str, dict | None]:
    """``fullgraph+flag+...`` as ``("fullgraph", options with each flag's on top)``; another mode as it is."""
    base, *flags = mode.split("+")
    for flag in flags:
        options = {**(options or {}), **FULLGRAPH_FLAGS[flag]}
    return base, options


@contextlib.contextmanager
def compiled_generate(model, mode: str, ids: torch.Tensor, options: dict | None = None):
    """``(generate(n), backend, clock)`` for one of the transformers modes: ``model.forward`` compiled as
    ``mode`` asks (backend is the fullgraph backend with ``options`` and a ``fullgraph+FLAG`` mode's
    flags, else None), every generate's steps noted by ``clock``; transformers' own forward after."""
    from transformers import StoppingCriteriaList

    max_rows = few_rows.MAX_ROWS
    if "nofewrows" in mode.split("+"):  # read by the linears at warm-up and capture
        few_rows.MAX_ROWS = 1
    mode, options = mode_options(mode, options)
    torch._dynamo.reset()
    backend, clock = None, StepClock()
    if mode == "fullgraph":
        backend = RecordingBackend(options)
        model.forward = torch.compile(model.forward, backend=backend)
    elif mode == "reduce-overhead":
        compiled = torch.compile(model.forward, mode="reduce-overhead")

        def forward(*args, **kwargs):
            # generate keeps the cache's tensors across calls: without a new step, cudagraph trees
            # raise "accessing tensor output of CUDAGraphs that has been overwritten"
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args, **kwargs)

        model.forward = forward

    def generate(n: int):
        clock.new_generate()
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, cache_implementation="static",
                                  stopping_criteria=StoppingCriteriaList([clock]),
                                  disable_compile=mode != "hf-compiled")

    try:
        yield generate, backend, clock
    finally:  # the next mode starts from transformers' own forward
        few_rows.MAX_ROWS = max_rows
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_compiled_call", None)


def unknown_modes(modes: list[str]) -> list[str]:
    """The modes that are neither one of :data:`MODES` nor ``fullgraph`` with known flags."""
    return [m for m in modes if m not in MODES and not (m.startswith("fullgraph+")
                                                        and set(m.split("+")[1:]) <= FULLGRAPH_FLAGS.keys())]


def transformers_row(model, mode: str, ids: torch.Tensor, tokens: int, repeats: int, options: dict | None) -> dict:
    with compiled_generate(model, mode, ids, options) as (generate, backend, clock):
        row = {"mode": mode, "tpot_ms": tpot_ms(generate, tokens, repeats, clock), "step_ms": clock.step_ms()}
    if backend is not None:
        row["graphs"] = backend.graphs
        row["graph_keys"] = [[rec.size, rec.kind] for r in backend.runners for rec in r.capture_table]
    return row


def engine_tpot_rows(batches: list[int], prompt_len: int, tokens: int, repeats: int, **options) -> list[dict]:
    """One engine, ``LLM(**options)`` (built once: its token counts are unbacked, so every batch
    shares its graphs), a row per batch with its TPOT and the engine's startup."""
    from fullgraph_backend.engine import LLM, SamplingParams
    from fullgraph_backend.engine.bench import random_prompts

    torch._dynamo.reset()
    llm = LLM(max_model_len=prompt_len + 2 * tokens + 16, seed=0, **options)
    rows = []
    for batch in batches:
        prompts = random_prompts(batch, prompt_len, llm.model_config.vocab_size)

        def generate(n: int):
            llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))

        rows.append({"batch": batch, "tpot_ms": tpot_ms(generate, tokens, repeats), "graphs": llm.startup.num_graphs,
                     "startup": str(llm.startup)})
    llm = None  # the closures above share this cell: the engine goes with it
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64, help="TPOT from generates of this many and twice as many")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--options", type=json.loads, default=None,
                        help='backend="fullgraph" options for the fullgraph mode, as JSON')
    add_arguments(parser)
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = unknown_modes(modes)
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {list(MODES)}, and fullgraph+FLAG with FLAG one of "
                     f"{list(FULLGRAPH_FLAGS)}")
    os.makedirs(args.out, exist_ok=True)
    result_path = os.path.join(args.out, f"bench_transformers_{args.model}.json")
    result = {"kind": "transformers", "model": args.model, "prompt_len": args.prompt_len, "tokens": args.tokens,
              "date": datetime.date.today().isoformat(),
              "command": "python3 tools/bench_transformers.py " + " ".join(sys.argv[1:]), "rows": []}
    batches = [int(b) for b in args.batches.split(",")]
    if runs_apart(args, modes):
        header, rows = run_modes(__file__, sys.argv[1:], modes, os.path.basename(result_path), batches,
                                 args.rounds, args.mode_timeout)
        result = {**header, **result, "command": result["command"] + "  (one process per mode)", "rows": rows}
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
        _print_summary(result, args.repeats)
        return
    import transformers

    result.update(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__)

    def record(rows: list[dict]) -> None:
        for row in rows:
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        with open(result_path, "w") as f:  # kept if a later row fails
            json.dump(result, f, indent=1)

    for mode in (m for m in modes if m in ENGINE_IMPLS):
        try:
            rows = engine_tpot_rows(batches, args.prompt_len, args.tokens, args.repeats, model=args.model,
                                    model_impl=ENGINE_IMPLS[mode], optimization_level=4,
                                    max_num_seqs=max(*batches, 2),
                                    compile_options={"capture_sizes": ENGINE_CAPTURE_SIZES})
            record([{"mode": mode, **row} for row in rows])
        except Exception as error:  # noqa: BLE001 - as below
            record([{"mode": mode, "batch": b, "error": f"{type(error).__name__}: {error}"[:500]} for b in batches])
    hf_modes = [m for m in modes if m not in ENGINE_IMPLS]
    model = transformers_model(args.model) if hf_modes else None
    for batch in batches:
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), device="cuda") if model else None
        for mode in hf_modes:
            try:
                row = transformers_row(model, mode, ids, args.tokens, args.repeats, args.options)
            except Exception as error:  # noqa: BLE001 - one mode failing must not lose the others' rows
                row = {"mode": mode, "error": f"{type(error).__name__}: {error}"[:500]}
            record([{**row, "batch": batch}])
    _print_summary(result, args.repeats)


def _print_summary(result: dict, repeats: int) -> None:
    """TPOT per mode, a line per batch."""
    print(f"\n{result.get('device', '?')}, torch {result.get('torch', '?')}, transformers "
          f"{result.get('transformers', '?')}, {result['model']} shapes, bf16, prompt {result['prompt_len']}, "
          f"TPOT ms (median of {repeats})")
    for batch in sorted({r["batch"] for r in result["rows"]}):
        cells = [(f"{r['mode']} {r['tpot_ms']:.2f}" + (f" (step {r['step_ms']:.2f})" if "step_ms" in r else ""))
                 if "tpot_ms" in r else f"{r['mode']} failed" for r in result["rows"] if r["batch"] == batch]
        print(f"batch {batch}: " + " | ".join(cells))


if __name__ == "__main__":
    main()

"""Engine startup, each run in a fresh process: cold (empty compile caches), warm (the caches the
cold run left), and warm with other engine options (which of them miss the caches).

Each run is ``python tools/bench_startup.py --child ...`` with its own ``TORCHINDUCTOR_CACHE_DIR``
and ``TRITON_CACHE_DIR`` under ``--cache-root``; the parent times it from spawn to ready and the
child reports its phases: ``import`` (torch and fullgraph), then ``llm.startup``'s load (model,
activation profile, KV cache), compile and capture, the startup report's compile-cache verdict,
Inductor's cache hits and misses, and what the attention kernels' precompile did.
Runs (``--runs``, comma-separated, in order; ``cold`` first empties the caches):
  cold, warm          the options given
  len=N, seqs=N, kv=N the options given with max_model_len / max_num_seqs / num_kv_blocks changed

``--compile-options`` adds backend options to every run (``'{"regional_compile": false}'``);
``--narrow`` keeps the model's layers but shrinks its widths (``tools/profile_engine.py``), for
compile-time studies on a CPU; ``--warm-inductor`` compiles an unrelated function before the
engine, so a CPU run's compile leaves out Inductor's one-time C++ setup in a fresh cache (27 s with
torch 2.13, 61 s with 2.11 on the two-core CPU; nothing like it on the GPU).

Usage (GPU): python tools/bench_startup.py --out OUT_DIR [--model qwen2.5-1.5b] [--level 4]
                 [--max-model-len 2048] [--runs cold,warm,len=640,seqs=64,kv=4000] [--capture-sizes 1,2,...]
                 [--compile-options JSON] [--narrow] [--warm-inductor]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

RUN_OPTIONS = {"len": "max_model_len", "seqs": "max_num_seqs", "kv": "num_kv_blocks"}
# the compile's phases printed per run (Dynamo's compile times; ``fullgraph.*`` are the backend's own)
PHASES = {"dynamo trace": "bytecode_tracing", "guards": "build_guards", "backend": "OutputGraph.call_user_compiler",
          "passes": "fullgraph.passes", "cut": "fullgraph.regions.split", "fake run": "fullgraph.regions.run_on_fakes",
          "keys": "fullgraph.regions.keys", "aot trace": "create_aot_dispatcher_function",
          "cache load": "AOTAutogradCache.inductor_load"}


def phase_seconds(compile_times: str, phases: dict[str, str]) -> dict[str, float]:
    """Seconds per phase (summed over its calls) from ``compile_times(repr="str")``, whose lines are
    ``key, t1, t2, ...`` or, where tabulate is installed, a table row ``key   t1, t2, ...``."""
    totals = {}
    for line in compile_times.splitlines():
        row = re.fullmatch(r"\s*([^\s,]+),?\s+([0-9.]+(?:\s*,\s*[0-9.]+)*)\s*", line)
        if row:  # not a header or a rule
            totals[row[1]] = sum(float(t) for t in row[2].split(","))
    return {name: round(totals.get(key, 0.0), 3) for name, key in phases.items()}


def child(args: argparse.Namespace) -> None:
    """Build one engine and print what it cost as the last line of stdout (JSON)."""
    start = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    from fullgraph_backend.engine import LLM

    import_s = time.perf_counter() - start
    if args.warm_inductor:
        torch.compile(lambda x: (x.sin() * 2).sum(-1))(torch.randn(8, 8))
        torch._dynamo.reset()  # (and Dynamo's compile times)
        counters.clear()
    if args.narrow:
        from profile_engine import narrow  # tools/ is the script's folder, first on sys.path

        narrow(args.model.removesuffix("-narrow"))
    llm = LLM(args.model, **json.loads(args.options))
    ready_at = time.time()
    s = llm.startup
    compile_times = torch._dynamo.utils.compile_times(repr="str")
    print(json.dumps({
        "ready_at": ready_at, "import_s": import_s, "load_s": s.load_s, "compile_s": s.compile_s,
        "capture_s": s.capture_s, "num_graphs": s.num_graphs, "graph_mib": s.graph_mib,
        "kv_blocks": s.kv_blocks, "compile_cache": s.compile_cache, "precompiled": s.precompiled,
        "torch": torch.__version__,
        "inductor_cache": {k: v for k, v in counters["inductor"].items() if "cache" in k},
        "aot_cache": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k},
        "compile_times": compile_times,
        "phases": phase_seconds(compile_times, PHASES),
    }), flush=True)
    os._exit(0)  # ready is what is measured: skip tearing the engine and the compile workers down


def run_once(options: dict, model: str, cache_dir: str, flags: tuple[str, ...] = ()) -> dict:
    """One fresh process building one engine with ``options`` against ``cache_dir``; ``flags`` go to
    the child (``--narrow``, ``--warm-inductor``)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"))
    spawned = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--model", model,
                           "--options", json.dumps(options), *flags],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"startup run failed ({options}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["ready_s"] = result.pop("ready_at") - spawned  # from spawn to ready, the interpreter's start included
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--level", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--runs", default="cold,warm,len=640")
    parser.add_argument("--capture-sizes", help="comma list of padded sizes to capture (default: the backend's)")
    parser.add_argument("--cache-root", help="where the runs' caches live (default: a new temporary folder)")
    parser.add_argument("--compile-options", default="{}", help="backend options for every run, as JSON")
    parser.add_argument("--narrow", action="store_true", help="the model's layers with tiny widths (CPU studies)")
    parser.add_argument("--warm-inductor", action="store_true", help="compile something else first (CPU studies)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    base = dict(optimization_level=args.level, seed=0, max_model_len=args.max_model_len)
    compile_options = json.loads(args.compile_options)
    if args.capture_sizes:
        compile_options["capture_sizes"] = [int(s) for s in args.capture_sizes.split(",")]
    if compile_options:
        base["compile_options"] = compile_options
    model = f"{args.model}-narrow" if args.narrow else args.model
    cache_dir = args.cache_root or tempfile.mkdtemp(prefix="fullgraph-startup-")
    rows = []
    for run in args.runs.split(","):
        options = dict(base)
        if run == "cold":
            shutil.rmtree(cache_dir, ignore_errors=True)
        elif run != "warm":
            key, value = run.split("=")
            options[RUN_OPTIONS[key]] = int(value)
        flags = tuple(f for f, on in (("--narrow", args.narrow), ("--warm-inductor", args.warm_inductor)) if on)
        result = run_once(options, model, cache_dir, flags)
        rows.append({"run": run, "options": options, **result})
        print(f"{run:>10}: ready in {result['ready_s']:.1f} s (import {result['import_s']:.1f}, load "
              f"{result['load_s']:.1f}, compile {result['compile_s']:.1f}, capture {result['capture_s']:.1f} s, "
              f"{result['num_graphs']} graphs, {result['graph_mib']:.0f} MiB) compile cache {result['compile_cache']}, "
              f"inductor {result['inductor_cache']}, aot {result['aot_cache']}, attention kernels precompiled: "
              f"{result['precompiled'] or '-'}\n{'':>12}compile phases, s: "
              f"{', '.join(f'{k} {v:.2f}' for k, v in result['phases'].items())}", flush=True)
    if args.out:
        import torch

        os.makedirs(args.out, exist_ok=True)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        meta = {"device": device, "torch": torch.__version__, "model": model, "date": str(datetime.date.today()),
                "command": "python3 tools/bench_startup.py " + " ".join(sys.argv[1:])}
        with open(os.path.join(args.out, "bench_startup.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""The ``fullgraph`` command line: ``fullgraph demo`` runs the main job; ``fullgraph bench latency|serve``
benchmarks the engine (``fullgraph_backend.engine``)."""
from __future__ import annotations

import argparse
import logging
import sys

import torch
from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fullgraph`` console script."""
    parser = argparse.ArgumentParser(prog="fullgraph", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="decode a reference model in eager, piecewise and full modes, timed")
    demo.add_argument("--model", default=None, help="named config (default: qwen2.5-1.5b on CUDA, tiny on CPU)")
    demo.add_argument("--device", default="auto", help="cuda, cpu or auto")
    demo.add_argument("--batch", type=int, default=4, help="requests decoded together")
    demo.add_argument("--prompt-len", type=int, default=32)
    demo.add_argument("--steps", type=int, default=8, help="decode steps timed")
    demo.add_argument("--modes", default="eager,piecewise,full", help="comma list of eager,none,piecewise,full")
    demo.add_argument("--attention-impl", default="auto")
    demo.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    demo.add_argument("--dump-dir", default=None,
                      help="dump every compilation here (graphs per pass, depyf, Inductor output, capture table); "
                           "read it with `fullgraph dump DIR`")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("-v", "--verbose", action="store_true", help="log what the backend does")
    dump = sub.add_parser("dump", help="overview of a dump folder: graphs, passes, swaps, captures, warnings")
    dump.add_argument("dir", help="a folder written by dump_dir=..., dump_compilation(...) or demo --dump-dir")
    dump.add_argument("--html", metavar="OUT.html", default=None,
                      help="also write one static page with each graph before/after every pass, side by side")
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args)
    if args.command == "dump":
        return _dump(args)
    if args.command == "bench":
        return _bench(args)
    return 2


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark the engine: latency of generate, or serving under load")
    kinds = bench.add_subparsers(dest="bench", required=True)
    latency = kinds.add_parser("latency", help="average and percentile latency of one generate call")
    latency.add_argument("--batch-size", type=POSITIVE, default=8)
    latency.add_argument("--input-len", type=POSITIVE, default=32)
    latency.add_argument("--output-len", type=POSITIVE, default=128)
    latency.add_argument("--num-iters", type=POSITIVE, default=10)
    latency.add_argument("--num-iters-warmup", type=COUNT, default=2)
    serve = kinds.add_parser("serve", help="Poisson arrivals in process; vLLM's Serving Benchmark Result block")
    serve.add_argument("--request-rate", type=RATE, default=float("inf"),
                       help="requests per second (inf: all at once)")
    serve.add_argument("--num-prompts", type=POSITIVE, default=100)
    serve.add_argument("--random-input-len", type=POSITIVE, default=1000)
    serve.add_argument("--random-output-len", type=POSITIVE, default=100)
    serve.add_argument("--ignore-eos", action="store_true", help="generate --random-output-len tokens every time")
    serve.add_argument("--no-progress", action="store_true", help="no progress bar")
    for p in (latency, serve):
        p.add_argument("--model", default=None, help="named config or HF-format directory "
                                                     "(default: qwen2.5-1.5b on CUDA, tiny on CPU)")
        p.add_argument("-O", "--optimization-level", type=int, default=4, choices=range(5), metavar="{0..4}",
                       help="-O0 eager, -O1 Inductor, -O2 piecewise graphs, -O3 full decode + piecewise mixed, "
                            "-O4 one full graph for every batch (write -O4 or --optimization-level 4)")
        p.add_argument("--cudagraph-mode", default=None, choices=["none", "piecewise", "full_and_piecewise", "full"],
                       help="overrides the level's graph mode")
        p.add_argument("--max-num-seqs", type=POSITIVE, default=256)
        p.add_argument("--max-num-batched-tokens", type=POSITIVE, default=512)
        p.add_argument("--max-model-len", type=POSITIVE, default=None, help="default: input + output length")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--device", default="auto")
        p.add_argument("--gpu-memory-utilization", type=FRACTION, default=0.9)
        p.add_argument("--num-kv-blocks", type=POSITIVE, default=None)
        p.add_argument("--compiler", default=None, choices=["inductor", "eager"])
        p.add_argument("--capture-sizes", type=SIZES, default=None, help="comma list of padded sizes to capture")
        p.add_argument("--attention-impl", default="auto")
        p.add_argument("--model-impl", default="auto", choices=["auto", "fullgraph", "transformers"],
                       help="our decoder, transformers' modeling code, or ours where it can (auto)")
        p.add_argument("-tp", "--tensor-parallel-size", type=POSITIVE, default=1,
                       help="processes (GPUs) the model is split over; the engine starts them, or run the command "
                            "under `torchrun --nproc-per-node N` (rank 0 reports)")
        p.add_argument("--seed", type=SEED, default=0)
        p.add_argument("--output-json", default=None, help="also write the results here")
        p.add_argument("-v", "--verbose", action="store_true", help="log what the backend does")


def _checked(convert, test, description: str):
    """An argparse type: ``convert(text)`` passing ``test``; else a usage error naming the flag and ``description``."""
    def parse(text: str):
        try:
            value = convert(text)
            ok = test(value)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value
    return parse


COUNT = _checked(int, lambda v: v >= 0, "an int >= 0")
POSITIVE = _checked(int, lambda v: v >= 1, "an int >= 1")
RATE = _checked(float, lambda v: v > 0, "a number > 0 (inf: all at once)")  # NaN fails every comparison
FRACTION = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
SIZES = _checked(lambda text: tuple(int(s) for s in text.split(",")), lambda v: min(v) >= 1,
                 "a comma list of ints >= 1")
# the engine's seed is >= 0; torch.Generator.manual_seed takes up to 2**64 - 1
SEED = _checked(int, lambda v: 0 <= v < 2**64, "an int in [0, 2**64 - 1]")


def _bench(args: argparse.Namespace) -> int:
    import json

    from fullgraph_backend.engine import LLM
    from fullgraph_backend.engine import bench

    serve = args.bench == "serve"
    input_len, output_len = ((args.random_input_len, args.random_output_len) if serve
                             else (args.input_len, args.output_len))
    compile_options = {}
    if args.compiler:
        compile_options["compiler"] = args.compiler
    if args.capture_sizes:
        compile_options["capture_sizes"] = args.capture_sizes
    cuda = torch.cuda.is_available() and args.device != "cpu"
    llm = LLM(args.model or ("qwen2.5-1.5b" if cuda else "tiny"), optimization_level=args.optimization_level,
              cudagraph_mode=args.cudagraph_mode, compile_options=compile_options or None,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len or input_len + output_len, dtype=args.dtype, device=args.device,
              gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
              attention_impl=args.attention_impl, model_impl=args.model_impl, seed=args.seed,
              tensor_parallel_size=args.tensor_parallel_size)
    device = llm.runner.device
    split = f", tensor parallel {args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    print(f"model {llm.model_config.name}, {llm.runner.dtype}, {_device_name(device)}{split}, "
          f"torch {torch.__version__}")
    print(f"startup: {llm.startup}")
    if serve:
        result = bench.bench_serve(llm, num_prompts=args.num_prompts, request_rate=args.request_rate,
                                   input_len=input_len, output_len=output_len, ignore_eos=args.ignore_eos,
                                   seed=args.seed, progress=not args.no_progress)
        summary = result.metrics()
        bench.print_serve_result(summary)
    else:
        result = bench.bench_latency(llm, batch_size=args.batch_size, input_len=input_len, output_len=output_len,
                                     num_iters=args.num_iters, num_iters_warmup=args.num_iters_warmup, seed=args.seed)
        summary = result.as_dict()
        bench.print_latency(result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"startup": vars(llm.startup), **summary}, f, indent=2)
    return 0


def _dump(args: argparse.Namespace) -> int:
    from fullgraph_backend.dump import DumpError, load_dump, print_overview, write_html
    from fullgraph_backend.dump.overview import plain, printable

    try:
        dump = load_dump(args.dir)
        console = Console()
        print_overview(dump, console)
        if args.html:
            console.print(plain(f"wrote {write_html(dump, args.html)}"))
    except (DumpError, OSError) as e:  # OSError: the --html file cannot be written
        print(f"fullgraph dump: {printable(e)}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fullgraph_backend.demo import MODES, check, no_cuda_runtime_notice, print_report, run_modes
    from fullgraph_backend.models import build_model, get_config

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fullgraph demo: --device cuda but no CUDA device is available; use --device cpu")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"fullgraph demo: unknown mode(s) {unknown}; choose from {list(MODES)}")
    name = args.model or ("qwen2.5-1.5b" if device.type == "cuda" else "tiny")
    config = get_config(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.batch * args.prompt_len
    ctx = config.forward_context(dtype=dtype, device=device, max_num_seqs=args.batch, max_num_tokens=tokens,
                                 max_model_len=args.prompt_len + args.steps + 2, attention_impl=args.attention_impl)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=generator)
    options = {"compiler": args.compiler}
    around_compile = None
    if args.dump_dir:  # every compile goes to the dump; the first call of each mode also gets depyf's files
        from fullgraph_backend.dump import dump_compilation

        options["dump_dir"] = args.dump_dir
        around_compile = lambda mode: dump_compilation(args.dump_dir)  # noqa: E731
    with no_cuda_runtime_notice():
        results = run_modes(lambda: build_model(config, seed=args.seed, dtype=dtype, device=device), ctx, prompts,
                            args.steps, modes, options, around_compile)

    console = Console()
    heading = (f"fullgraph demo: {name}, {args.batch} requests x {args.prompt_len} prompt tokens, {args.steps} decode "
               f"steps\n{_device_name(device)}, {dtype}, torch {torch.__version__}")
    print_report(console, results, heading, device, dtype)
    if args.dump_dir:
        console.print(f"compilation dumped to {args.dump_dir}: see `fullgraph dump {args.dump_dir}`")
    failure = check(results, dtype)
    if failure:
        console.print(f"[red]{failure}[/red]")
        return 1
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


if __name__ == "__main__":
    sys.exit(main())

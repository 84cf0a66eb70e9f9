"""The ``fullgraph`` command line: ``fullgraph demo`` runs the main job."""
from __future__ import annotations

import argparse
import logging
import sys

import torch
from rich.console import Console
from rich.table import Table


# relative to the largest |logit|: bf16 rounding of a 28-layer model stays well inside this
BF16_LOGIT_TOLERANCE = 5e-2


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args)
    if args.command == "dump":
        return _dump(args)
    return 2


def _dump(args: argparse.Namespace) -> int:
    from fullgraph_backend.dump import DumpError, load_dump, print_overview, write_html

    try:
        dump = load_dump(args.dir)
    except DumpError as e:
        print(f"fullgraph dump: {e}", file=sys.stderr)
        return 2
    console = Console()
    print_overview(dump, console)
    if args.html:
        console.print(f"wrote {write_html(dump, args.html)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fullgraph_backend.demo import MODES, run_modes
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
    results = run_modes(lambda: build_model(config, seed=args.seed, dtype=dtype, device=device), ctx, prompts,
                        args.steps, modes, options, around_compile)

    console = Console()
    table = Table(title=f"fullgraph demo: {name}, {args.batch} x {args.prompt_len} prompt tokens, "
                        f"{args.steps} decode steps, {dtype}, {_device_name(device)}, torch {torch.__version__}")
    first = results[0].mode
    for column in ("mode", "setup s (compile+capture)", "graphs", "decode step ms (median)",
                   f"greedy = {first}", f"max logit error vs {first} (teacher-forced)"):
        table.add_column(column, justify="right")
    reference = results[0].tokens
    for r in results:
        later = r is not results[0]
        same = ("yes" if r.tokens == reference else "NO") if later else "-"
        error = f"{r.logit_error:.1e}" if later else "-"
        table.add_row(r.mode, f"{r.setup_s:.1f}", str(r.graphs), f"{r.median_ms:.2f}", same, error)
    console.print(table)
    if args.dump_dir:
        console.print(f"compilation dumped to {args.dump_dir}: see `fullgraph dump {args.dump_dir}`")
    # float32 must reproduce the greedy tokens exactly; bf16 (random weights, near-ties) is judged on
    # its teacher-forced logits instead
    if dtype == torch.float32 and any(r.tokens != reference for r in results):
        console.print(f"[red]greedy tokens differ from {first}'s in float32[/red]")
        return 1
    if any(r.logit_error is not None and r.logit_error > BF16_LOGIT_TOLERANCE for r in results):
        console.print(f"[red]logits differ from {first}'s by more than {BF16_LOGIT_TOLERANCE:.0e} of their range[/red]")
        return 1
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


if __name__ == "__main__":
    sys.exit(main())

"""Where a step of transformers' ``generate`` spends its time, for two modes side by side.

Builds the bench_transformers model (random bf16 weights), warms each ``--modes`` entry up as
bench_transformers does, then profiles one ``generate`` of ``--tokens`` new tokens with
torch.profiler (host and GPU) and writes each mode's op table to ``OUT_DIR/profile_<mode>.txt``
(``+`` in a mode as ``_``).
The fullgraph mode launches with PDL on sm_90+, whose early-launch waits the profiler counts as
kernel time (tools/profile_decode.py says more): compare its kernels with ``--options '{"pdl": false}'``
or the mode ``fullgraph+nopdl`` (modes as bench_transformers takes them).

Usage (GPU): python tools/profile_generate.py --out OUT_DIR [--modes fullgraph,hf-compiled] [--batch 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_transformers import compiled_generate, transformers_model, warm_up  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--modes", default="fullgraph,hf-compiled")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--options", type=json.loads, default=None,
                        help='backend="fullgraph" options for the fullgraph mode, as JSON')
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = transformers_model(args.model)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    for mode in args.modes.split(","):
        with compiled_generate(model, mode, ids, args.options) as (generate, _, _):
            warm_up(generate, args.tokens)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                generate(args.tokens)
                torch.cuda.synchronize()
        averages = prof.key_averages()
        table = (averages.table(sort_by="self_cpu_time_total", row_limit=40) + "\n"
                 + averages.table(sort_by="self_device_time_total", row_limit=25))
        with open(os.path.join(args.out, f"profile_{mode.replace('+', '_')}.txt"), "w") as f:
            f.write(table)
        print(f"== {mode}\n{table}", flush=True)


if __name__ == "__main__":
    main()

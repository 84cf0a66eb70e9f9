"""Kernel launches of one decode step as Inductor schedules them for a GPU, counted on a CPU.

Builds a named checkpoint's layers (its per-layer shapes, ``--layers`` of them, a small vocabulary,
random bfloat16 weights) with our decoder and with transformers' code, compiles a one-token step
(token count unbacked, ``request_ends=True``, as the engine does) through the backend's graph
passes as on CUDA (attention swap, merged linears, the GEMV swap; ``--options`` changes the
backend's options, e.g. ``{"fuse_norm": true}`` folds the RMSNorms into the GEMVs after them), and
has Inductor generate the code with its GPU scheduler (``cpu_backend="triton"``; ``force_pointwise_cat``, since on a CPU
device Inductor copies every cat's inputs in kernels of their own, while on the H200 the RoPE cats
fuse into pointwise kernels, docs/perf-notes.md, section 19). The code is read when Inductor
writes it; compiling its Triton kernels then fails without a GPU driver, and the step runs the
transformed graph eagerly instead. Inductor's graph cache is off (an op's layout tag is not in its
key).

Per model and implementation it prints the Triton launches and extern calls (``fullgraph::linear``,
attention, matmuls) at each of ``--layers``, and their growth a layer from the first count to the
last: the kernels after the last layer (final norm, the rows of ending requests) fuse differently
from one layer count to the next, so compare at equal counts or over several layers.

Usage: PYTHONPATH=. python tools/count_kernels.py [--model qwen2.5-1.5b] [--impl fullgraph,transformers]
       [--layers 2,3,4] [--options '{"fuse_norm": true}'] [--show]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from unittest import mock

import torch
import torch.utils._triton
import transformers
from torch._inductor.graph import GraphLowering
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend import compat, use_forward_context  # noqa: E402
from fullgraph_backend.attention.registry import resolve_impl  # noqa: E402
from fullgraph_backend.backend import graph_passes  # noqa: E402
from fullgraph_backend.config import FullgraphConfig  # noqa: E402
from fullgraph_backend.models import build_model, get_config  # noqa: E402
from fullgraph_backend.models.hf import ATTN_IMPLEMENTATION, TransformersDecoder, inspect_model  # noqa: E402
from fullgraph_backend.models.hf_configs import NAMED_CONFIGS  # noqa: E402
from passes import PassManager  # noqa: E402

VOCAB = 4096
INDUCTOR = {"cpu_backend": "triton", "force_pointwise_cat": True, "fx_graph_cache": False}


def build(name: str, impl: str, layers: int) -> torch.nn.Module:
    """``name``'s shapes with ``layers`` layers and a vocabulary of :data:`VOCAB`, bfloat16, random."""
    if impl == "fullgraph":
        return build_model(get_config(name).replace(num_layers=layers, vocab_size=VOCAB), dtype=torch.bfloat16)
    kwargs = {**NAMED_CONFIGS[name], "num_hidden_layers": layers, "vocab_size": VOCAB}
    hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config = inspect_model(hf_config, name, torch.bfloat16)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.bfloat16)
    return TransformersDecoder(model, config)


def step_code(model: torch.nn.Module, config: FullgraphConfig | None = None) -> str:
    """Inductor's wrapper code for a one-token step of ``model``, as it would run on CUDA with the
    backend's ``config`` (its defaults if None)."""
    ctx = model.config.forward_context(dtype=torch.bfloat16, max_num_seqs=4, max_num_tokens=16, max_model_len=256)
    codes: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list):
        gm = compat.copy_dynamo_graph(gm)
        impl = resolve_impl("reference", torch.device("cpu"))
        passes = graph_passes(config or FullgraphConfig(), torch.device("cuda"), ctx, impl, example_inputs)
        swap = {r.name: r for r in PassManager(passes, None).run(gm)}["swap_attention"].report
        extra = tuple(swap.inputs.values())
        try:
            compat.compile_fx(compat.copy_dynamo_graph(gm), [*example_inputs, *extra], INDUCTOR)
        except Exception:  # Triton finds no backend for the CPU once the code is written
            if not codes:
                raise
        return lambda *args: gm(*args, *extra)

    # Inductor hashes its Triton kernels with the driver's backend, which a CPU does not have
    with mock.patch.object(GraphLowering, "save_output_code", codes.append), \
            mock.patch.object(torch.utils._triton, "triton_hash_with_backend", lambda: "cpu"), \
            use_forward_context(ctx), torch.inference_mode():
        positions = ctx.prepare([1], [5], [[1]])
        ids = torch.tensor([3])
        compat.mark_unbacked(ids, 0)
        compat.mark_unbacked(positions, 0)
        torch.compile(lambda i, p: model(i, p, request_ends=True), backend=backend, fullgraph=True)(ids, positions)
    torch._dynamo.reset()
    return codes[-1]


def launches(code: str) -> tuple[list[str], list[str]]:
    """Triton kernels launched and extern calls made, in order, by the code's ``call``."""
    call = code[code.index("def call("):]
    triton = re.findall(r"(\w+)\.run\(", call)
    extern = re.findall(r"(torch\.ops\.\w+\.\w+\.\w+|extern_kernels\.\w+)\(", call)
    return triton, extern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", help="a name with our config and a transformers one")
    parser.add_argument("--impl", default="fullgraph,transformers")
    parser.add_argument("--layers", default="2,3,4", help="layer counts, comma-separated")
    parser.add_argument("--options", default="{}", help="backend options as JSON, e.g. '{\"fuse_norm\": true}'")
    parser.add_argument("--show", action="store_true", help="list the kernels at the first layer count")
    args = parser.parse_args()
    layers = [int(n) for n in args.layers.split(",")]
    config = FullgraphConfig.from_options(json.loads(args.options))
    print(f"device: cpu (Inductor's GPU scheduler, codegen only); torch {torch.__version__}; transformers "
          f"{transformers.__version__}; model {args.model} shapes, vocab {VOCAB}, bfloat16, one decode token; options {args.options}")
    print(f"| impl | Triton launches at {layers} layers | extern calls | Triton a layer | extern a layer |")
    print("|---|---|---|---|---|")
    shown = {}
    for impl in args.impl.split(","):
        counts = [launches(step_code(build(args.model, impl, n), config)) for n in layers]
        shown[impl] = counts[0]
        triton, extern = ([len(c[i]) for c in counts] for i in (0, 1))
        span = max(layers[-1] - layers[0], 1)
        print(f"| {impl} | {triton} | {extern} | {(triton[-1] - triton[0]) / span:g} | "
              f"{(extern[-1] - extern[0]) / span:g} |")
    for impl, (triton, extern) in shown.items() if args.show else ():
        print(f"\n{impl}, {layers[0]} layers:", *triton, "extern:", *sorted(set(extern)), sep="\n  ")


if __name__ == "__main__":
    main()

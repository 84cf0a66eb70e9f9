"""``backend="fullgraph"``: graph in -> passes -> Inductor -> graph runner.

Registered through the ``torch_dynamo_backends`` entry point only (registering again on import
would make Dynamo's lookup fail with a duplicate name).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from fullgraph_backend import compat
from fullgraph_backend.attention.registry import AttentionImpl, resolve_impl
from fullgraph_backend.config import FullgraphConfig
from fullgraph_backend.cuda_graph import CudaGraphs, EmulatedGraphs, graphs_for
from fullgraph_backend.dump.writer import GraphDump
from fullgraph_backend.forward_context import BatchKind, ForwardContext, current_forward_context
from fullgraph_backend.gemv import may_launch_linear_kernel
from fullgraph_backend.graph_runner import CapturedPiece, GraphRunner, Path
from fullgraph_backend.padding import BatchSignature, InputRole, input_role
from fullgraph_backend.pdl import supported as pdl_supported, unwaited as pdl_unwaited, with_launches
from fullgraph_backend.regions import RegionalCompiler, install, run_on_fakes
from fullgraph_backend.staging import aliased_writes
from passes import (HostInputReport, PassManager, find_batch_mixing, fuse_norm_linear, fuse_silu_epilogue,
                    fuse_silu_linear, group_query_heads, merge_linears, move_host_inputs, split_at_attention,
                    swap_attention, swap_linear)

log = logging.getLogger("fullgraph")


def fullgraph(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None,
              mode: str | None = None) -> GraphRunner:
    """The Dynamo backend: swap attention, compile once with Inductor, return a graph runner."""
    if mode not in (None, "default"):
        raise ValueError(f"backend='fullgraph' takes no mode={mode!r}; choose graphs with "
                         f"options={{'cudagraph_mode': 'full' | 'piecewise' | 'none'}}")
    config = FullgraphConfig.from_options(options)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        raise RuntimeError("backend='fullgraph' compiles inference: call the model under torch.inference_mode() "
                           "or torch.no_grad(), or freeze it with model.requires_grad_(False)")
    ctx = current_forward_context()
    device = ctx.device if ctx else _device_of(example_inputs)
    impl = resolve_impl(ctx.attention_impl if ctx and config.attention_impl == "auto" else config.attention_impl,
                        device)
    max_num_seqs = _max_num_seqs(config, ctx)
    dump = GraphDump.open(config, gm)  # writes nothing unless dumping (dump_dir / dump_compilation)
    sources = [n.meta["grapharg"].source if n.meta.get("grapharg") else None
               for n in gm.graph.nodes if n.op == "placeholder"]
    # what stays fixed between calls (weights, buffers), kept for DirectCall; not the call's own inputs
    dynamo_inputs = [None if src is not None and compat.local_input(src) else x for src, x in zip(sources, example_inputs)]
    with compat.timed("passes"):
        gm = compat.copy_dynamo_graph(gm)
        passes = graph_passes(config, device, ctx, impl, example_inputs)
        results = {r.name: r for r in PassManager(passes, dump.folder).run(gm)}
    swap = results["swap_attention"].report
    host = results["move_host_inputs"].report if "move_host_inputs" in results else HostInputReport()
    has_attention = bool(swap.swapped)
    for result in results.values():
        log.info("fullgraph: %s", result.summary.replace("\n", "; "))
    extra_args = tuple(swap.inputs.values())
    example_inputs = [*_moved_to(device, example_inputs, gm, host.moved), *extra_args]
    signature = BatchSignature.of(gm)

    mixing = find_batch_mixing(gm, signature.symbol) if signature.symbol is not None else []
    pad = signature.paddable and not mixing
    if signature.symbol is not None and not pad:
        why = "; ".join(mixing) or signature.why_not_paddable
        log.warning("fullgraph: not padding this graph (%s): one CUDA graph per exact batch size", why)
    unsafe = host.blockers + _unsafe_to_capture(gm, signature, example_inputs)
    use_graphs = config.cudagraph_mode != "none" and not unsafe
    if config.cudagraph_mode != "none" and unsafe:
        log.warning("fullgraph: no CUDA graphs for this graph: %s", "; ".join(unsafe))

    sizes = _capture_sizes(config, ctx if has_attention else None)
    graphs = graphs_for(device)
    compile_fn = _compiler(config, _takes_pdl(config, device, use_graphs, gm, has_attention), dump)
    paths: dict[BatchKind, Path] = {}
    if config.cudagraph_mode in ("piecewise", "full_and_piecewise") and has_attention:
        # split before compiling the whole graph: compile_fx may change the module it is given
        split, attention_parts = split_at_attention(gm, lambda n: n.op == "call_function" and n.target is impl.op)
        paths[BatchKind.MIXED] = Path(split, _compile_pieces(split, attention_parts, gm, example_inputs, compile_fn,
                                                             graphs))
    if BatchKind.MIXED not in paths or config.cudagraph_mode == "full_and_piecewise":
        piece = CapturedPiece(compile_fn(gm, example_inputs), signature, graphs, adopt_inputs=True)
        paths[BatchKind.DECODE if BatchKind.MIXED in paths else BatchKind.MIXED] = Path(piece, [piece])
    return GraphRunner(paths, signature, extra_args, graphs=graphs, capture_sizes=sizes, pad=pad, use_graphs=use_graphs,
                       ctx=ctx if has_attention else None, decode_variant=impl.decode_variant and has_attention,
                       max_num_seqs=max_num_seqs, on_capture=dump.write_capture_table,
                       static_tokens=ctx.num_tokens if has_attention and signature.is_static else None,
                       input_sources=sources, example_inputs=dynamo_inputs)


def graph_passes(config: FullgraphConfig, device: torch.device, ctx: ForwardContext | None, impl: AttentionImpl,
                 example_inputs: list) -> list[tuple[str, Callable[[torch.fx.GraphModule], object]]]:
    """The passes for one graph, in order: the attention swap; with ``group_query_heads``, decode SDPA
    over per-head copies of keys and values reading the shared heads (at batches where that pays);
    the merge of linears over one packed weight always; on CUDA, CPU inputs the graph copies to the
    device moved out of it; the linear swap where the graph will be captured on CUDA (there the
    GEMV's choice is made once per captured size), then SiLU-muls after the gate_up linears and the
    RMSNorms and SiLU-muls before linears folded into them."""
    passes = [("swap_attention", lambda g: swap_attention(g, ctx, impl))]
    if config.group_query_heads:
        passes.append(("group_query_heads", group_query_heads))
    passes.append(("merge_linears", lambda g: merge_linears(g, example_inputs)))
    if device.type == "cuda":
        passes.append(("move_host_inputs", lambda g: move_host_inputs(g, device)))
    if config.gemv and device.type == "cuda" and config.cudagraph_mode != "none":
        passes.append(("swap_linear", swap_linear))
        if config.fuse_silu_epilogue:
            passes.append(("fuse_silu_epilogue", fuse_silu_epilogue))
        if config.fuse_norm:
            passes.append(("fuse_norm_linear", fuse_norm_linear))
        if config.fuse_silu:
            passes.append(("fuse_silu_linear", fuse_silu_linear))
    return passes


class RecordingBackend:
    """A ``backend=`` callable: ``fullgraph`` with fixed options, keeping every runner it returns.

    For tools that report what was captured::

        backend = RecordingBackend({"cudagraph_mode": "full"})
        compiled = torch.compile(model, backend=backend)
        ...
        backend.graphs, backend.runners[-1].capture_table
    """

    def __init__(self, options: dict | None = None) -> None:
        self.options, self.runners = dict(options or {}), []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> GraphRunner:
        runner = fullgraph(gm, example_inputs, options=self.options)
        self.runners.append(runner)
        return runner

    @property
    def graphs(self) -> int:
        """Captured calls over every runner and piece."""
        return sum(len(p.recordings) for r in self.runners for p in r.pieces)


def _device_of(example_inputs: list) -> torch.device:
    """The device the graph computes on: CUDA if any input is there (a CPU input may feed it)."""
    devices = [x.device for x in example_inputs if isinstance(x, torch.Tensor)]
    return next((d for d in devices if d.type == "cuda"), devices[0] if devices else torch.device("cpu"))


def _moved_to(device: torch.device, example_inputs: list, gm: torch.fx.GraphModule, moved: list[str]) -> list:
    """The example inputs, those of the placeholders ``moved`` on ``device`` (as the runner will pass them)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return [x.to(device) if name in moved else x for name, x in zip(names, example_inputs)]


def _unsafe_to_capture(gm: torch.fx.GraphModule, signature: BatchSignature, example_inputs: list) -> list[str]:
    """Reasons a captured graph would be wrong for this graph; the runner then runs the compiled
    code without graphs."""
    if not signature.is_static and signature.symbol is None:
        return [signature.why_not_paddable]
    reasons = []
    if signature.symbol is not None and not signature.size_readable:
        reasons.append(f"no input holds the batch size {signature.symbol} itself, so a call's size is unknown")
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return reasons + aliased_writes(signature, example_inputs, names)


def _takes_pdl(config: FullgraphConfig, device: torch.device, use_graphs: bool, gm: torch.fx.GraphModule,
               has_attention: bool) -> bool:
    """Whether this graph's kernels launch with PDL: asked for, captured, on a device that has it, and
    some kernel of ours may run in it (swapped attention, or a GEMV or few-row linear: up to
    ``few_rows.MAX_ROWS`` 16-bit rows). Inductor's PDL pays
    beside ours, whose programs load weights before their wait; in a graph of Inductor's kernels,
    cuBLAS and cuDNN alone it cost 7% a step (perf-notes 39), so such a graph goes without (logged)."""
    if not (config.pdl and use_graphs and pdl_supported(device)):
        return False
    if has_attention or may_launch_linear_kernel(gm.graph):
        return True
    log.info("fullgraph: PDL off for this graph: none of our kernels runs in it (no swapped attention, no "
             "16-bit linear of few rows), and Inductor's kernels alone run slower with it")
    return False


def _max_num_seqs(config: FullgraphConfig, ctx: ForwardContext | None) -> int | None:
    if ctx is None:
        return config.max_num_seqs
    if config.max_num_seqs is not None and config.max_num_seqs > ctx.max_num_seqs:
        raise ValueError(f"max_num_seqs={config.max_num_seqs} exceeds the forward context's "
                         f"max_num_seqs={ctx.max_num_seqs}; build the ForwardContext with the larger value")
    return config.max_num_seqs or ctx.max_num_seqs


def _capture_sizes(config: FullgraphConfig, ctx: ForwardContext | None) -> tuple[int, ...]:
    """Capture sizes, cut to what the context's token buffers hold."""
    sizes = config.capture_sizes
    if ctx is not None and sizes and sizes[-1] > ctx.max_num_tokens:
        kept = tuple(s for s in sizes if s <= ctx.max_num_tokens)
        log.info("fullgraph: capturing sizes up to max_num_tokens=%d of the forward context (%d of %d sizes)",
                 ctx.max_num_tokens, len(kept), len(sizes))
        sizes = kept
    return sizes


# Inductor's settings where our kernels launch with PDL: its kernels take PDL too (1.57 -> 1.39 ms a
# decode step at batch 1 on the H200), and its combo kernels launch independent small kernels as one
# (-2.4 to -2.8% at batch 1, -0.7 to -1.3% at 16 and 64, two runs; perf-notes section 36). A user's
# inductor_config wins.
PDL_PATCHES = {"triton.enable_pdl": True, "combo_kernels": True}


def _compiler(config: FullgraphConfig, pdl: bool, dump: GraphDump) -> Callable[[torch.fx.GraphModule, list], Callable]:
    """Compiles one graph (or piece); ``dump`` sees every Inductor compile. With ``pdl`` its calls
    launch our kernels with PDL, and Inductor compiles with :data:`PDL_PATCHES` (its kernels take PDL
    too, and combo kernels), unless ``inductor_config`` says otherwise. With
    ``regional_compile``, each distinct repeated region (a decoder layer) is compiled once
    (:mod:`fullgraph_backend.regions`)."""
    if config.compiler == "eager":
        return dump.compiler(lambda gm, example_inputs: with_launches(gm, pdl))
    patches = {**PDL_PATCHES, **config.inductor_config} if pdl else config.inductor_config
    compile_once = dump.compiler(lambda gm, example_inputs: _inductor(gm, example_inputs, patches))
    if config.regional_compile and _autotunes_matmuls(patches):
        log.info("fullgraph: regional compile: off, every graph compiled whole: max_autotune fuses pointwise ops "
                 "into Triton matmul templates, and regions are cut right after matmuls")
    elif config.regional_compile:
        compile_once = RegionalCompiler(compile_once, patches, on_report=dump.write_regions)
    return lambda gm, example_inputs: with_launches(compile_once(gm, example_inputs), pdl)


def _inductor(gm: torch.fx.GraphModule, example_inputs: list, patches: dict) -> Callable:
    """Inductor's compile of ``gm``. With Inductor's PDL on, a kernel of it that never waits
    (:func:`fullgraph_backend.pdl.unwaited`) makes the graph compile again without it, logged."""
    if not patches.get("triton.enable_pdl"):
        return compat.compile_fx(gm, example_inputs, patches)
    spare = compat.copy_dynamo_graph(gm)  # compile_fx may change the graph it is given
    with compat.inductor_triton_sources() as sources:
        compiled = compat.compile_fx(gm, example_inputs, patches)
    unsafe = pdl_unwaited(sources)
    if not unsafe:
        return compiled
    log.warning("fullgraph: Inductor's PDL off for this graph: kernel(s) %s launch with PDL but never wait (no "
                "load to wait before), so the kernel after one could read its predecessor's output unfinished",
                ", ".join(unsafe[:3]))
    return compat.compile_fx(spare, example_inputs, {**patches, "triton.enable_pdl": False})


def _autotunes_matmuls(patches: dict) -> bool:
    """Whether Inductor, with ``patches``, may run matmuls as Triton templates that take the ops
    after them (epilogue fusion): then a cut after a matmul would lose a fusion."""
    import torch._inductor.config as inductor_config

    return any(patches.get(name, getattr(inductor_config, name)) for name in ("max_autotune", "max_autotune_gemm"))


def _compile_pieces(split: torch.fx.GraphModule, attention_parts: list[str], gm: torch.fx.GraphModule,
                    example_inputs: list, compile_fn: Callable,
                    graphs: CudaGraphs | EmulatedGraphs) -> list[CapturedPiece]:
    """Compile every non-attention submodule of ``split`` and wrap it in a :class:`CapturedPiece`.

    Each piece is compiled with the fakes it gets when ``split`` runs on fakes of the inputs
    (:func:`~fullgraph_backend.regions.run_on_fakes`), symbolic in the batch dim as the whole graph
    was. A piece writes the inputs whose fake version counters its fake run moved.
    """
    roles = {n.name: input_role(n) for n in gm.graph.nodes if n.op == "placeholder"}
    pieces: list[CapturedPiece] = []
    for call in run_on_fakes(split, example_inputs):
        if call.node.target in attention_parts:
            continue
        role = [dataclasses.replace(roles.get(a.name, InputRole()) if isinstance(a, torch.fx.Node) else InputRole(),
                                    mutated=written) for a, written in zip(call.node.args, call.written)]
        signature = BatchSignature(call.args, list(compat.outputs_as_tuple(call.out)), role)
        piece = CapturedPiece(compile_fn(call.module, call.args), signature, graphs,
                              single_output=not isinstance(call.out, (tuple, list)))
        install(split, call.node.target, piece)
        pieces.append(piece)
    return pieces

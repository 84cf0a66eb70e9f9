"""Every torch- and Triton-version difference the package handles, in one place (torch >= 2.11)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from contextvars import ContextVar
from typing import Iterator

import torch

from fullgraph_backend.library import op_schemas_tag


def weak_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor aliasing ``t``'s memory without keeping it alive.

    Captured graphs hand out outputs that live in the shared pool; holding them strongly would
    stop smaller captures from reusing that memory (cudagraph trees do the same). The private
    constructor exists unchanged in 2.11 through 2.14.
    """
    storage = t.untyped_storage()
    weak = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(weak, t.storage_offset(), t.size(), t.stride())


def data_ptrs_equal(tensors: tuple, ptrs: list, positions: list[int]) -> bool:
    """Whether ``tensors[i].data_ptr() == ptrs[i]`` at every ``i`` in ``positions`` (``ptrs`` is indexed
    like ``tensors``): one C++ call where the build has cudagraph trees' check (CUDA builds, 2.11
    through 2.14), a Python loop elsewhere."""
    if hasattr(torch._C, "_tensors_data_ptrs_at_indices_equal"):
        return torch._C._tensors_data_ptrs_at_indices_equal(list(tensors), ptrs, positions)
    return all(tensors[i].data_ptr() == ptrs[i] for i in positions)


def can_forbid_access() -> bool:
    """Whether :func:`forbid_access` works in this build: the hook is compiled into CUDA builds of
    torch only (2.11 through 2.14)."""
    return hasattr(torch._C, "_set_storage_access_error_msg")


def forbid_access(t: torch.Tensor, message: str) -> None:
    """Make any later use of ``t``'s storage raise ``message`` (cudagraph trees mark outputs a later
    replay overwrote the same way)."""
    torch._C._set_storage_access_error_msg(t, message)


def source_name(source) -> str:
    """A Dynamo source as the expression it reads (``L['x']``): a method in 2.11, a property later."""
    name = source.name
    return name() if callable(name) else name


def local_input(source) -> tuple[str, int | None] | None:
    """``(name, None)`` for a Dynamo source reading the frame's local ``name``, ``(name, dim)`` for
    one reading that local's ``size()[dim]``; None otherwise. ``LocalSource`` and
    ``TensorPropertySource`` are the same from 2.11 through 2.14."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource

    if isinstance(source, LocalSource):
        return source.local_name, None
    if (isinstance(source, TensorPropertySource) and source.prop is TensorProperty.SIZE
            and isinstance(source.base, LocalSource)):
        return source.base.local_name, source.idx
    return None


def root_local(source) -> str | None:
    """The frame local a Dynamo source reads from (``model`` for ``L['model']._modules[...]``), or
    None for a global. Chained sources keep their parent in ``base`` (2.11 through 2.14)."""
    from torch._dynamo.source import LocalSource

    while source is not None and not isinstance(source, LocalSource):
        source = getattr(source, "base", None)
    return source.local_name if source is not None else None


def compile_fx(gm: torch.fx.GraphModule, example_inputs: list, patches: dict | None = None) -> object:
    """Inductor once, symbolic in the batch dim, with Inductor's own CUDA graphs off, its compile
    caches keyed by the schemas of the custom ops ``gm`` calls too
    (:func:`fullgraph_backend.library.op_schemas_tag`, added to ``torch.compiler.config.cache_key_tag``,
    which 2.11 and 2.13 put in the FX graph and AOTAutograd caches' keys).

    ``compile_fx`` may mutate ``gm`` (pytorch#138980): callers pass a graph they own.
    2.13+ adds ``compile_region_name``; the positional form works in 2.11 too.
    """
    from torch._inductor.compile_fx import compile_fx as inductor_compile

    tag = op_schemas_tag(gm)
    keyed = (torch.compiler.config.patch(cache_key_tag=f"{torch.compiler.config.cache_key_tag}|{tag}") if tag
             else contextlib.nullcontext())
    with keyed:
        return inductor_compile(gm, example_inputs, config_patches={**(patches or {}), "triton.cudagraphs": False})


def realize_thresholds(device: torch.device, patches: dict) -> tuple[int, int]:
    """Inductor's thresholds for realizing a pointwise result rather than recomputing it in each
    consumer, as they apply on ``device`` with ``patches``: ``(reads when shared, reads)``, see
    ``passes.split_regions.InlineLimits``.

    2.11: ``realize_reads_threshold`` (read by several ops) and ``realize_acc_reads_threshold``
    (any), one value for every device. 2.13 leaves the second None by default and takes
    ``realize_cpu_acc_reads_threshold`` on CPU, ``_realize_acc_reads_threshold_default`` elsewhere.
    """
    import torch._inductor.config as inductor_config

    with inductor_config.patch(patches):
        reads = inductor_config.realize_acc_reads_threshold
        if reads is None:
            reads = (inductor_config.realize_cpu_acc_reads_threshold if device.type == "cpu"
                     else inductor_config._realize_acc_reads_threshold_default)
        return inductor_config.realize_reads_threshold, reads


def mark_unbacked(tensor: torch.Tensor, dim: int) -> None:
    """Mark ``tensor``'s ``dim`` as an unbacked size: no 0/1 specialisation, so size 1 reuses the graph.

    In ``torch._dynamo.decorators`` in 2.11 and 2.13 (not re-exported as ``torch._dynamo.mark_unbacked``).
    """
    torch._dynamo.decorators.mark_unbacked(tensor, dim)


def fake_with_unbacked_dims(fake_mode, tensor: torch.Tensor, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    """A fake of ``tensor`` for a graph input the backend adds, with ``dims`` as unbacked sizes.

    Unbacked: compiled code reads them off the tensor at each call and no guard can pin them, so
    the graph, and Inductor's cache key, does not hold their values. The fake is memoised for
    ``tensor``, so AOTAutograd, handed the real tensor, traces with this fake. The symbols are not
    left pending (no traced node binds them: they are inputs). ``StatelessSymbolicContext``,
    ``DimDynamic.UNBACKED``, ``ConstantSource`` and ``ignore_fresh_unbacked_symbols`` are the same
    from 2.11 through 2.13.
    """
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    sizes = [DimDynamic.UNBACKED if d in dims else DimDynamic.STATIC for d in range(tensor.dim())]
    context = StatelessSymbolicContext(dynamic_sizes=sizes, dynamic_strides=[DimDynamic.INFER_STRIDE] * tensor.dim())
    with fake_mode.shape_env.ignore_fresh_unbacked_symbols():
        return fake_mode.from_tensor(tensor, symbolic_context=context, source=ConstantSource(name))


def outputs_as_tuple(out: object) -> tuple:
    """Dynamo graphs return a tuple; compiled Inductor code may return a list."""
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def guard_source(source) -> object:
    """A Dynamo source's GuardSource: a method in 2.11, a property in later versions."""
    value = source.guard_source
    return value() if callable(value) else value


def copy_dynamo_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a Dynamo graph module that passes can change freely.

    Dynamo keeps reading its own graph after the backend returns (its placeholders must keep
    their ``grapharg``), so passes must not edit it in place. AOTAutograd recognises a Dynamo
    graph by ``meta["dynamo_compile_id"]``, ``_param_name_to_source`` and each placeholder's
    ``_dynamo_source`` attribute, which ``Graph.graph_copy`` does not carry over.
    """
    graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    for old, new in mapping.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = torch.fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy


def timed(phase: str):
    """A context manager adding its time to Dynamo's compile times as ``fullgraph.<phase>``
    (``torch._dynamo.utils.compile_times()``, which ``tools/bench_startup.py`` reports), so the
    backend's share of ``OutputGraph.call_user_compiler`` shows beside AOTAutograd's and Inductor's.
    ``dynamo_timed`` takes the same leading arguments in 2.11 through 2.14."""
    from torch._dynamo.utils import dynamo_timed

    return dynamo_timed(f"fullgraph.{phase}")


# ---- dump support (fullgraph_backend/dump) -------------------------------------------------
def compile_id(gm: torch.fx.GraphModule) -> str | None:
    """The Dynamo compile id (``"frame/recompile"``, e.g. ``"0/1"``) of the graph being compiled.

    ``CompileContext.current_compile_id()`` exists from 2.11 through 2.14; Dynamo also stamps
    its graphs with ``meta["dynamo_compile_id"]``. None outside Dynamo (a backend called by hand).
    """
    current = torch._guards.CompileContext.current_compile_id()
    if current is None:
        current = gm.meta.get("dynamo_compile_id")
    return str(current) if current is not None else None


def graph_break_reason(gm: torch.fx.GraphModule) -> str | None:
    """Why Dynamo ended this graph early, or None when it ran to the frame's return.

    Dynamo sets ``gm.compile_subgraph_reason`` (a ``GraphCompileReason``) in 2.11 through 2.14.
    """
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not reason.graph_break:
        return None
    where = reason.user_stack[-1] if getattr(reason, "user_stack", None) else None
    return f"{where.filename}:{where.lineno}: {reason.reason}" if where else str(reason.reason)


def compilation_records() -> list:
    """Dynamo's per-frame compilation records (``CompilationMetrics``), oldest first.

    ``torch._dynamo.utils.get_compilation_metrics`` keeps the last 64 frames in 2.11 through 2.14;
    the fields read here (compile_id, co_name, co_filename, co_firstlineno, fail_type,
    fail_reason, recompile_reason) are in all of them.
    """
    return list(torch._dynamo.utils.get_compilation_metrics())


def inductor_trace_patches(debug_dir: str) -> dict:
    """``torch._inductor.config`` patches that make Inductor write its trace under ``debug_dir``.

    Inductor then writes ``debug_dir/torchinductor/<graph>.<n>/`` with ``fx_graph_readable.py``,
    ``fx_graph_transformed.py`` (post-grad graph), ``ir_pre_fusion.txt``, ``ir_post_fusion.txt``
    and ``output_code.py``: what ``TORCH_COMPILE_DEBUG=1`` gives, for one compile only. Caches
    are off too, since a cache hit skips Inductor's passes and its trace. Same keys in 2.11-2.14.
    """
    return {"trace.enabled": True, "trace.debug_dir": debug_dir, "force_disable_caches": True}


def abort_process_groups() -> None:
    """Tear down every process group without waiting for collectives in flight. After a peer died
    NCCL's never finish (one inside a CUDA graph spins on the device), and ``destroy_process_group``
    may wait for them; ``_abort_process_group`` aborts the communicators. It is private and NCCL
    only (2.11 through 2.13): gloo's groups, whose collectives fail on a closed connection, are
    destroyed."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


# ---- programmatic dependent launch (fullgraph_backend/pdl.py) ------------------------------------
def triton_has_pdl() -> bool:
    """Whether the installed Triton compiles grid-dependency control and launches with PDL: the
    ``launch_pdl`` launch option and ``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents`` came with
    triton-lang/triton#6394 (merged 2025-04); 3.6.0 has both (inline PTX), 3.9 too (builder ops).
    False under ``TRITON_INTERPRET=1``: the interpreter (3.9) cannot run the gdc ops."""
    try:
        import triton
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents") and not _interpreting(triton)


def _interpreting(triton) -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton's own reading of TRITON_INTERPRET (3.6, 3.9)
    if knobs is None:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


_TRITON_SOURCES: ContextVar[list | None] = ContextVar("fullgraph_triton_sources", default=None)


@contextlib.contextmanager
def inductor_triton_sources() -> Iterator[list[tuple[str, str]]]:
    """``(kernel name, source)`` of every Triton kernel Inductor compiles, or loads from its caches,
    in this block on this thread. In 2.11 and 2.13 each passes through
    ``AsyncCompile.triton(kernel_name, source_code, ...)`` when the graph's Python wrapper module
    loads (Inductor's default; ``cpp_wrapper`` code loads its kernels otherwise and records none); a
    wrapper around it, installed once, records them while a block is open."""
    from torch._inductor.async_compile import AsyncCompile

    if not getattr(AsyncCompile.triton, "_fullgraph_records", False):
        original = AsyncCompile.triton

        @functools.wraps(original)
        def triton(self, kernel_name, source_code, *args, **kwargs):
            sources = _TRITON_SOURCES.get()
            if sources is not None:
                sources.append((kernel_name, source_code))
            return original(self, kernel_name, source_code, *args, **kwargs)

        triton._fullgraph_records = True
        AsyncCompile.triton = triton
    sources: list[tuple[str, str]] = []
    token = _TRITON_SOURCES.set(sources)
    try:
        yield sources
    finally:
        _TRITON_SOURCES.reset(token)


# ---- attention kernels compiled before capture (fullgraph_backend/attention/precompile.py) ------------
def share_inductor_triton_settings(device: torch.device) -> None:
    """Give this process's Triton, before it compiles anything, the settings Inductor gives it when
    Inductor first compiles a kernel in this process (torch 2.11 through 2.13), where they are unset:
    ``TRITON_CACHE_DIR``, the folder under Inductor's cache (``CachingAutotuner``), and
    ``TRITON_PTXAS_PATH``, the ptxas the torch wheel ships, if it ships one (CUDA 13 in 2.11+cu130),
    which Inductor's compile workers use (``_set_triton_ptxas_path``).

    Inductor used to set both before our graphs were captured, since its first kernels compiled in
    this process while its workers started. Once the workers are up early (for our kernels), all of
    its kernels may compile there, and the JIT of the capture would read another cache with another
    ptxas than the workers wrote with. Triton reads the ptxas version once per process, at its first
    compile, and puts it in every cache key: so this must come before that compile.
    """
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir
    from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path

    index = device.index if device.index is not None else torch.cuda.current_device()
    os.environ.setdefault("TRITON_CACHE_DIR", triton_cache_dir(index))
    _set_triton_ptxas_path()


def triton_launch_kwargs(fn, kwargs: dict) -> dict:
    """A launch's keyword arguments as ``JITFunction.run`` completes them before binding, which makes
    them part of the compile's options and cache key: ``debug`` and ``instrumentation_mode`` in 3.6,
    and ``fpsan_homomorphic_casts`` too in 3.9."""
    from triton import knobs

    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kwargs


def triton_target(device: torch.device):
    """The ``GPUTarget`` Triton's JIT compiles for on ``device`` (its driver's answer for the current
    device, which is what a launch uses; 3.6 and 3.9)."""
    from triton.runtime.driver import driver

    with torch.cuda.device(device):
        return driver.active.get_current_target()


def triton_cache_hash(src, target, options: dict) -> str:
    """The hash ``triton.compile(src, target=target, options=options)`` files its kernel under in this
    process, computed as ``compile`` computes it in 3.6 and 3.9: a key of Triton's version, the
    source, the backend with its ptxas version, the parsed options and the cache-invalidating
    environment (3.9 adds a stage-inspection hook's key where that hook is set; it is off by default)."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    backend = make_backend(target)
    options = backend.parse_options(dict(options, **src.parse_options()))
    key = get_cache_key(src, backend, options, get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def triton_cached(hash: str, name: str) -> bool:
    """Whether the cache the JIT reads now (``triton.knobs.cache.dir``) holds kernel ``name`` under
    ``hash``: ``compile``'s lookup before it compiles (3.6, 3.9)."""
    from triton.runtime.cache import get_cache_manager

    filename = f"{name[:150]}.json"
    return (get_cache_manager(hash).get_group(filename) or {}).get(filename) is not None


def inductor_compile_pool():
    """Inductor's pool of compile worker processes, started as Inductor's own compile would start it
    (a sidecar process that imported torch but never touched CUDA, and forks the workers).
    ``submit(fn, *args)`` pickles a module-level ``fn`` by reference and returns a future.
    ``AsyncCompile.process_pool`` and ``get_compile_threads`` are the same in 2.11 and 2.13."""
    from torch._inductor.async_compile import AsyncCompile, get_compile_threads

    if get_compile_threads() <= 1:
        raise RuntimeError("Inductor compiles in this process (compile_threads 1): no workers to compile in")
    return AsyncCompile.process_pool()

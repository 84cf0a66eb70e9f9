"""How many Triton compiles the capture loop costs, and compiling them before it
(:mod:`fullgraph_backend.attention.precompile`; docs/perf-notes.md, sections 23 and 28).

Triton compiles a kernel once per specialization key: its constexprs and launch options, and, for
each int argument not listed in ``do_not_specialize``, whether it equals 1 or is divisible by 16
(for each pointer, whether it is 16-byte aligned). A token count passed as a specialized int would
cost one compile per size class, each JIT-compiled during the warm-up of a capture size on a cold
start. The keys are computed as Triton's launcher computes them (its binder, no device, no launch)
for the launches :func:`paged_attention` makes at each graph key, on meta tensors shaped as the
engine's qwen2.5-1.5b graphs on an H200 (132 SMs, TMA, sm_90).
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.weak import WeakIdKeyDictionary

from fullgraph_backend.attention import triton_paged
from fullgraph_backend.config import default_capture_sizes
from fullgraph_backend.forward_context import AttentionMetadata

precompile = pytest.importorskip("fullgraph_backend.attention.precompile")
from triton import knobs  # noqa: E402  (after the skip: Triton is optional)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

QWEN = dict(q_heads=12, kv_heads=2, head_dim=128)  # qwen2.5-1.5b
LLAMA = dict(q_heads=32, kv_heads=8, head_dim=64)  # llama-3.2-1b
MAX_NUM_SEQS = 256  # the engine's default; its context holds one more request
WIDTH = 2048 // 16  # block-table width: max_model_len 2048, block_size 16
SM_90 = GPUTarget("cuda", 90, 32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_h200(monkeypatch) -> None:
    """An H200's device constants for launch plans on meta tensors, and scratch and descriptor tables
    of the test's own (the meta tensors must not reach the process-wide ones)."""
    monkeypatch.setattr(triton_paged, "sm_count", lambda device: 132)
    monkeypatch.setattr(triton_paged, "_has_tma", lambda device: True)
    monkeypatch.setattr(triton_paged, "_SCRATCH", {})
    monkeypatch.setattr(triton_paged, "_DESCRIPTORS", WeakIdKeyDictionary())


def h200_launches(sizes, q_heads, kv_heads, head_dim, dtype=torch.bfloat16) -> list[triton_paged.Launch]:
    """What the capture loop of an engine with these capture sizes launches (``max_num_seqs`` 256,
    ``max_model_len`` 2048), on meta tensors."""
    meta = dict(device="meta")
    seqs = MAX_NUM_SEQS + 1
    cache = torch.empty(2, 64, 16, kv_heads, head_dim, dtype=dtype, **meta)
    metadata = AttentionMetadata(query_start_loc=torch.empty(seqs + 1, dtype=torch.int32, **meta),
                                 seq_lens=torch.empty(seqs, dtype=torch.int32, **meta),
                                 block_table=torch.empty(seqs, WIDTH, dtype=torch.int32, **meta),
                                 slot_mapping=torch.empty(max(sizes), dtype=torch.int64, **meta))
    keys = precompile.graph_keys(sizes, max(sizes), MAX_NUM_SEQS)
    return precompile.graph_launches(keys, {(q_heads, 0)}, cache, metadata, pdl=False)


@pytest.fixture()
def h200(monkeypatch):
    on_h200(monkeypatch)


def test_token_counts_add_no_specialization(h200):
    """Every specialization key of a kernel is a launch plan of its own: the token and request
    counts (``num_reqs``, ``num_tokens``) are not specialized, so their values (1, multiples of 16)
    cost no extra compile."""
    found = precompile.variants(h200_launches(default_capture_sizes(), **QWEN), SM_90)
    plans = {(v.kernel, repr(v.constexprs), repr(sorted(v.options.items()))) for v in found}
    assert len(found) == len(plans)


@pytest.mark.parametrize("shape", [QWEN, LLAMA], ids=["qwen2.5-1.5b", "llama-3.2-1b"])
def test_variants_do_not_grow_with_capture_sizes(monkeypatch, shape):
    """A capture size of every token count from 1 to 512 compiles no more variants than the default
    ladder: the cold capture's JIT cost is per launch plan, not per size."""
    counts = []
    for sizes in (default_capture_sizes(), tuple(range(1, 513))):
        with monkeypatch.context() as patch:
            on_h200(patch)
            counts.append(collections.Counter(v.kernel for v in precompile.variants(h200_launches(sizes, **shape), SM_90)))
    assert counts[0] == counts[1]


def test_qwen_variants_on_h200(h200):
    """The count docs/perf-notes.md (sections 23 and 28) times: 6 split-KV decode plans (segments 16,
    8, 4, 2, 1; 4-warp and 2-warp TMA programs), 2 unified (16- and 64-row query tiles), 1 store. A new
    plan is one more compile for the engine's precompile (about 1 s for sm_90): update the sections."""
    found = precompile.variants(h200_launches(default_capture_sizes(), **QWEN), SM_90)
    assert collections.Counter(v.kernel for v in found) == {"_split_kv_kernel": 6, "_unified_kernel": 2, "_store_kv_kernel": 1}


class StubDriver:
    """Triton's driver where there is no GPU: device 0 on the default stream, compiling for sm_90;
    enough for ``JITFunction.run`` up to its compile (a warm-up launches nothing)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return SM_90


def test_variants_are_what_the_jit_compiles(h200, monkeypatch):
    """Each variant is the compile Triton's own launch path (``JITFunction.run``, through its public
    ``warmup``) asks for at the same launch: signature, constexprs, attributes and options, hence
    the same cache key. The JIT's request is caught by its ``jit_cache_hook``, which skips the compile."""
    requests = []

    def hook(*, compile, **_):
        requests.append(compile)
        return True  # skip the compile: the request is all this test needs

    monkeypatch.setattr(driver, "_active", StubDriver())
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", hook)
    first = {}  # one launch per variant
    for launch in h200_launches(default_capture_sizes(), **QWEN):
        [variant] = precompile.variants([launch], SM_90)
        first.setdefault(repr(variant), (variant, launch))
    assert len(first) == 9
    for variant, launch in first.values():
        fn = precompile.jit_function(launch.kernel)
        # JIT caches of their own: a kernel compiled earlier in this process would skip the compile request
        monkeypatch.setattr(fn, "device_caches", collections.defaultdict(fn.create_binder))
        requests.clear()
        fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
        [request] = requests
        options = json.loads(request["specialization_data"])["options"]
        assert (request["signature"], request["constants"], request["configs"][0], options) == (
            variant.signature, variant.constexprs, variant.attrs, json.loads(json.dumps(variant.options))), variant.kernel


def test_graph_keys_follow_the_runner():
    """Decode keys up to the first capture size holding ``max_num_seqs`` requests; sizes beyond the
    token buffers are not captured."""
    keys = precompile.graph_keys((1, 2, 4, 8, 16), max_num_tokens=8, max_num_seqs=3)
    assert [(size, kind.value) for size, kind in keys] == [
        (1, "decode"), (1, "mixed"), (2, "decode"), (2, "mixed"), (4, "decode"), (4, "mixed"), (8, "mixed")]
    assert precompile.graph_keys((16,), max_num_tokens=8, max_num_seqs=3) == []


# In a fresh interpreter without TRITON_INTERPRET (the kernels must be Triton's JIT functions, whose
# compile for sm_90 needs no GPU, only the ptxas Triton's wheel ships): precompile the store kernel's
# variant in Inductor's compile workers, then let the JIT's own launch path compile the same launch.
COMPILE_THEN_LAUNCH = """
import json, os, sys
sys.path.insert(0, {tests!r})
import pytest
import torch
from triton import knobs
from triton.runtime.driver import driver
from fullgraph_backend import compat
from fullgraph_backend.attention import precompile
from fullgraph_backend.config import default_capture_sizes
import test_kernel_variants as t

compat.share_inductor_triton_settings(torch.device("cuda", 0))  # as the engine does first: ptxas of the workers
with pytest.MonkeyPatch.context() as patch:
    t.on_h200(patch)
    launch = next(l for l in t.h200_launches(default_capture_sizes(), **t.QWEN) if l.kernel.__name__ == "_store_kv_kernel")
    [variant] = precompile.variants([launch], t.SM_90)
    cache_dir = os.environ["TRITON_CACHE_DIR"]
    summary = precompile.start([variant], compat.inductor_compile_pool).wait(300)
    written = sorted(os.listdir(cache_dir))
    hits = []
    knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(cache_hit)
    patch.setattr(driver, "_active", t.StubDriver())
    launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    after = sorted(os.listdir(cache_dir))
    # a warm start asks for no pool; a worker's error and a worker that does not answer in time are
    # reported, not raised
    warm = precompile.start([variant], lambda: 1 / 0).wait(1)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "empty")
    failed = precompile.start([variant], lambda: Pool(RuntimeError("worker died"))).wait(1)
    late = precompile.start([variant], lambda: Pool(None)).wait(0.1)
    print(json.dumps(dict(summary=summary, written=written, after=after, hits=hits, warm=warm, failed=failed,
                          late=late)))
"""

POOL = """
import concurrent.futures


class Pool:
    def __init__(self, error):
        self.error = error

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        if self.error is not None:
            future.set_exception(self.error)
        return future
"""


def test_precompiled_variant_is_found_by_the_jit(tmp_path):
    """A variant compiled for sm_90 on the CPU, in a worker process, into a fresh ``TRITON_CACHE_DIR``
    is what the JIT's launch path then finds there: one cache hit, no new cache entry. Then the
    summaries of a warm start, a failed worker and a late one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=REPO)
    script = POOL + COMPILE_THEN_LAUNCH.format(tests=os.path.join(REPO, "tests"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode and "ptxas" in proc.stderr:
        pytest.skip(f"no ptxas for sm_90 here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["summary"].startswith("1 in ") and result["summary"].endswith("(1 compiled, 0 cached)"), result
    assert result["after"] == result["written"], result
    assert result["hits"] == [True], result
    assert result["warm"].endswith("(0 compiled, 1 cached)"), result
    assert result["failed"].endswith("(0 compiled, 0 cached), 1 failed (RuntimeError: worker died)"), result
    assert result["late"].endswith("(0 compiled, 0 cached), 1 late"), result


# On a GPU, in a fresh process with an empty cache, as the engine does it: precompile the variants of
# qwen2.5-1.5b's graph keys in Inductor's workers, then run paged_attention at every key (benign
# capture metadata), recording every compile the JIT makes for a launch and whether the cache had it.
CAPTURE_AFTER_PRECOMPILE = """
import json, torch
from triton import knobs
from fullgraph_backend import compat
from fullgraph_backend.attention import precompile, triton_paged
from fullgraph_backend.config import default_capture_sizes
from fullgraph_backend.forward_context import BatchKind, ForwardContext
from fullgraph_backend.pdl import supported

device = torch.device("cuda", 0)
compat.share_inductor_triton_settings(device)
pdl, calls, widths = supported(device), {(12, 0)}, [12 * 128, 2 * 128, 2 * 128]
ctx = ForwardContext(num_layers=1, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16, device=device, max_num_seqs=257,
                     max_num_tokens=512, max_model_len=2048, num_blocks=64)
keys = precompile.graph_keys(default_capture_sizes(), ctx.max_num_tokens, 256)
launches = precompile.graph_launches(keys, calls, ctx.kv_caches[0], ctx.metadata, pdl=pdl)
variants = precompile.variants(launches, compat.triton_target(device))
summary = precompile.start(variants, compat.inductor_compile_pool).wait(300)
compiles = []
knobs.compilation.listener = lambda *, src, cache_hit, **_: compiles.append((src.name, cache_hit))
qkv = torch.randn(ctx.max_num_tokens, sum(widths), dtype=torch.bfloat16, device=device)
m = ctx.metadata
for size, kind in keys:
    q, k, v = (x.unflatten(1, (-1, 128)) for x in qkv[:size].split(widths, dim=1))
    with ctx.capture_metadata(size, kind):
        triton_paged.paged_attention(q, k, v, ctx.kv_caches[0], m.query_start_loc, m.seq_lens, m.block_table,
                                     m.slot_mapping, 128 ** -0.5, 0, split_kv=kind is BatchKind.DECODE, pdl=pdl)
torch.cuda.synchronize()
print(json.dumps(dict(summary=summary, variants=len(variants), compiles=compiles)))
"""


@pytest.mark.gpu
def test_capture_compiles_nothing_after_precompile(tmp_path):
    """After the precompile, the JIT compiles nothing at the launches of the capture: every variant it
    needs, it loads from the cache (one compile call each, a cache hit)."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", CAPTURE_AFTER_PRECOMPILE], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    n = result["variants"]
    assert result["summary"].endswith(f"({n} compiled, 0 cached)"), result
    assert len(result["compiles"]) == n and all(hit for _, hit in result["compiles"]), result

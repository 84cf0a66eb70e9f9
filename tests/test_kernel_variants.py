"""How many Triton compiles the capture loop costs: the distinct specializations our attention
kernels are launched with over every graph key (docs/perf-notes.md, section 23).

Triton compiles a kernel once per specialization key: its constexprs and launch options, and, for
each int argument not listed in ``do_not_specialize``, whether it equals 1 or is divisible by 16
(for each pointer, whether it is 16-byte aligned). A token count passed as a specialized int would
cost one compile per size class, each JIT-compiled during the warm-up of a capture size on a cold
start. The keys are computed here as Triton's launcher computes them (its binder, no device, no
launch) for the launches :func:`paged_attention` makes at each graph key, on meta tensors shaped
as the engine's qwen2.5-1.5b graphs on an H200 (132 SMs, TMA).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.weak import WeakIdKeyDictionary

from fullgraph_backend.attention import triton_paged
from fullgraph_backend.config import default_capture_sizes

jit = pytest.importorskip("triton.runtime.jit")
if not hasattr(jit, "create_function_from_signature"):
    pytest.skip("this Triton has no create_function_from_signature: its launcher's key cannot be computed "
                "without a device", allow_module_level=True)
from triton.backends.compiler import BaseBackend  # noqa: E402

KERNELS = ("_split_kv_kernel", "_unified_kernel", "_store_kv_kernel")
QWEN = dict(q_heads=12, kv_heads=2, head_dim=128)  # qwen2.5-1.5b
LLAMA = dict(q_heads=32, kv_heads=8, head_dim=64)  # llama-3.2-1b
MAX_NUM_SEQS = 256  # the engine's default; its context holds one more request
WIDTH = 2048 // 16  # block-table width: max_model_len 2048, block_size 16


def _jit_function(kernel) -> "jit.JITFunction":
    """The JITFunction behind ``kernel`` (under TRITON_INTERPRET=1 the decorator returns an
    interpreter wrapper holding the function and the decorator's arguments)."""
    if isinstance(kernel, jit.JITFunction):
        return kernel
    return jit.JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if k.startswith("do_not_specialize")})


class KeyRecorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records Triton's specialization
    key of the launch, and the plan it belongs to: the values of the declared constexprs and the
    launch options."""

    def __init__(self, kernel) -> None:
        fn = _jit_function(kernel)
        self.binder = jit.create_function_from_signature(fn.signature, fn.params, BaseBackend)
        self.declared = [p.is_constexpr for p in fn.params]  # tl.constexpr parameters: the launch plan
        self.keys: dict[tuple, set] = {}  # key -> graph keys that launch it
        self.plans: set[tuple] = set()
        self.graph_key = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _, specialization, options = self.binder(*args, **kwargs)
            options = tuple(sorted((k, str(v)) for k, v in options.items()))
            key = (tuple(map(str, specialization)), options)
            self.keys.setdefault(key, set()).add(self.graph_key)
            self.plans.add((tuple(str(s) for s, declared in zip(specialization, self.declared) if declared), options))
        return launch


def record_on_h200(monkeypatch) -> dict[str, KeyRecorder]:
    """Recorders in place of the attention kernels, with an H200's device constants, and scratch and
    descriptor tables of their own (the meta tensors must not reach the process-wide ones)."""
    monkeypatch.setattr(triton_paged, "_sm_count", lambda device: 132)
    monkeypatch.setattr(triton_paged, "_has_tma", lambda device: True)
    monkeypatch.setattr(triton_paged, "_SCRATCH", {})
    monkeypatch.setattr(triton_paged, "_DESCRIPTORS", WeakIdKeyDictionary())
    recorders = {name: KeyRecorder(getattr(triton_paged, name)) for name in KERNELS}
    for name, recorder in recorders.items():
        monkeypatch.setattr(triton_paged, name, recorder)
    return recorders


@pytest.fixture()
def h200_keys(monkeypatch):
    return record_on_h200(monkeypatch)


def launch_every_key(recorders, sizes, q_heads, kv_heads, head_dim, dtype=torch.bfloat16):
    """What the capture loop launches: each size as a mixed batch, and as a uniform-decode batch up to
    the first size holding MAX_NUM_SEQS requests; q, k, v are views of one fused projection, as in
    the engine's graphs."""
    meta = dict(device="meta")
    seqs = MAX_NUM_SEQS + 1
    cache = torch.empty(2, 64, 16, kv_heads, head_dim, dtype=dtype, **meta)
    query_start_loc = torch.empty(seqs + 1, dtype=torch.int32, **meta)
    seq_lens = torch.empty(seqs, dtype=torch.int32, **meta)
    block_table = torch.empty(seqs, WIDTH, dtype=torch.int32, **meta)
    slot_mapping = torch.empty(max(sizes), dtype=torch.int64, **meta)
    decode_limit = min(s for s in sizes if s >= MAX_NUM_SEQS)
    for size in sizes:
        qkv = torch.empty(size, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, **meta)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
        q, k, v = q.view(size, q_heads, head_dim), k.view(size, kv_heads, head_dim), v.view(size, kv_heads, head_dim)
        for split_kv in (False, True) if size <= decode_limit else (False,):
            for recorder in recorders.values():
                recorder.graph_key = (size, "decode" if split_kv else "mixed")
            triton_paged.paged_attention(q, k, v, cache, query_start_loc, seq_lens, block_table, slot_mapping,
                                         head_dim ** -0.5, 0, split_kv=split_kv, pdl=False)


def test_token_counts_add_no_specialization(h200_keys):
    """Every specialization key of a kernel is a launch plan of its own: the token and request
    counts (``num_reqs``, ``num_tokens``) are not specialized, so their values (1, multiples of 16)
    cost no extra compile."""
    launch_every_key(h200_keys, default_capture_sizes(), **QWEN)
    for name, recorder in h200_keys.items():
        assert len(recorder.keys) == len(recorder.plans), f"{name}: {len(recorder.keys)} keys for {len(recorder.plans)} plans"


@pytest.mark.parametrize("shape", [QWEN, LLAMA], ids=["qwen2.5-1.5b", "llama-3.2-1b"])
def test_variants_do_not_grow_with_capture_sizes(monkeypatch, shape):
    """A capture size of every token count from 1 to 512 compiles no more variants than the default
    ladder: the cold capture's JIT cost is per launch plan, not per size."""
    counts = []
    for sizes in (default_capture_sizes(), tuple(range(1, 513))):
        with monkeypatch.context() as patch:
            recorders = record_on_h200(patch)
            launch_every_key(recorders, sizes, **shape)
            counts.append({name: len(r.keys) for name, r in recorders.items()})
    assert counts[0] == counts[1]


def test_qwen_variants_on_h200(h200_keys):
    """The count docs/perf-notes.md (section 23) times: 6 split-KV decode plans (segments 16, 8, 4,
    2, 1; 4-warp and 2-warp TMA programs), 2 unified (16- and 64-row query tiles), 1 store. A new
    plan is a new JIT compile on every cold start (about 1 s each for sm_90): update the section."""
    launch_every_key(h200_keys, default_capture_sizes(), **QWEN)
    assert {name: len(r.keys) for name, r in h200_keys.items()} == {
        "_split_kv_kernel": 6, "_unified_kernel": 2, "_store_kv_kernel": 1}

"""``fullgraph::linear``: ``F.linear`` that runs one-row 16-bit products on a Triton GEMV.

At batch 1 a decode step's projections are matrix-vector products. cuBLAS tiles them 64 output
columns to a CTA, which leaves most of an H100's SMs idle on the narrow ones (Qwen2.5-1.5B's qkv
and o_proj read their weights at a third of the card's bandwidth in the batch-1 profile,
docs/perf-notes.md, section 3). Here each program owns ``BLOCK_N`` = 4 weight rows and walks K
in 512-wide slices, so a 1536-wide output is 384 programs. Per call with cold weights it beats
cuBLAS on every projection with K = 1536 and on the LM head; on down (K = 8960) it tied in one
measurement and lost in another, so long K stays on cuBLAS's split-K; a two-row variant lost on
gate_up and down, so more rows stay ``F.linear`` (:func:`uses_gemv`; docs/perf-notes.md,
section 10, and the GEMV table of docs/benchmarks.md, ``python3 tools/bench_gemv.py``).

The op is defined like every ``fullgraph`` op (``fullgraph_backend/library.py``: cheap Python
dispatch, which matters where a graph runs without CUDA graphs, larger than the largest capture
size). Inside a captured graph the choice is made once, at capture, from the row count of that
graph's padded size.

With ``pdl=True`` (the backend option) the kernel is launched with programmatic dependent launch
on Hopper: its first weight loads overlap the previous kernel (docs/perf-notes.md, section 18).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fullgraph_backend.library import define_op
from fullgraph_backend.pdl import enabled as pdl_enabled, gdc_launch_dependents, gdc_wait, kernel_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional dependency: without it every linear stays F.linear
    triton = None

# Longest K measured faster than cuBLAS is 1536; 8960 tied or lost (docs/perf-notes.md, section 10).
MAX_K = 4096
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 4, 512, 4, 3
_DTYPES = (torch.bfloat16, torch.float16)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn



@_jit
def _gemv_kernel(x, w, bias, out, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program ``i``: ``out[i*BLOCK_N : (i+1)*BLOCK_N] = w[rows] @ x (+ bias)``, fp32 accumulation.

    Products accumulate elementwise in a ``[BLOCK_N, BLOCK_K]`` tile and are summed once after the
    loop, so the loop body is loads and FMAs only. ``PDL``: launched with programmatic dependent
    launch (:mod:`fullgraph_backend.pdl`), the program lets the next kernel launch, loads its first
    weight slice (weights depend on no kernel), and only then waits for the previous kernel, whose
    output ``x`` may be; the sums are the same, in the same order, as without it.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = 0
    if PDL:
        gdc_launch_dependents()
        offs_k = tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        weight = tl.load(w + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                         other=0.0)
        gdc_wait()
        row = tl.load(x + offs_k, mask=k_ok, other=0.0)
        acc += weight.to(tl.float32) * row.to(tl.float32)[None, :]
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        weight = tl.load(w + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                         other=0.0)
        row = tl.load(x + offs_k, mask=k_ok, other=0.0)
        acc += weight.to(tl.float32) * row.to(tl.float32)[None, :]
    result = tl.sum(acc, 1)
    if HAS_BIAS:
        result += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out + offs_n, result.to(out.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         pdl: bool | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x [..., K]`` (leading dims of size 1) on the Triton kernel.

    ``weight [N, K]`` must have unit stride along K; ``bias [N]`` is optional. Runs wherever Triton
    does (CPU tensors under ``TRITON_INTERPRET=1``). ``pdl``: launch with programmatic dependent
    launch where the device supports it; None takes :func:`fullgraph_backend.pdl.enabled` (on
    inside the compiled calls of a ``pdl=True`` backend). Example::

        y = gemv(torch.randn(1, 1536, device="cuda", dtype=torch.bfloat16), w)  # w [2048, 1536]
    """
    if triton is None:
        raise RuntimeError("gemv needs triton, which is not installed: pip install 'fullgraph[triton]'")
    n, k = weight.shape
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"gemv takes one row of {k} features, got x of shape {tuple(x.shape)}")
    if weight.stride(1) != 1 or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"gemv needs weight [N, K] with unit stride along K and bias [N]; got weight strides "
                         f"{weight.stride()}, bias {None if bias is None else tuple(bias.shape)}")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _launch(x.reshape(k).contiguous(), weight, bias, out, pdl_enabled(x.device) if pdl is None else pdl)
    return out


def _launch(row: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, use_pdl: bool):
    """Launch the kernel; returns Triton's compiled kernel (its ``metadata.launch_pdl`` says how it launched)."""
    n, k = weight.shape
    flag = kernel_flag(use_pdl, row.device)
    return _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        row, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PDL=flag, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES, launch_pdl=flag and row.is_cuda,
    )


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fullgraph::linear`` takes the GEMV: one row, CUDA, 16-bit, within the measured bounds.

    fp32 stays on cuBLAS, so float32 runs keep eager's exact products (greedy tokens equal eager's).
    """
    k = weight.shape[1]
    return (triton is not None and x.is_cuda and x.dtype in _DTYPES and weight.dtype == x.dtype and x.numel() == k
            and weight.stride(1) == 1 and k <= MAX_K)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if uses_gemv(x, weight) and (bias is None or bias.dtype == x.dtype):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


linear = define_op("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor", _linear,
                   lambda x, weight, bias=None: x.new_empty((*x.shape[:-1], weight.shape[0])))

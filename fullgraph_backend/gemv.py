"""``fullgraph::linear``: ``F.linear`` that runs one-row 16-bit products on a Triton GEMV.

At batch 1 a decode step's projections are matrix-vector products. cuBLAS tiles them 64 output
columns to a CTA, which leaves most of an H100's SMs idle on the narrow ones (Qwen2.5-1.5B's qkv
and o_proj read their weights at a third of the card's bandwidth in the batch-1 profile,
docs/perf-notes.md, section 3). Here each program owns ``BLOCK_N`` = 4 weight rows and walks K
in 512-wide slices, so a 1536-wide output is 384 programs. Per call with cold weights it beats
cuBLAS on every projection with K = 1536 and on the LM head. Past K = ``LONG_K`` (the down
projection, K = 8960) it walks 1024-wide slices (``LONG_K_TILES``): 9.3 us a call on the H200
against 12.3 + 1.6 us for cuBLAS's split-K and its reduce, a decode step 5-7% shorter at batch 1
(docs/perf-notes.md, sections 38 and 48). A two-row CUDA-core variant lost on gate_up and down
(docs/perf-notes.md, section 10), so 2 to 16 rows take the tensor-core kernel of
:mod:`fullgraph_backend.few_rows` and more stay ``F.linear`` (:func:`uses_gemv`, the GEMV table of
docs/benchmarks.md, ``python3 tools/bench_gemv.py``).

The op is defined like every ``fullgraph`` op (``fullgraph_backend/library.py``: cheap Python
dispatch, which matters where a graph runs without CUDA graphs, larger than the largest capture
size). Inside a captured graph the choice is made once, at capture, from the row count of that
graph's padded size.

With ``pdl=True`` (the backend option) the kernel is launched with programmatic dependent launch
on Hopper: its first weight loads overlap the previous kernel (docs/perf-notes.md, section 18).

``fullgraph::rms_norm_linear`` and ``fullgraph::add_rms_norm_linear`` are the same op after an
RMSNorm (and the residual add before it): where the GEMV runs, the kernel computes the norm in
its prologue, so no kernel of its own runs before it (the ``fuse_norm_linear`` pass puts them in;
docs/perf-notes.md, section 32). ``fullgraph::silu_mul_linear`` is the op after ``silu(gate) *
up``, the down projection, with ``SILU_MUL_TILES``: 10.7 us a call against 13.8 for SiLU-mul +
cuBLAS on the H200 (the ``fuse_silu_linear`` pass; section 36). ``fullgraph::linear_silu_mul`` is the
op before it: ``silu(gate) * up`` of a merged gate_up projection's halves, SiLU-mul in the GEMV's
epilogue (the ``fuse_silu_epilogue`` pass, on by default; a batch-1 step 0.4-1.2% shorter, section 49).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fullgraph_backend import few_rows
from fullgraph_backend.few_rows import (FEW_ROW_DTYPES, few_row_linear, kernel_operands, require_triton, triton_jit,
                                       uses_few_rows, weight_slice)
from fullgraph_backend.library import define_op
from fullgraph_backend.pdl import enabled as pdl_enabled, gdc_launch_dependents, gdc_wait, kernel_flag

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional dependency: without it every linear stays F.linear
    triton = None

# The longest K a one-row linear takes the GEMV at (Mistral-7B's down, 14336, fits). Measured faster
# than cuBLAS at 1536 and, with LONG_K_TILES, at 8960 (perf-notes sections 10 and 38); read at each call.
MAX_K = 16384


class Tiles(NamedTuple):
    """A GEMV launch's tiling: weight rows a program owns, K slice width, warps, pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


TILES = Tiles(block_n=4, block_k=512, num_warps=4, num_stages=3)
# Plain launches past LONG_K (the down projection, K = 8960 on Qwen2.5-1.5B): 2 rows a program,
# 1024-wide slices, 3 stages. On the H200 the Qwen2.5-1.5B step at batch 1 took 1.4% less than with
# (4, 1024, 4, 2) (four runs, -0.9 to -1.8%; the fastest of 7 tilings in the step; Llama-3.2-1B's
# unchanged: perf-notes 48). Alone (tools/bench_gemv.py, with PDL) the older tiling took 9.3 us a call
# against 12.3 for cuBLAS (perf-notes 38).
LONG_K_TILES = Tiles(block_n=2, block_k=1024, num_warps=4, num_stages=3)
# The same launches with SiLU-mul in the prologue (fuse_silu): 4 rows a program, 2 stages, the fastest
# of 8 tilings alone, 10.7 us against 13.8 for SiLU-mul + cuBLAS (perf-notes 36). LONG_K_TILES' tiling
# made the batch-1 step 17% slower with fuse_silu (perf-notes 48).
SILU_MUL_TILES = Tiles(block_n=4, block_k=1024, num_warps=4, num_stages=2)
LONG_K = 4096
# Plain launches whose row fits one such slice and whose N is at most SHORT_N: one load round trip a
# program, for qkv and o_proj, which run latency-bound at 1.5-1.9 TB/s. On the H200 (bench_gemv, with
# PDL): qkv 2.98 against TILES' 3.43 us, o_proj 2.46 against 3.03; gate_up (N = 17920) 16.42 against
# 14.75, hence the bound on N. The batch-1 decode step: -15.5 us (session 17) and -17.4 us (session 20)
# against TILES in the same run (perf-notes 39 and 42); tools/bench_decode.py's ``+noshorttiles`` sets
# SHORT_N to 0 for its mode.
SHORT_TILES = Tiles(block_n=4, block_k=2048, num_warps=4, num_stages=1)
SHORT_N = 4096
GEMV_DTYPES = FEW_ROW_DTYPES  # the 16-bit dtypes both linear kernels take


@triton_jit
def _rounded(value, dtype: tl.constexpr):
    """``value`` rounded to ``dtype``, back as fp32: where eager rounds (on a GPU to nearest even, as
    torch; Triton's interpreter truncates to bfloat16, and its "rtne" does not carry into the exponent)."""
    return value.to(dtype).to(tl.float32)


@triton_jit
def _summed_slice(x, residual, offs_k, k_ok, HAS_RESIDUAL: tl.constexpr):
    """``x + residual`` over one slice, rounded to x's dtype as eager's add rounds, as fp32."""
    h = tl.load(x + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = _rounded(h + tl.load(residual + offs_k, mask=k_ok, other=0.0).to(tl.float32), x.dtype.element_ty)
    return h


@triton_jit
def _inv_rms(x, residual, h_out, K, eps, stored, HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """``rsqrt(mean((x + residual)**2) + eps)`` of one row in fp32; writes the sum's first
    ``stored`` features to ``h_out``: K in one program of a grid, 0 in the others (every program
    needs the sum, one writes it)."""
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        h = _summed_slice(x, residual, offs_k, k_ok, HAS_RESIDUAL)
        squares += h * h
        if HAS_RESIDUAL:
            tl.store(h_out + offs_k, h.to(h_out.dtype.element_ty), mask=offs_k < stored)
    return tl.rsqrt(tl.sum(squares, 0) / K + eps)


@triton_jit
def _row_slice(x, residual, norm_w, up, offs_k, k_ok, rstd, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
               GATED: tl.constexpr):
    """One slice of the GEMV's input row as fp32: ``x``; with ``NORM`` the RMSNorm of
    ``x (+ residual)`` rounded where eager rounds (normalised in fp32, cast to x's dtype, times the
    norm weight, cast again: Llama's and Qwen2's RMSNorm, ours and transformers'); with ``GATED``
    ``silu(x) * up``, rounded as eager's two ops round."""
    if NORM:
        return _normed(_summed_slice(x, residual, offs_k, k_ok, HAS_RESIDUAL), norm_w, offs_k, k_ok, rstd,
                       x.dtype.element_ty)
    if GATED:
        return _gated(x, up, offs_k, k_ok)
    return tl.load(x + offs_k, mask=k_ok, other=0.0).to(tl.float32)


@triton_jit
def _gated(gate, up, offs, ok):
    """``silu(gate) * up`` over one slice as fp32 (:func:`_silu_mul`)."""
    g = tl.load(gate + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up + offs, mask=ok, other=0.0).to(tl.float32)
    return _silu_mul(g, u, gate.dtype.element_ty)


@triton_jit
def _silu_mul(g, u, dtype: tl.constexpr):
    """``silu(g) * u`` of fp32 values that ``dtype`` holds exactly: silu in fp32 as torch computes it
    (``x / (1 + exp(-x))``), rounded to ``dtype``, then the product, rounded again."""
    return _rounded(_rounded(g / (1.0 + tl.exp(-g)), dtype) * u, dtype)


@triton_jit
def _normed(h, norm_w, offs_k, k_ok, rstd, dtype: tl.constexpr):
    """``h`` (fp32) normalised by ``rstd``, cast to ``dtype``, times the norm weight, cast again."""
    scale = tl.load(norm_w + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    return _rounded(_rounded(h * rstd, dtype) * scale, dtype)


@triton_jit
def _fold_slice(acc, weight, x, residual, norm_w, up, K, k0, rstd, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    """``acc`` plus one loaded weight slice times the row's slice from column ``k0``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    row = _row_slice(x, residual, norm_w, up, offs_k, offs_k < K, rstd, NORM, HAS_RESIDUAL, GATED)
    return acc + weight.to(tl.float32) * row[None, :]


@triton_jit
def _gemv_kernel(x, w, bias, out, N, K, stride_wn, residual, norm_w, h_out, eps, up, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr, PAIRED: tl.constexpr):
    """Program ``i``: ``out[i*BLOCK_N : (i+1)*BLOCK_N] = w[rows] @ x (+ bias)``, fp32 accumulation.

    Products accumulate elementwise in a ``[BLOCK_N, BLOCK_K]`` tile and are summed once after the
    loop, so the loop body is loads and FMAs only. ``PDL``: launched with programmatic dependent
    launch (:mod:`fullgraph_backend.pdl`), the program loads its first weight slice (weights depend
    on no kernel), then waits for the previous kernel, whose output ``x`` may be, and only then lets
    the next kernel launch; the slices are summed in the same order as without it, so the bits are
    the same. (Loading 3 slices before the wait measured the same as 1 on the H200: perf-notes
    section 36.)

    ``NORM``: the row is ``rms_norm(x (+ residual)) * norm_w`` (:func:`_row_slice`). Each program
    reads the row twice (a 1536-wide row is 3 KB, from L2): once for the sum of squares, once as it
    walks K; program 0 writes ``x + residual`` to ``h_out`` (``HAS_RESIDUAL``). The first
    weight slice is loaded before the sum of squares, as with PDL: waiting for the
    norm before any weight load cost ~1.6 us a GEMV on the H200 (docs/perf-notes.md, section 34).

    ``GATED``: the row is ``silu(x) * up`` (:func:`_gated`), computed slice by slice as K is walked.

    ``PAIRED``: the output is ``silu(gate) * up`` of the product's two halves (``out[f]`` from weight
    rows ``f`` and ``f + N/2``, the gated MLP's merged gate_up projection): program ``i`` owns
    ``BLOCK_N / 2`` such pairs, their rows interleaved in the tile, and applies SiLU-mul to its sums
    rounded as the product's output is (:func:`_silu_mul`), so no kernel of its own runs after it.
    """
    if PAIRED:
        lanes = tl.arange(0, BLOCK_N)
        pairs = tl.program_id(0) * (BLOCK_N // 2) + lanes // 2
        offs_n = pairs + (lanes % 2) * (N // 2)
        n_ok = pairs < N // 2
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = 0
    if PDL or NORM:
        w0 = weight_slice(w, offs_n, n_ok, stride_wn, 0, K, BLOCK_K)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    rstd = 1.0
    if NORM:
        rstd = _inv_rms(x, residual, h_out, K, eps, tl.where(tl.program_id(0) == 0, K, 0), HAS_RESIDUAL, BLOCK_K)
    if PDL or NORM:
        acc = _fold_slice(acc, w0, x, residual, norm_w, up, K, 0, rstd, BLOCK_K, NORM, HAS_RESIDUAL, GATED)
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        weight = weight_slice(w, offs_n, n_ok, stride_wn, k0, K, BLOCK_K)
        acc = _fold_slice(acc, weight, x, residual, norm_w, up, K, k0, rstd, BLOCK_K, NORM, HAS_RESIDUAL, GATED)
    result = tl.sum(acc, 1)
    if HAS_BIAS:
        result += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if PAIRED:
        gate_sum, up_sum = tl.split(tl.reshape(result, (BLOCK_N // 2, 2)))
        offs_f = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        gated = _silu_mul(_rounded(gate_sum, out.dtype.element_ty), _rounded(up_sum, out.dtype.element_ty),
                          out.dtype.element_ty)
        tl.store(out + offs_f, gated.to(out.dtype.element_ty), mask=offs_f < N // 2)
    else:
        tl.store(out + offs_n, result.to(out.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         pdl: bool | None = None, tiles: Tiles | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x [..., K]`` (leading dims of size 1) on the Triton kernel.

    ``weight [N, K]`` must have unit stride along K; ``bias [N]`` is optional. Runs wherever Triton
    does (CPU tensors under ``TRITON_INTERPRET=1``). ``pdl``: launch with programmatic dependent
    launch where the device supports it; None takes :func:`fullgraph_backend.pdl.enabled` (on
    inside the compiled calls of a ``pdl=True`` backend). ``tiles``: the launch's tiling; None takes
    :func:`default_tiles`. Example::

        y = gemv(torch.randn(1, 1536, device="cuda", dtype=torch.bfloat16), w)  # w [2048, 1536]
    """
    require_triton("gemv")
    n, k = weight.shape
    _check_row(x, weight, bias)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _launch(x.reshape(k).contiguous(), weight, bias, out, pdl_enabled(x.device) if pdl is None else pdl,
            tiles=tiles or default_tiles(n, k))
    return out


def default_tiles(n: int, k: int) -> Tiles:
    """The tiling of a plain one-row launch over an ``[n, k]`` weight: :data:`LONG_K_TILES` past
    K = :data:`LONG_K`; :data:`SHORT_TILES` where the row fits its one slice and N is at most
    :data:`SHORT_N` (as it is at the call); :data:`TILES` otherwise."""
    if k > LONG_K:
        return LONG_K_TILES
    if k <= SHORT_TILES.block_k and n <= SHORT_N:
        return SHORT_TILES
    return TILES


class NormPrologue(NamedTuple):
    """The RMSNorm the GEMV applies to its row first: ``rms_norm(row (+ residual)) * weight``,
    the sum ``row + residual`` written to ``h_out`` (both None without a residual)."""

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None
    h_out: torch.Tensor | None = None


def _check_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    n, k = weight.shape
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"gemv takes one row of {k} features, got x of shape {tuple(x.shape)}")
    if weight.stride(1) != 1 or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"gemv needs weight [N, K] with unit stride along K and bias [N]; got weight strides "
                         f"{weight.stride()}, bias {None if bias is None else tuple(bias.shape)}")


def _launch(row: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, use_pdl: bool,
            norm: NormPrologue | None = None, up: torch.Tensor | None = None, tiles: Tiles = TILES,
            paired: bool = False):
    """Launch the kernel (``up``: the row is ``silu(row) * up``; ``paired``: the output is SiLU-mul of
    the product's halves); returns Triton's compiled kernel (its ``metadata.launch_pdl`` says how it
    launched)."""
    n, k = weight.shape
    flag = kernel_flag(use_pdl, row.device)
    residual = norm.residual if norm is not None else None
    grid = triton.cdiv(n // 2, tiles.block_n // 2) if paired else triton.cdiv(n, tiles.block_n)
    return _gemv_kernel[(grid,)](
        row, weight, bias.contiguous() if bias is not None else weight, out, n, k, weight.stride(0),
        row if residual is None else residual, row if norm is None else norm.weight,
        row if residual is None else norm.h_out, 0.0 if norm is None else norm.eps, row if up is None else up,
        HAS_BIAS=bias is not None, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PDL=flag, NORM=norm is not None,
        HAS_RESIDUAL=residual is not None, GATED=up is not None, PAIRED=paired,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=flag and row.is_cuda,
    )


def uses_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether a linear of ``x`` takes the GEMV: one row, CUDA, 16-bit, a bias (if any) of ``x``'s
    dtype, K up to :data:`LONG_K`; past it, up to :data:`MAX_K` as it is at the call (tools/bench_decode.py
    lowers it for a mode), and only where the launch takes PDL: without it the GEMV lost to cuBLAS's
    split-K at K = 8960 on the H200 (13.8 against 11.8 us a call; 9.3 with PDL, perf-notes 38).

    fp32 stays on cuBLAS, so float32 runs keep eager's exact products (greedy tokens equal eager's).
    """
    k = weight.shape[1]
    return (kernel_operands(x, weight, bias) and x.numel() == k
            and (k <= LONG_K or (k <= MAX_K and pdl_enabled(x.device))))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One row on the GEMV, a few rows on :func:`fullgraph_backend.few_rows.few_row_linear`, the
    rest (and what those kernels do not take) on ``F.linear``."""
    if uses_gemv(x, weight, bias):
        return gemv(x, weight, bias)
    if uses_few_rows(x, weight, bias):
        return few_row_linear(x, weight, bias)
    return F.linear(x, weight, bias)


linear = define_op("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor", _linear,
                   lambda x, weight, bias=None: x.new_empty((*x.shape[:-1], weight.shape[0])))


# The RMSNorm before a projection, folded into the GEMV's prologue (docs/perf-notes.md, section 32):
# at batch 1 Inductor runs the residual add + RMSNorm as a kernel of its own before each GEMV; here the
# GEMV's programs compute it from the row they read anyway, and that kernel goes.
ROWS_BLOCK_K = 1024
# rows up to this wide are read once and held in registers (Llama's and Qwen2's hidden sizes: 1536 to 8192)
ROWS_ONE_PASS_MAX_K = 8192


@triton_jit
def _rms_norm_rows_kernel(x, residual, norm_w, normed, h_out, K, eps, HAS_RESIDUAL: tl.constexpr,
                          BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    """Program ``i``: row ``i`` of ``rms_norm(x (+ residual)) * norm_w`` into ``normed`` and the sum
    into ``h_out``, rounded as the GEMV's prologue rounds (:func:`_row_slice`). ``ONE_PASS`` (the
    row fits one ``BLOCK_K`` slice): the row is read once and kept in registers; otherwise it is
    read again, slice by slice, after the sum of squares."""
    base = tl.program_id(0).to(tl.int64) * K
    x += base
    residual += base
    h_out += base
    normed += base
    if ONE_PASS:
        offs_k = tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        h = _summed_slice(x, residual, offs_k, k_ok, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(h_out + offs_k, h.to(h_out.dtype.element_ty), mask=k_ok)
        rstd = tl.rsqrt(tl.sum(h * h, 0) / K + eps)
        row = _normed(h, norm_w, offs_k, k_ok, rstd, x.dtype.element_ty)
        tl.store(normed + offs_k, row.to(normed.dtype.element_ty), mask=k_ok)
    else:
        rstd = _inv_rms(x, residual, h_out, K, eps, K, HAS_RESIDUAL, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            row = _row_slice(x, residual, norm_w, x, offs_k, k_ok, rstd, True, HAS_RESIDUAL, False)
            tl.store(normed + offs_k, row.to(normed.dtype.element_ty), mask=k_ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's and Qwen2's RMSNorm as their code (and ours) computes it: normalise in float32, cast
    back, then scale. The ops' fallback, and what their kernels round like."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, *,
                  pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.linear(rms_norm(h) * norm_weight, weight, bias)`` with ``h = x (+ residual)`` for one row,
    in one launch of the GEMV kernel; returns it and ``h`` (None without ``residual``).

    Shapes and ``pdl`` as :func:`gemv`; ``norm_weight [K]`` and ``residual`` (like ``x``) in x's
    dtype. Example::

        out, h = rms_norm_gemv(o_proj_out, norm.weight, 1e-6, gate_up.weight, residual=h)
    """
    require_triton("rms_norm_gemv")
    n, k = weight.shape
    _check_row(x, weight, bias)
    if norm_weight.shape != (k,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm_gemv needs norm_weight [{k}] and a residual shaped like x {tuple(x.shape)}; got "
                         f"{tuple(norm_weight.shape)}, {None if residual is None else tuple(residual.shape)}")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    prologue = NormPrologue(norm_weight.contiguous(), eps, None if residual is None else residual.reshape(k).contiguous(), h)
    _launch(x.reshape(k).contiguous(), weight, bias, out, pdl_enabled(x.device) if pdl is None else pdl, prologue)
    return out, h


def rms_norm_rows(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm(h) * norm_weight`` with ``h = x (+ residual)`` over rows ``x [..., K]``, one program
    a row (one launch, as Inductor's own norm kernel); returns it and ``h`` (None without
    ``residual``). What the ops run where the GEMV does not: more rows, long K, fp32."""
    require_triton("rms_norm_rows")
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    normed = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(normed) if residual is not None else None
    one_pass = k <= ROWS_ONE_PASS_MAX_K
    _rms_norm_rows_kernel[(rows.shape[0],)](
        rows, rows if residual is None else residual.reshape(-1, k).contiguous(), norm_weight.contiguous(), normed,
        normed if h is None else h, k, eps, HAS_RESIDUAL=residual is not None,
        BLOCK_K=triton.next_power_of_2(k) if one_pass else ROWS_BLOCK_K, ONE_PASS=one_pass, num_warps=TILES.num_warps)
    return normed, h


def _norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                 weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(rms_norm(h) * norm_weight, weight, bias), h)``, ``h = x (+ residual)``: one row on
    the GEMV with the norm in its prologue, other rows on :func:`rms_norm_rows` + ``fullgraph::linear``
    (CUDA), plain PyTorch ops elsewhere (CPU; dtypes the kernels do not take)."""
    if not _norm_kernels_take(x, residual, norm_weight):
        return _composed(x, residual, norm_weight, eps, weight, bias)
    if uses_gemv(x, weight, bias):
        out, h = rms_norm_gemv(x, norm_weight, eps, weight, bias, residual)
    else:
        normed, h = rms_norm_rows(x, norm_weight, eps, residual)
        out = linear(normed, weight, bias)
    return out, x if h is None else h


def _norm_kernels_take(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor) -> bool:
    """Whether our norm kernels compute the norm: CUDA, with the norm weight and residual as x."""
    return (triton is not None and x.is_cuda and norm_weight.dtype == x.dtype and norm_weight.shape == x.shape[-1:]
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape)))


def _composed(x, residual, norm_weight, eps, weight, bias=None):
    """Eager's ops: the ops' fallback, and their fake (on fake tensors: the kernels' shapes, dtypes
    and strides, the sum contiguous as the kernels write it)."""
    h = x if residual is None else (x + residual).contiguous()
    return linear(rms_norm(h, norm_weight, eps), weight, bias), h


rms_norm_linear = define_op(
    "rms_norm_linear(Tensor x, Tensor norm_weight, float eps, Tensor weight, Tensor? bias=None) -> Tensor",
    lambda x, norm_weight, eps, weight, bias=None: _norm_linear(x, None, norm_weight, eps, weight, bias)[0],
    lambda x, norm_weight, eps, weight, bias=None: _composed(x, None, norm_weight, eps, weight, bias)[0])
add_rms_norm_linear = define_op(
    "add_rms_norm_linear(Tensor x, Tensor residual, Tensor norm_weight, float eps, Tensor weight, Tensor? bias=None)"
    " -> (Tensor, Tensor)",
    lambda x, residual, norm_weight, eps, weight, bias=None: _norm_linear(x, residual, norm_weight, eps, weight, bias),
    _composed)
"""``fullgraph::rms_norm_linear`` and ``fullgraph::add_rms_norm_linear`` (which also returns the sum
``h = x + residual``, the next residual): ``fullgraph::linear`` of Llama's RMSNorm, the norm in the
GEMV's prologue where the GEMV runs (:func:`_norm_linear`). The ``fuse_norm_linear`` pass puts them in."""


# SiLU-mul before the down projection, folded into the GEMV's prologue (docs/perf-notes.md, section
# 36): at batch 1 Inductor runs ``silu(gate) * up`` as a kernel of its own before cuBLAS's split-K
# down (and its reduce kernel); here one GEMV launch computes the gated row as it walks K.
SILU_MUL_BLOCK_K = 1024


@triton_jit
def _silu_mul_rows_kernel(gate, up, out, K, stride_gate, stride_up, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program ``(i, j)``: slice ``j`` of row ``i`` of ``silu(gate) * up`` into ``out`` (contiguous),
    rounded as the GEMV's prologue rounds (:func:`_gated`). ``PDL``: waits for the kernel before it
    first, as Inductor's SiLU-mul kernel it stands for does."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs < K
    value = _gated(gate + row * stride_gate, up + row * stride_up, offs, ok)
    tl.store(out + row * K + offs, value.to(out.dtype.element_ty), mask=ok)


def silu_mul_gemv(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  pdl: bool | None = None, tiles: Tiles | None = None) -> torch.Tensor:
    """``F.linear(F.silu(gate) * up, weight, bias)`` for one row, in one launch of the GEMV kernel.

    ``gate`` and ``up``: one row of K features each, unit stride along K (the two halves of a merged
    gate_up projection's output qualify); shapes and ``pdl`` as :func:`gemv`; ``tiles`` defaults to
    :data:`SILU_MUL_TILES`. Example::

        gate, up = gate_up_out.chunk(2, dim=-1)  # [1, 8960] each
        y = silu_mul_gemv(gate, up, down.weight)  # [1, 1536]
    """
    require_triton("silu_mul_gemv")
    n, k = weight.shape
    _check_row(gate, weight, bias)
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"silu_mul_gemv needs up shaped like gate {tuple(gate.shape)} in {gate.dtype}; got "
                         f"{tuple(up.shape)} in {up.dtype}")
    out = torch.empty((*gate.shape[:-1], n), dtype=gate.dtype, device=gate.device)
    _launch(gate.reshape(k).contiguous(), weight, bias, out, pdl_enabled(gate.device) if pdl is None else pdl,
            up=up.reshape(k).contiguous(), tiles=tiles or SILU_MUL_TILES)
    return out


def silu_mul_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` over rows ``[..., K]`` (each with unit stride along K) in one launch,
    contiguous: what the op runs before cuBLAS where the GEMV does not (more rows, fp32 excepted)."""
    require_triton("silu_mul_rows")
    k = gate.shape[-1]
    gate_rows, up_rows = gate.view(-1, k), up.view(-1, k)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    flag = kernel_flag(pdl_enabled(gate.device), gate.device)
    _silu_mul_rows_kernel[(gate_rows.shape[0], triton.cdiv(k, SILU_MUL_BLOCK_K))](
        gate_rows, up_rows, out, k, gate_rows.stride(0), up_rows.stride(0), BLOCK_K=SILU_MUL_BLOCK_K, PDL=flag,
        num_warps=TILES.num_warps, launch_pdl=flag and gate.is_cuda)
    return out


def _silu_mul_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(F.silu(gate) * up, weight, bias)``: one row on the GEMV with SiLU-mul in its
    prologue, other rows on :func:`silu_mul_rows` + ``fullgraph::linear`` (CUDA), eager's ops
    elsewhere (CPU; fp32 on the GEMV's terms; rows the kernels cannot address)."""
    if not _gated_kernels_take(gate, up):
        return _gated_composed(gate, up, weight, bias)
    if uses_gemv(gate, weight, bias):
        return silu_mul_gemv(gate, up, weight, bias)
    return linear(silu_mul_rows(gate, up), weight, bias)


def _gated_kernels_take(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether our kernels compute SiLU-mul: CUDA, 16-bit, ``up`` like ``gate``, rows of unit stride
    along K that a ``[rows, K]`` view addresses (fp32 keeps eager's numerics, as ``fullgraph::linear``)."""
    if triton is None or not gate.is_cuda or gate.dtype not in GEMV_DTYPES or up.dtype != gate.dtype:
        return False
    return up.shape == gate.shape and _rows_one_stride_apart(gate) and _rows_one_stride_apart(up)


def _rows_one_stride_apart(x: torch.Tensor) -> bool:
    """Whether a kernel can address ``x``'s rows as ``[rows, K]`` with one row stride and unit
    stride along K (a ``view`` exists: it never copies)."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return False
    try:
        x.view(-1, x.shape[-1])
    except (RuntimeError, ValueError):  # ValueError: fake tensors' view
        return False
    return True


def _gated_composed(gate, up, weight, bias=None):
    """Eager's ops: the op's fallback, and its fake."""
    return linear(F.silu(gate) * up, weight, bias)


silu_mul_linear = define_op("silu_mul_linear(Tensor gate, Tensor up, Tensor weight, Tensor? bias=None) -> Tensor",
                            _silu_mul_linear, _gated_composed)
"""``fullgraph::silu_mul_linear``: ``fullgraph::linear(F.silu(gate) * up, weight, bias)``, SiLU-mul
in the GEMV's prologue where the GEMV runs (:func:`_silu_mul_linear`). The ``fuse_silu_linear``
pass puts it in."""


# SiLU-mul after the gated MLP's merged gate_up projection, in the GEMV's epilogue: at batch 1 Inductor
# runs ``silu(gate) * up`` as a kernel of its own between the gate_up and down GEMVs; here the program
# that sums gate's row f sums up's row f too and writes SiLU-mul of the two, so down follows gate_up.
def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  pdl: bool | None = None, tiles: Tiles | None = None) -> torch.Tensor:
    """``F.silu(gate) * up`` with ``gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)`` for one
    row, in one launch of the GEMV kernel, rounded where eager's three ops round.

    ``weight [2F, K]``: gate's rows, then up's (a merged gate_up projection). Shapes and ``pdl`` as
    :func:`gemv`; ``tiles`` defaults to :func:`default_tiles` of the weight, and a program's rows
    (``block_n``, half of them gate's) must be even. Example::

        h = gemv_silu_mul(x, gate_up.weight)  # x [1, 1536], weight [17920, 1536] -> h [1, 8960]
    """
    require_triton("gemv_silu_mul")
    n, k = weight.shape
    _check_row(x, weight, bias)
    tiles = tiles or default_tiles(n, k)
    if n % 2 or tiles.block_n % 2:
        raise ValueError(f"gemv_silu_mul needs an even number of weight rows (gate's, then up's) and of rows a "
                         f"program owns; got weight {tuple(weight.shape)} and {tiles}")
    out = torch.empty((*x.shape[:-1], n // 2), dtype=x.dtype, device=x.device)
    _launch(x.reshape(k).contiguous(), weight, bias, out, pdl_enabled(x.device) if pdl is None else pdl,
            tiles=tiles, paired=True)
    return out


def _linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU-mul of ``linear(x, weight, bias)``'s halves: one row on the GEMV with SiLU-mul in its
    epilogue; other rows ``fullgraph::linear`` then :func:`silu_mul_rows` (CUDA, 16-bit) or eager's
    ops (CPU; fp32, which keeps eager's numerics)."""
    if uses_gemv(x, weight, bias) and weight.shape[0] % 2 == 0:
        return gemv_silu_mul(x, weight, bias)
    gate, up = linear(x, weight, bias).chunk(2, dim=-1)
    return silu_mul_rows(gate, up) if _gated_kernels_take(gate, up) else F.silu(gate) * up


linear_silu_mul = define_op("linear_silu_mul(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor", _linear_silu_mul,
                            lambda x, weight, bias=None: x.new_empty((*x.shape[:-1], weight.shape[0] // 2)))
"""``fullgraph::linear_silu_mul``: ``F.silu(gate) * up`` of ``fullgraph::linear(x, weight, bias)``'s
two halves, SiLU-mul in the GEMV's epilogue where the GEMV runs (:func:`_linear_silu_mul`). The
``fuse_silu_epilogue`` pass puts it in."""

# the ops that may launch the GEMV or the few-row kernel, each on the row(s) of its first input
GEMV_OPS = (linear, rms_norm_linear, add_rms_norm_linear, silu_mul_linear, linear_silu_mul)


def may_launch_linear_kernel(graph: torch.fx.Graph) -> bool:
    """Whether a node of ``graph`` may run our GEMV or few-row kernel: one of :data:`GEMV_OPS` whose
    16-bit input has 1 to ``few_rows.MAX_ROWS`` rows (as it is at the call), a row count known only
    at the call (a dynamic batch), or no traced value to tell."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in GEMV_OPS:
            continue
        value = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
        if not isinstance(value, torch.Tensor):
            return True
        rows = math.prod(value.shape[:-1])
        if value.dtype in GEMV_DTYPES and (isinstance(rows, torch.SymInt) or 1 <= rows <= max(1, few_rows.MAX_ROWS)):
            return True
    return False

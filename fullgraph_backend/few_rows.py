"""Linears of a few rows (2 to ``MAX_ROWS``) on a Triton tensor-core kernel, split along K.

A decode step at batch 2-16 multiplies a handful of rows by each weight: the weight read is the
whole cost, as at one row (:mod:`fullgraph_backend.gemv`). cuBLAS tiles such products for larger
M and leaves part of the card's bandwidth unused on the narrow projections, which is why a batch-16
step ran no faster under ``backend="fullgraph"`` than under ``mode="reduce-overhead"``: both ran
the same cuBLAS kernels (docs/perf-notes.md, section 41).

Here a program owns ``BLOCK_N`` weight rows and one of ``split_k`` equal ranges of K, and feeds
``tl.dot`` the rows of ``x`` (padded to 16 with masked loads, which fetch nothing) against each
``[BLOCK_N, BLOCK_K]`` weight slice, accumulating in fp32. With ``split_k > 1`` each program
writes its fp32 partial to kept scratch and takes a ticket (an atomic counter per column tile);
the last of a tile's programs to arrive sums every partial in split order, adds the bias and
rounds once, so the result's bits do not depend on arrival order, and no second launch runs (the
split-KV attention kernel's merge, :mod:`fullgraph_backend.attention.triton_paged`). That program
resets the counter, so every launch, replayed or not, finds it at 0.

With PDL the program loads its first weight slice, waits for the kernel before (whose output
``x`` may be), and only then lets the next kernel launch, as the GEMV does; it touches the scratch
only after its wait, when the kernel before (which may use the same scratch) has completed.

Scratch is kept per (device, split count, padded rows, N, column tiles); its first use must not be under CUDA
graph capture (the graph runner warms every graph key up first).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fullgraph_backend.pdl import enabled as pdl_enabled, gdc_launch_dependents, gdc_wait, kernel_flag
from fullgraph_backend.scratch import kept_buffers, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it every linear stays F.linear
    triton = None

# Rows a linear may have to take this kernel, read at each call (tools/bench_decode.py's
# ``+nofewrows`` sets it to 1 for its mode); more rows stay on cuBLAS.
MAX_ROWS = 16
FEW_ROW_DTYPES = (torch.bfloat16, torch.float16)
# Programs a launch aims for, per SM of the device, where its column tiles leave SMs idle: split_k
# grows until the column tiles times the splits reach it (each split keeps at least one K slice).
# Column tiles that give every SM one already stay in one K range: Llama-3.2-1B's gate_up (256 tiles
# on 132 SMs) took two and ran 22.2 us at 16 rows against 18.6 in one (cuBLAS 18.8; docs/perf-notes.md,
# section 44).
PROGRAMS_PER_SM = 2


class FewRowTiles(NamedTuple):
    """A launch's tiling: weight rows a program owns, K slice width, warps, pipeline stages, and
    the number of K ranges (``split_k``; 0: chosen from the device's SM count, :func:`split_for`)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 0


# Tilings by weight shape, the fastest of 14 per projection of Qwen2.5-1.5B at 2 and 16 rows on the
# H200 (tools/bench_gemv.py --few-rows, with PDL; docs/perf-notes.md, section 41), us a call against
# cuBLAS at 16 rows: K <= LONG_K and N <= NARROW_N (qkv, o_proj): one K range, 4.90 / 4.22 against
# 5.92 / 5.33; wider N (gate_up, the LM head): 64-row tiles, 17.8 / 114.8 against 17.7 / 117.5;
# K > LONG_K (down): 128-wide slices, K split by the SM count (6 ranges), 10.8 against 12.1.
# WIDE_TILES has 3 stages, not 4 (section 42): at 4 an SM's shared memory holds two programs, so
# gate_up's 280 column tiles ran as 264 and a second wave of 16; at 3 they fit three an SM, one wave:
# 16.3 against 17.7 us at 16 rows.
NARROW_TILES = FewRowTiles(block_n=32, block_k=256, num_warps=4, num_stages=4, split_k=1)
WIDE_TILES = FewRowTiles(block_n=64, block_k=128, num_warps=4, num_stages=3)
LONG_K_TILES = FewRowTiles(block_n=32, block_k=128, num_warps=4, num_stages=4)
NARROW_N = 4096
LONG_K = 4096
# At 64 rows every tiling lost to cuBLAS (0.84-0.98x); 32 rows were not measured.


def triton_jit(fn):
    """``triton.jit(fn)`` where Triton is installed, else ``fn`` as it is, so that a kernel module
    imports without Triton (its wrappers then raise :func:`require_triton`'s error)."""
    return triton.jit(fn) if triton is not None else fn


def require_triton(caller: str) -> None:
    """The error of a kernel wrapper called without Triton installed, naming the wrapper and the fix."""
    if triton is None:
        raise RuntimeError(f"{caller} needs triton, which is not installed: pip install 'fullgraph[triton]'")


@triton_jit
def weight_slice(w, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` weight tile of rows ``offs_n`` from column ``k0``, zero from ``k_hi``
    (this kernel's and the GEMV's; row offsets in int64, so weights past 2**31 elements address right)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :],
                   mask=n_ok[:, None] & (offs_k < k_hi)[None, :], other=0.0)


@triton_jit
def _fold_slice(acc, weight, x, offs_m, m_ok, stride_xm, k0, k_hi, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc`` plus the rows' slice from column ``k0`` times a loaded weight slice, transposed.
    ``DOT_FP32``: both in fp32 first (exact for 16-bit values), for Triton's CPU interpreter, which
    multiplies bf16 tiles as their raw bits."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    rows = tl.load(x + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & (offs_k < k_hi)[None, :],
                   other=0.0)
    if DOT_FP32:
        return tl.dot(rows.to(tl.float32), tl.trans(weight.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(rows, tl.trans(weight), acc)


@triton_jit
def _store_rows(out, result, bias, offs_m, offs_n, m_ok, n_ok, N, HAS_BIAS: tl.constexpr):
    """``result (+ bias)`` rounded once to ``out``'s dtype, into the ``[M, N]`` output."""
    if HAS_BIAS:
        result += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + offs_m[:, None] * N + offs_n[None, :], result.to(out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton_jit
def _few_rows_kernel(x, w, bias, out, partial, tickets, M, N, K, k_per_split, splits, stride_xm, stride_wn,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     MERGE: tl.constexpr, PDL: tl.constexpr, DOT_FP32: tl.constexpr):
    """Program ``(tile, split)``: columns ``tile*BLOCK_N ...`` of ``x @ w.T`` over K range ``split``
    of ``splits`` (``k_per_split`` wide, a multiple of ``BLOCK_K``). ``MERGE`` (more than one range):
    partials, tickets and the last program's sum, as the module docstring says."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = k_lo
    if PDL:
        w0 = weight_slice(w, offs_n, n_ok, stride_wn, k_lo, k_hi, BLOCK_K)
        gdc_wait()
        gdc_launch_dependents()
        acc = _fold_slice(acc, w0, x, offs_m, m_ok, stride_xm, k_lo, k_hi, BLOCK_K, DOT_FP32)
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        weight = weight_slice(w, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K)
        acc = _fold_slice(acc, weight, x, offs_m, m_ok, stride_xm, k0, k_hi, BLOCK_K, DOT_FP32)
    if not MERGE:
        _store_rows(out, acc, bias, offs_m, offs_n, m_ok, n_ok, N, HAS_BIAS)
    else:
        cells = offs_m[:, None] * N + offs_n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        tl.store(partial + split * BLOCK_M * N + cells, acc, mask=ok)
        # every thread's partial stores before the ticket; acq_rel publishes them to the last
        # program, which reads them past L1 (.cg), where another program's stores are not coherent
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == splits - 1:
            tl.store(tickets + tile, 0)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(partial + s * BLOCK_M * N + cells, mask=ok, other=0.0, cache_modifier=".cg")
            _store_rows(out, total, bias, offs_m, offs_n, m_ok, n_ok, N, HAS_BIAS)


# Split partials and tickets, keyed by (device, splits, padded rows, N, column tiles); kept for
# the process (fullgraph_backend/scratch.py).
_SCRATCH: dict[tuple, tuple[torch.Tensor, ...]] = {}


def default_tiles(n: int, k: int) -> FewRowTiles:
    """The tiling of a launch over an ``[n, k]`` weight: :data:`LONG_K_TILES` past K = :data:`LONG_K`,
    :data:`NARROW_TILES` up to N = :data:`NARROW_N`, :data:`WIDE_TILES` beyond (as they are at the call)."""
    if k > LONG_K:
        return LONG_K_TILES
    return NARROW_TILES if n <= NARROW_N else WIDE_TILES


def split_for(n: int, k: int, tiles: FewRowTiles, device: torch.device) -> int:
    """The K ranges of a launch: ``tiles.split_k`` if set; else one where the column tiles are at
    least the SMs of ``device`` (:func:`fullgraph_backend.scratch.sm_count`), and where they are fewer the fewest
    that bring the column tiles times the splits to :data:`PROGRAMS_PER_SM` per SM, with at least
    one ``block_k`` slice a range."""
    slices = triton.cdiv(k, tiles.block_k)
    if tiles.split_k:
        return min(tiles.split_k, slices)
    sms = sm_count(device)
    column_tiles = triton.cdiv(n, tiles.block_n)
    if column_tiles >= sms:
        return 1
    return max(1, min(slices, triton.cdiv(PROGRAMS_PER_SM * sms, column_tiles)))


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   pdl: bool | None = None, tiles: FewRowTiles | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 16-bit ``x [..., K]`` of a few rows (any number, but made
    for 2 to :data:`MAX_ROWS`) on the Triton kernel, accumulated in fp32, in ``x``'s dtype.

    ``weight [N, K]`` with unit stride along K; ``bias [N]`` optional. ``pdl`` as
    :func:`fullgraph_backend.gemv.gemv`; ``tiles`` defaults to :func:`default_tiles`. Runs wherever Triton
    does (CPU tensors under ``TRITON_INTERPRET=1``). Example::

        y = few_row_linear(torch.randn(16, 1536, device="cuda", dtype=torch.bfloat16), w)  # w [2048, 1536]
    """
    require_triton("few_row_linear")
    n, k = weight.shape
    if x.dtype not in FEW_ROW_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"few_row_linear takes 16-bit x, weight and bias of one dtype (fp32 would multiply in TF32); "
                         f"got {x.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}: use F.linear")
    if x.shape[-1] != k or weight.stride(1) != 1 or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"few_row_linear needs x [..., {k}], weight [N, K] with unit stride along K and bias "
                         f"[N]; got x {tuple(x.shape)}, weight strides {weight.stride()}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"few_row_linear needs x, weight and bias on one device; got {x.device}, {weight.device}, "
                         f"{None if bias is None else bias.device}")
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tiles = tiles or default_tiles(n, k)
    block_m = max(16, triton.next_power_of_2(m))  # tl.dot's smallest tile
    splits = split_for(n, k, tiles, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.block_k), splits) * tiles.block_k
    splits = triton.cdiv(k, k_per_split)  # no empty range
    n_tiles = triton.cdiv(n, tiles.block_n)
    if splits > 1:
        partial, tickets = kept_buffers(_SCRATCH, (splits, block_m, n, n_tiles), x.device, lambda: (
            torch.empty(splits * block_m * n, dtype=torch.float32, device=x.device),
            torch.zeros(n_tiles, dtype=torch.int32, device=x.device)), "few_row_linear")
    else:  # one range writes the output itself; the scratch pointers are never touched
        partial = tickets = out
    flag = kernel_flag(pdl_enabled(x.device) if pdl is None else pdl, x.device)
    _few_rows_kernel[(n_tiles, splits)](
        rows, weight, bias.contiguous() if bias is not None else weight, out, partial, tickets, m, n, k, k_per_split,
        splits, rows.stride(0), weight.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, MERGE=splits > 1, PDL=flag, DOT_FP32=not x.is_cuda, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, launch_pdl=flag and x.is_cuda)
    return out


def kernel_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether our linear kernels (this one and the GEMV) take these operands, whatever the rows:
    Triton installed, CUDA, 16-bit ``x``, a 2-D weight (and bias, if any) in x's dtype with unit
    stride along K. fp32 stays on cuBLAS, so float32 runs keep eager's products."""
    return (triton is not None and x.is_cuda and x.dtype in FEW_ROW_DTYPES and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.stride(1) == 1 and (bias is None or bias.dtype == x.dtype))


def uses_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether a linear of ``x`` takes this kernel: :func:`kernel_operands`, and 2 to :data:`MAX_ROWS`
    rows (as it is at the call)."""
    k = weight.shape[-1]
    rows = x.numel() // k if x.shape[-1] == k and k else 0
    return 2 <= rows <= MAX_ROWS and kernel_operands(x, weight, bias)

"""A decoder layer's MLP block at one row as ONE persistent launch, against the library's chain.

Issue 15's last lead is a persistent per-layer kernel. This is its first piece, measured before it
is built into the flow: ``out = h + down(silu(gate(n)) * up(n))`` with ``h = x + res`` and
``n = rms_norm(h) * norm_w`` (Qwen2.5-1.5B: H = 1536, I = 8960), bf16, one row.

Phase 1, program p: the RMSNorm (every program, from L2), its ``cols`` gate and up rows over K as
tensor-core products with the row as an operand's first column (so the weight tiles stream through
Triton's cp.async stages), SiLU-mul, written to an I-wide buffer. A grid barrier: one counter, each
program adds 1 and spins until the counter reaches the next multiple of the grid (no reset between
launches, which must not overlap: one stream, no PDL), with a short ``nanosleep`` between polls.
Phase 2, programs 0..H/rows: the down projection row-wise as the GEMV walks it, the first weight slice
loaded before the barrier's wait, the residual add in the epilogue. Every program must be resident
at once (:func:`check_resident` refuses a launch that would spin forever). ``phases=(1, 2)`` runs the
phases as two launches, with no barrier: Triton's interpreter runs a grid's programs one after
another (the CPU tests), and the GPU run times the barrier against a launch boundary.

The chain it is measured against is what the default step runs at one row: Inductor's add + RMSNorm,
the GEMV (``fullgraph_backend.gemv``, with PDL), Inductor's SiLU-mul, the GEMV for down. Both run 8
blocks of distinct weights (656 MB, past L2) in one CUDA graph after an L2-clearing read
(``graph_timing``); the result is a block's share. docs/perf-notes.md, section 46.

Measured further in session 25 (perf-notes section 47): a barrier-free form of the block swapped into
every layer of the step (branch ``persistent-mlp-op``) ran the batch-1 step 4% slower: the four
kernels cost 26.4 us a layer in the step against 30.1 here. A harness number is not a step number.

Usage (GPU): python tools/bench_persistent_mlp.py --out persistent_mlp.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fullgraph_backend.few_rows import triton_jit  # noqa: E402
from fullgraph_backend.gemv import _inv_rms, _normed, _rounded, _summed_slice, gemv, rms_norm  # noqa: E402
from fullgraph_backend.scratch import sm_count  # noqa: E402

try:
    import triton.language as tl
except ImportError:  # the tests skip without triton
    tl = None

HIDDEN, INTERMEDIATE, EPS, BLOCKS = 1536, 8960, 1e-6, 8


class MlpTiles(NamedTuple):
    """A launch's tiling: intermediate columns a program owns in phase 1 and its K slice; output rows a
    program owns in phase 2 and its K slice; warps; pipeline stages; nanoseconds between barrier polls."""

    cols: int = 32
    block_k: int = 128
    rows: int = 4
    down_k: int = 2048
    num_warps: int = 4
    num_stages: int = 3
    nap_ns: int = 100


@triton_jit
def _nap(ns):
    """Sleep about ``ns`` nanoseconds: the barrier's pollers leave L2 to the programs still loading."""
    return tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r", [ns], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton_jit
def _column(v, dtype: tl.constexpr):
    """``v`` ([n], fp32) as the first column of an [n, 16] tile of ``dtype``, zeros elsewhere: tl.dot's
    smallest operand, so a vector product runs on the tensor-core path and its weight tiles pipeline."""
    c = tl.arange(0, 16)
    return tl.where(c[None, :] == 0, v[:, None], 0.0).to(dtype)


@triton_jit
def _first(acc):
    """The first column of a [n, 16] product, as [n]."""
    c = tl.arange(0, 16)
    return tl.sum(tl.where(c[None, :] == 0, acc, 0.0), 1)


@triton_jit
def _grid_barrier(counter, nprog, NAP: tl.constexpr):
    """Wait until every program of the launch has arrived. The counter only grows: a launch's arrivals
    are one block of ``nprog`` increments, so the target is the next multiple (int32: 2**31 arrivals).
    One thread of the program does the atomics: a CTA barrier before the release puts every warp's
    stores before it, and one after the acquire keeps every warp's loads after it."""
    tl.debug_barrier()
    old = tl.atomic_add(counter, 1, sem="release", scope="gpu")
    target = (old // nprog + 1) * nprog
    seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while seen < target:
        if NAP > 0:
            _nap(tl.full((), NAP, tl.int32))
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton_jit
def _normed_slice(x, res, norm_w, offs, rstd, H: tl.constexpr):
    """RMSNorm of ``x + res`` over one slice, rounded where eager rounds: the GEMV's norm prologue."""
    ok = offs < H
    return _normed(_summed_slice(x, res, offs, ok, True), norm_w, offs, ok, rstd, x.dtype.element_ty)


@triton_jit
def _mlp_block_kernel(x, res, norm_w, w_gate_up, w_down, gated, counter, out, eps, H: tl.constexpr, I: tl.constexpr,
                      COLS: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, DOWN_K: tl.constexpr,
                      PHASES: tl.constexpr, NAP: tl.constexpr):
    """PHASES 1: gate/up and SiLU-mul into ``gated``; 2: down + residual into ``out``; 3: both, with the
    grid barrier between them (the module docstring)."""
    pid = tl.program_id(0)
    dtype: tl.constexpr = x.dtype.element_ty
    if PHASES & 1:
        if pid * COLS < I:
            cols = pid * COLS + tl.arange(0, COLS)
            kk = tl.arange(0, BLOCK_K)
            # the first weight tiles go out before the norm's reads: they depend on nothing
            gate_first = tl.load(w_gate_up + cols[:, None] * H + kk[None, :])
            up_first = tl.load(w_gate_up + (I + cols)[:, None] * H + kk[None, :])
            rstd = _inv_rms(x, res, out, H, eps, 0, True, BLOCK_K)  # stores none of x + res (0 features)
            row = _column(_normed_slice(x, res, norm_w, kk, rstd, H), dtype)
            gate = tl.dot(gate_first, row)
            up = tl.dot(up_first, row)
            for k0 in range(BLOCK_K, H, BLOCK_K):
                # the weight loads first, then the row's slice: phase 1 alone 19.2 us against 21.6 the
                # other way round (H200)
                w_gate = tl.load(w_gate_up + cols[:, None] * H + (k0 + kk)[None, :])
                w_up = tl.load(w_gate_up + (I + cols)[:, None] * H + (k0 + kk)[None, :])
                row = _column(_normed_slice(x, res, norm_w, k0 + kk, rstd, H), dtype)
                gate = tl.dot(w_gate, row, gate)
                up = tl.dot(w_up, row, up)
            g = _rounded(_first(gate), dtype)
            silu = _rounded(g / (1.0 + tl.exp(-g)), dtype)
            tl.store(gated + cols, (silu * _rounded(_first(up), dtype)).to(dtype))
    if pid * ROWS < H:
        rows = pid * ROWS + tl.arange(0, ROWS)
        dk = tl.arange(0, DOWN_K)
        if PHASES & 2:
            first = tl.load(w_down + rows[:, None] * I + dk[None, :], mask=dk[None, :] < I, other=0.0)
        if PHASES == 3:
            _grid_barrier(counter, tl.num_programs(0), NAP)
        if PHASES & 2:
            a = tl.load(gated + dk, mask=dk < I, other=0.0, cache_modifier=".cg")
            acc = first.to(tl.float32) * a.to(tl.float32)[None, :]
            for k0 in range(DOWN_K, I, DOWN_K):
                ok = (k0 + dk) < I
                w = tl.load(w_down + rows[:, None] * I + (k0 + dk)[None, :], mask=ok[None, :], other=0.0)
                a = tl.load(gated + k0 + dk, mask=ok, other=0.0, cache_modifier=".cg")
                acc += w.to(tl.float32) * a.to(tl.float32)[None, :]
            h = _summed_slice(x, res, rows, rows < H, True)
            tl.store(out + rows, (h + _rounded(tl.sum(acc, 1), dtype)).to(dtype))
    elif PHASES == 3:
        _grid_barrier(counter, tl.num_programs(0), NAP)


def scratch(intermediate: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated activations' buffer and the barrier's counter, kept across launches."""
    return torch.empty(intermediate, dtype=dtype, device=device), torch.zeros(1, dtype=torch.int32, device=device)


def check_resident(kernel, programs: int, num_warps: int, device: torch.device) -> None:
    """Refuse a grid barrier over more programs than the GPU holds at once (they would spin forever)."""
    kernel._init_handles()
    props = torch.cuda.get_device_properties(device)
    per_sm = min(props.shared_memory_per_multiprocessor // max(kernel.metadata.shared, 1),
                 65536 // max(kernel.n_regs * 32 * num_warps, 1), 64 // num_warps)
    if programs > per_sm * sm_count(device):
        raise RuntimeError(f"{programs} programs, {per_sm} an SM (shared memory {kernel.metadata.shared} B, "
                           f"{kernel.n_regs} registers): not all resident, the barrier would not return")


def mlp_block(x: torch.Tensor, res: torch.Tensor, norm_w: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              buffers: tuple[torch.Tensor, torch.Tensor], tiles: MlpTiles = MlpTiles(),
              phases: tuple[int, ...] = (3,)) -> torch.Tensor:
    """``x + res + down(silu(gate) * up)`` of ``rms_norm(x + res) * norm_w`` for one row, in one launch
    (``phases=(3,)``) or one per phase (``(1, 2)``); ``w_gate_up`` is gate's rows then up's."""
    hidden, intermediate = w_down.shape
    if x.shape != (1, hidden) or intermediate % tiles.cols or hidden % tiles.rows:
        raise ValueError(f"one row of {hidden} and tiles that divide I = {intermediate} and H = {hidden}; got "
                         f"x {tuple(x.shape)}, {tiles}")
    programs = max(intermediate // tiles.cols, hidden // tiles.rows)
    out = torch.empty_like(x)
    args = (x, res, norm_w, w_gate_up, w_down, *buffers, out, EPS)
    meta = dict(H=hidden, I=intermediate, COLS=tiles.cols, BLOCK_K=tiles.block_k, ROWS=tiles.rows,
                DOWN_K=tiles.down_k, NAP=tiles.nap_ns, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if 3 in phases:
        check_resident(_mlp_block_kernel.warmup(*args, PHASES=3, grid=(programs,), **meta), programs,
                       tiles.num_warps, x.device)
    for phase in phases:
        _mlp_block_kernel[(programs,)](*args, PHASES=phase, **meta)
    return out


def _add_norm(x, res, norm_w):
    """``(rms_norm(x + res) * norm_w, x + res)``: the decoder's residual add and RMSNorm, in eager ops."""
    h = x + res
    return rms_norm(h, norm_w, EPS), h


def reference(x, res, norm_w, w_gate_up, w_down):
    """The block in eager PyTorch, rounding as the decoder's modules do."""
    normed, h = _add_norm(x, res, norm_w)
    gate, up = F.linear(normed, w_gate_up).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, w_down)


def block_weights(hidden: int, intermediate: int, device, dtype=torch.bfloat16, seed: int = 0):
    """(norm weight, gate_up weight, down weight) at a linear layer's usual scale."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return (draw(hidden) * 0.1 + 1, draw(2 * intermediate, hidden) * hidden ** -0.5,
            draw(hidden, intermediate) * intermediate ** -0.5)


def library_chain(weights, x0, zeros, pdl: bool):
    """The default step's kernels for the blocks: Inductor add + RMSNorm, GEMV, Inductor SiLU-mul, GEMV."""
    intermediate = weights[0][2].shape[1]
    norm = torch.compile(_add_norm)
    silu_mul = torch.compile(lambda gu: F.silu(gu[:, :intermediate]) * gu[:, intermediate:])

    def run():
        x, res = x0, zeros
        for norm_w, w_gate_up, w_down in weights:
            normed, h = norm(x, res, norm_w)
            x, res = gemv(silu_mul(gemv(normed, w_gate_up, pdl=pdl)), w_down, pdl=pdl), h
        return x + res
    return run


# name: (mlp_block's keywords, the share of the block's weights the variant reads, for its floor)
VARIANTS = {
    "persistent, one launch": (dict(), 1),
    "persistent, one launch, down_k 1024": (dict(tiles=MlpTiles(down_k=1024)), 1),
    "persistent, one launch, rows 8, down_k 1024": (dict(tiles=MlpTiles(rows=8, down_k=1024)), 1),
    "persistent, one launch, no nap": (dict(tiles=MlpTiles(nap_ns=0)), 1),
    "persistent, two launches (no barrier)": (dict(phases=(1, 2)), 1),
    "persistent, phase 1 alone (gate/up, SiLU-mul)": (dict(phases=(1,)), 2 / 3),
    "persistent, phase 2 alone (down)": (dict(phases=(2,)), 1 / 3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="persistent_mlp.json")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    from bench_decode import copy_bandwidth  # tools/ is on the path when run as a script
    from graph_timing import capture, replay_us

    device = torch.device("cuda")
    weights = [block_weights(HIDDEN, INTERMEDIATE, device, seed=i) for i in range(BLOCKS)]
    x0 = torch.randn(1, HIDDEN, device=device, dtype=torch.bfloat16)
    res0 = torch.randn(1, HIDDEN, device=device, dtype=torch.bfloat16)
    zeros = torch.zeros_like(x0)
    one = mlp_block(x0, res0, *weights[0], scratch(INTERMEDIATE, x0.dtype, device))
    two = mlp_block(x0, res0, *weights[0], scratch(INTERMEDIATE, x0.dtype, device), phases=(1, 2))
    expected = reference(x0, res0, *weights[0])
    check = dict(one_launch_equals_two=bool(torch.equal(one, two)),
                 max_abs_error_vs_eager=(one.float() - expected.float()).abs().max().item(),
                 eager_max_abs=expected.float().abs().max().item())
    print("check:", check, flush=True)

    def persistent(**kw):
        buffers = scratch(INTERMEDIATE, x0.dtype, device)

        def run():
            x = x0
            for w in weights:
                x = mlp_block(x, zeros, *w, buffers, **kw)
            return x
        return run

    runs = {"library chain, GEMVs without PDL": (library_chain(weights, x0, zeros, False), 1),
            "library chain (the default step's kernels, GEMVs with PDL)": (library_chain(weights, x0, zeros, True), 1),
            **{name: (persistent(**kw), share) for name, (kw, share) in VARIANTS.items()}}
    bandwidth = copy_bandwidth()  # the floor's, measured in this run as bench_decode's is
    floor = 3 * HIDDEN * INTERMEDIATE * 2 / bandwidth * 1e6
    rows = []
    for name, (run, share) in runs.items():
        try:
            graph = capture(run)
            rounds = [replay_us(graph, args.iters, "read") / BLOCKS for _ in range(3)]
            rows.append(dict(variant=name, us_a_block=round(statistics.median(rounds), 2),
                             rounds=[round(r, 2) for r in rounds], floor_us=round(floor * share, 2)))
        except RuntimeError as error:
            rows.append(dict(variant=name, error=str(error)[:300]))
        print(rows[-1], flush=True)
    result = dict(kind="persistent_mlp", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=datetime.date.today().isoformat(), shapes=f"H {HIDDEN}, I {INTERMEDIATE}, bf16, one row",
                  blocks=BLOCKS, copy_bandwidth_TBs=round(bandwidth / 1e12, 3), floor_us_a_block=round(floor, 2),
                  default_tiles=MlpTiles()._asdict(), check=check, rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| variant | us a block | floor | x floor |\n|---|---|---|---|")
    for row in rows:
        if "us_a_block" in row:
            print(f"| {row['variant']} | {row['us_a_block']:.2f} | {row['floor_us']:.2f} | "
                  f"{row['us_a_block'] / row['floor_us']:.2f}x |")


if __name__ == "__main__":
    main()

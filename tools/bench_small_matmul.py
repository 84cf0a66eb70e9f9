"""A negative result kept reproducible: a Triton small-M matmul against cuBLAS for decode projections.

Batch-1 decode spends 2x the HBM floor, much of it in Qwen2.5-1.5B's projections at 1-2 TB/s under
cuBLAS (perf-notes.md, section 3). This sweeps a plain Triton kernel for ``y = x @ W^T`` with a
16-row tile, optional split-K (fp32 atomics) and a few tile shapes, against ``torch.mm``, both as
CUDA-graph replays after a 256 MiB memset, for the qkv / o_proj / gate_up / down shapes at M rows.
On the H100 (2026-11-26) the best Triton variant was within 5% of cuBLAS everywhere (perf-notes.md,
section 7), so the package does not use it.

Usage (GPU): python tools/bench_small_matmul.py [M list, default 1,2,4,8] [time budget s, default 150]
"""
import itertools
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_timing import capture, replay_us  # noqa: E402


@triton.jit
def _small_mm(x, w, y, M, N, K, stride_xm, stride_wn, stride_ym,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_per, K), BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk[None, :] < K
        a = tl.load(x + offs_m[:, None] * stride_xm + kk[None, :], mask=(offs_m[:, None] < M) & k_ok, other=0.0)
        b = tl.load(w + offs_n[:, None] * stride_wn + kk[None, :], mask=(offs_n[:, None] < N) & k_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = y + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


def small_mm(x, w, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages):
    """``x @ w.T`` by ``_small_mm``; split-K accumulates in float32 and casts back."""
    M, K = x.shape
    N = w.shape[0]
    if SPLIT_K == 1:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    _small_mm[(triton.cdiv(N, BLOCK_N), SPLIT_K)](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                                  BLOCK_M=16, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=SPLIT_K,
                                                  num_warps=num_warps, num_stages=num_stages)
    return y if SPLIT_K == 1 else y.to(x.dtype)


def main():
    shapes = {"qkv": (2048, 1536), "o_proj": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)}
    ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
    budget_s = float(sys.argv[2]) if len(sys.argv) > 2 else 150
    t0 = time.time()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__}), flush=True)
    results = {}
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x @ w.t()
            base = replay_us(capture(lambda: torch.mm(x, w.t())), 60, "write")
            best = None
            for bn, bk, sk, nw, ns in itertools.product((16, 32, 64), (128, 256, 512), (1, 2, 4, 8), (4,), (3, 4)):
                if time.time() - t0 > budget_s:
                    break
                if sk > 1 and triton.cdiv(N, bn) * sk > 1024:
                    continue
                try:
                    out = small_mm(x, w, bn, bk, sk, nw, ns)
                    err = (out.float() - ref.float()).abs().max().item()
                    if err > 0.05:
                        print("bad", name, M, bn, bk, sk, err); continue
                    t = replay_us(capture(lambda: small_mm(x, w, bn, bk, sk, nw, ns)), 60, "write")
                except Exception as e:  # e.g. out of shared memory: skip the variant
                    print("fail", name, M, bn, bk, sk, nw, ns, repr(e)[:100]); continue
                if best is None or t < best[0]:
                    best = (t, dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw, num_stages=ns))
            gb = N * K * 2 / 1e9
            results[f"{name} M={M}"] = dict(cublas_us=round(base, 2), cublas_TBs=round(gb / base * 1e3, 2),
                                            triton_us=round(best[0], 2) if best else None,
                                            triton_TBs=round(gb / best[0] * 1e3, 2) if best else None,
                                            config=best[1] if best else None)
            print(name, M, json.dumps(results[f"{name} M={M}"]), flush=True)


if __name__ == "__main__":
    main()

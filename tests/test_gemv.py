"""The one-row GEMV behind ``fullgraph::linear`` (CPU: Triton's interpreter) and the op's dispatch rule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from fullgraph_backend import gemv as gemv_module
from fullgraph_backend.gemv import (add_rms_norm_linear, gemv, gemv_silu_mul, linear, linear_silu_mul, rms_norm,
                                    rms_norm_gemv, rms_norm_linear, rms_norm_rows, silu_mul_gemv, silu_mul_linear,
                                    silu_mul_rows, uses_gemv)

from helpers import SM90_PDL_PRELUDE, run_compiler_script


@pytest.mark.parametrize("n, k", [(37, 1000), (4, 512), (130, 1536), (9, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_matches_linear_in_fp32(n, k, with_bias):
    torch.manual_seed(n * k)
    x, weight = torch.randn(1, k), torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    torch.testing.assert_close(gemv(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n, k", [(37, 1000), (9, 7), (130, 1536), (8, 512), (6, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_pdl_path_gives_the_same_bits(n, k, dtype):
    """pdl=True runs the kernel's PDL path (the first weight slice loaded before the wait; on CPU
    the wait is a no-op): the same sums in the same order, so the same bits; K at, below and off
    the 512-wide slice, and past three slices."""
    torch.manual_seed(k)
    x, weight, bias = torch.randn(1, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    plain = gemv(x, weight, bias, pdl=False)
    assert torch.equal(gemv(x, weight, bias, pdl=True), plain)
    torch.testing.assert_close(plain.float(), F.linear(x.float(), weight.float(), bias.float()), atol=1e-4, rtol=1e-2)


def _record_launches(monkeypatch, what) -> list:
    """Patch the GEMV kernel's launch so each one first appends ``what(args, kwargs)`` of its call to the
    returned list (which tiling, which prologue or epilogue), then launches as it would."""
    seen = []
    real = gemv_module._launch
    monkeypatch.setattr(gemv_module, "_launch", lambda *args, **kw: seen.append(what(args, kw)) or real(*args, **kw))
    return seen

def test_gemv_past_long_k_takes_the_long_tiling_and_any_tiling_gives_the_linear(monkeypatch):
    """K past LONG_K (the down projection's 8960) launches with LONG_K_TILES' 1024-wide slices; a
    tiling given explicitly is used instead; every one computes F.linear."""
    tilings = _record_launches(monkeypatch, lambda args, kw: kw["tiles"])
    torch.manual_seed(0)
    for k in (gemv_module.LONG_K, gemv_module.LONG_K + 1000):
        x, weight = torch.randn(1, k), torch.randn(12, k)
        torch.testing.assert_close(gemv(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    tiles = gemv_module.Tiles(2, 256, 4, 2)
    torch.testing.assert_close(gemv(x, weight, tiles=tiles), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    assert tilings == [gemv_module.TILES, gemv_module.LONG_K_TILES, tiles]


def test_short_rows_of_narrow_outputs_take_one_slice_where_short_n_allows(monkeypatch):
    """A row that fits SHORT_TILES' one slice, with N up to SHORT_N, launches with it, SHORT_N read at
    the call (``+noshorttiles`` of tools/bench_decode.py sets it to 0); a wider N or a longer row does
    not. Each computes F.linear, K off the slice's width."""
    tilings = _record_launches(monkeypatch, lambda args, kw: kw["tiles"])
    torch.manual_seed(1)
    width = gemv_module.SHORT_TILES.block_k
    shapes = ((12, 1000), (12, width), (40, 1000), (12, width + 1))
    for short_n in (0, 16):
        monkeypatch.setattr(gemv_module, "SHORT_N", short_n)
        for n, k in shapes:
            x, weight = torch.randn(1, k), torch.randn(n, k)
            torch.testing.assert_close(gemv(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)
    short, plain = gemv_module.SHORT_TILES, gemv_module.TILES
    assert tilings == [plain] * 4 + [short, short, plain, plain]


def test_long_k_takes_the_gemv_with_pdl_only_and_the_rule_reads_max_k_at_the_call(monkeypatch):
    """The down projection (K = 8960) takes the GEMV where its launch takes PDL, cuBLAS elsewhere (the
    GEMV lost without PDL); tools/bench_decode.py's ``+cublasdown`` lowers MAX_K to LONG_K for a mode,
    so the rule must read it at the call. K = 1536 takes the GEMV either way."""
    pdl = [False]
    monkeypatch.setattr(gemv_module, "pdl_enabled", lambda device: pdl[0])
    with FakeTensorMode():
        x, weight, short = _fake_cuda(1, 8960), _fake_cuda(1536, 8960), _fake_cuda(2048, 1536)
        assert not uses_gemv(x, weight)
        assert uses_gemv(_fake_cuda(1, 1536), short)
        pdl[0] = True
        assert uses_gemv(x, weight)
        monkeypatch.setattr(gemv_module, "MAX_K", gemv_module.LONG_K)
        assert not uses_gemv(x, weight)
        assert uses_gemv(_fake_cuda(1, 1536), short)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 1100), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gemv_matches_linear_on_random_shapes(n, k, with_bias, seed):
    """Shapes off every tile boundary: N not a multiple of the 4-row block, K of the 512-wide slice."""
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(1, k, generator=gen), torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    torch.testing.assert_close(gemv(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_16_bit_accumulates_in_fp32(dtype):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 1, 1536, dtype=dtype), torch.randn(70, 1536, dtype=dtype), torch.randn(70, dtype=dtype)
    out = gemv(x, weight, bias)
    assert out.shape == (1, 1, 70) and out.dtype == dtype
    exact = F.linear(x.double(), weight.double(), bias.double())
    # one rounding of the fp32 sum to 16 bits: within half an ulp of the output's magnitude
    torch.testing.assert_close(out.double(), exact, atol=0, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)


def test_gemv_reads_a_strided_weight_view():
    weight = torch.randn(64, 300)[::2]  # row stride 600, unit stride along K
    x = torch.randn(1, 300)
    torch.testing.assert_close(gemv(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)


def test_gemv_reads_a_strided_bias_view():
    weight, x = torch.randn(32, 300), torch.randn(1, 300)
    bias = torch.randn(64)[::2]  # stride 2: read as if contiguous, every other entry would be wrong
    torch.testing.assert_close(gemv(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)


def test_gemv_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="one row of 8 features"):
        gemv(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="unit stride along K"):
        gemv(torch.randn(1, 8), torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 8), torch.randn(4, 8), torch.randn(5))


def _fake_cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_dispatch_rule_takes_one_row_16_bit_cuda_within_the_measured_bounds(monkeypatch):
    k = gemv_module.MAX_K
    monkeypatch.setattr(gemv_module, "pdl_enabled", lambda device: True)  # K past LONG_K needs PDL (above)
    with FakeTensorMode():
        weight = _fake_cuda(2048, 1536)
        assert uses_gemv(_fake_cuda(1, 1536), weight)
        assert uses_gemv(_fake_cuda(1, 1, 1536), weight)
        assert not uses_gemv(_fake_cuda(2, 1536), weight)  # two rows: cuBLAS was faster
        assert not uses_gemv(_fake_cuda(1, 1536, dtype=torch.float32), _fake_cuda(2048, 1536, dtype=torch.float32))
        assert uses_gemv(_fake_cuda(1, k), _fake_cuda(16, k))
        assert uses_gemv(_fake_cuda(1, 1536), _fake_cuda(151936, 1536))  # an LM head
        assert not uses_gemv(_fake_cuda(1, k + 1), _fake_cuda(16, k + 1))  # past the longest K measured
        assert not uses_gemv(_fake_cuda(1, 64), _fake_cuda(64, 64).t())  # no unit stride along K
        assert uses_gemv(_fake_cuda(1, 1536), weight, _fake_cuda(2048))
        assert not uses_gemv(_fake_cuda(1, 1536), weight, _fake_cuda(2048, dtype=torch.float32))  # F.linear decides
        assert linear(_fake_cuda(1, 1, 1536), weight).shape == (1, 1, 2048)  # the fake
    assert not uses_gemv(torch.randn(1, 8), torch.randn(4, 8))  # CPU


def test_op_equals_linear_where_it_falls_back():
    x, weight, bias = torch.randn(3, 5, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_without_triton_the_backend_imports_and_every_linear_stays_on_cublas():
    """triton is optional: block its import in a fresh interpreter."""
    import subprocess
    import sys

    script = """
import sys
sys.modules["triton"] = None
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import fullgraph_backend.backend
from fullgraph_backend.gemv import gemv, uses_gemv
with FakeTensorMode():
    x = torch.empty(1, 64, dtype=torch.bfloat16, device="cuda")
    assert not uses_gemv(x, torch.empty(32, 64, dtype=torch.bfloat16, device="cuda"))
try:
    gemv(torch.randn(1, 8), torch.randn(4, 8))
except RuntimeError as error:
    assert "needs triton" in str(error)
    print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


_SM90_SCRIPT = SM90_PDL_PRELUDE + r'''
from fullgraph_backend.gemv import (LONG_K_TILES, ROWS_BLOCK_K, SHORT_TILES, SILU_MUL_BLOCK_K, SILU_MUL_TILES, TILES,
                                   _gemv_kernel as fn)
from fullgraph_backend.gemv import _rms_norm_rows_kernel, _silu_mul_rows_kernel

types = dict(x="*bf16", w="*bf16", bias="*bf16", out="*bf16", N="i32", K="i32", stride_wn="i32", residual="*bf16",
             norm_w="*bf16", h_out="*bf16", eps="fp32", up="*bf16")
# the plain GEMV in its three tilings, with the RMSNorm of x + residual in its prologue, with SiLU-mul (the down
# projection's), and with SiLU-mul of the product's halves in its epilogue (gate_up's, in the tilings it takes)
for norm, gated, paired, tiles in ((False, False, False, TILES), (False, False, False, LONG_K_TILES),
                                   (False, False, False, SHORT_TILES), (True, False, False, TILES),
                                   (False, True, False, SILU_MUL_TILES), (False, False, True, TILES),
                                   (False, False, True, LONG_K_TILES)):
    flags = dict(HAS_BIAS=False, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, PDL=True, NORM=norm, HAS_RESIDUAL=norm,
                 GATED=gated, PAIRED=paired)
    ptx, wait = pdl_ptx(fn, types, flags, tiles)
    assert "ld.global" in ptx[:wait], ptx
    assert "st.global" not in ptx[:wait], "a store before the wait"
    assert ("ex2" in ptx) == (gated or paired), "exp only where SiLU is computed"
rows = _rms_norm_rows_kernel
types = dict(x="*bf16", residual="*bf16", norm_w="*bf16", normed="*bf16", h_out="*bf16", K="i32", eps="fp32")
for one_pass, block in ((False, ROWS_BLOCK_K), (True, 2048)):
    flags = dict(HAS_RESIDUAL=True, BLOCK_K=block, ONE_PASS=one_pass)
    consts = {(rows.arg_names.index(n),): v for n, v in flags.items()}
    triton.compile(ASTSource(fn=rows, signature={n: types.get(n, "constexpr") for n in rows.arg_names},
                             constexprs=consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=TILES.num_warps))
gated = _silu_mul_rows_kernel
types = dict(gate="*bf16", up="*bf16", out="*bf16", K="i32", stride_gate="i64", stride_up="i64")
ptx, wait = pdl_ptx(gated, types, dict(BLOCK_K=SILU_MUL_BLOCK_K, PDL=True), TILES)
assert "st.global" not in ptx[:wait], "a store before the wait"
print("compiled")
'''


def test_pdl_gemv_compiles_for_sm90_with_weight_loads_before_the_wait_and_the_trigger_after():
    """Triton's real compiler (no GPU needed): the PDL path keeps the first weight slice's loads
    before the wait and lets the next kernel launch only after it, plain (three tilings), with the RMSNorm prologue,
    with SiLU-mul's and with SiLU-mul in the epilogue, and stores nothing before the wait; the norm-only kernel
    compiles too, in one pass and in slices, and the SiLU-mul rows kernel waits before its stores."""
    run_compiler_script(_SM90_SCRIPT)


# ---- the RMSNorm in the GEMV's prologue (fullgraph::rms_norm_linear, fullgraph::add_rms_norm_linear) ----
def _norm_case(n_rows: int, k: int, dtype: torch.dtype, residual: bool, bias: bool, seed: int = 0):
    """A row, a residual, a norm weight near 1 and a projection; the rows of ``weight`` are every
    ``stride``-th of an ``[n_rows, K]`` matrix (a row of the output depends on its own weight row
    only, and Triton's interpreter runs a program at a time: a full gate_up would take minutes)."""
    gen = torch.Generator().manual_seed(seed)
    stride = max(n_rows // 64, 1)
    x = torch.randn(1, k, generator=gen).to(dtype)
    r = torch.randn(1, k, generator=gen).to(dtype) if residual else None
    norm_weight = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype)
    weight = (0.05 * torch.randn(n_rows // stride, k, generator=gen)).to(dtype)
    b = torch.randn(weight.shape[0], generator=gen).to(dtype) if bias else None
    return x, r, norm_weight, weight, b


# qkv (1536 -> 2048, with a bias as Qwen2's), gate_up (1536 -> 17920), the LM head (1536 -> 151936),
# and K off the 512-wide slice
NORM_SHAPES = [(2048, 1536, True), (17920, 1536, False), (151936, 1536, False), (37, 1000, True)]


@pytest.mark.parametrize("n, k, bias", NORM_SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_norm_gemv_in_fp16_gives_eagers_bits(n, k, bias, residual):
    """float16 (whose casts Triton's interpreter rounds as torch does): the fused kernel's output is
    the GEMV of eager's normed row with the fused kernel's tiling (TILES: a plain launch may take
    SHORT_TILES, which sums other slices), bit for bit, and the sum is eager's x + residual, with
    and without PDL."""
    x, r, norm_weight, weight, b = _norm_case(n, k, torch.float16, residual, bias)
    h = x + r if residual else x
    expected = gemv(rms_norm(h, norm_weight, 1e-6), weight, b, tiles=gemv_module.TILES)
    for pdl in (False, True):
        out, total = rms_norm_gemv(x, norm_weight, 1e-6, weight, b, r, pdl=pdl)
        assert torch.equal(out, expected)
        assert torch.equal(total, h) if residual else total is None


@pytest.mark.parametrize("n, k, bias", NORM_SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_norm_gemv_in_bf16_is_eagers_composition_within_bf16_tolerance(n, k, bias, residual):
    """bfloat16 against eager's ops (add, RMSNorm, linear) in bfloat16. Triton's interpreter
    truncates float32 to bfloat16 where a GPU rounds to nearest (the intermediate casts of the
    norm, and the output): within a few bfloat16 ulps."""
    x, r, norm_weight, weight, b = _norm_case(n, k, torch.bfloat16, residual, bias, seed=1)
    h = x + r if residual else x
    out, total = rms_norm_gemv(x, norm_weight, 1e-6, weight, b, r)
    expected = F.linear(rms_norm(h, norm_weight, 1e-6), weight, b)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    if residual:
        torch.testing.assert_close(total, h, atol=0, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1536, 1000, 3000, 9000])
def test_norm_rows_kernel_gives_eagers_bits(dtype, k):
    """The norm where the GEMV does not run (several rows, fp32, long K): one program a row, eager's
    rounding (float16 and float32, which the interpreter casts as torch does); rows up to
    ROWS_ONE_PASS_MAX_K wide in one pass, 9000 in slices."""
    gen = torch.Generator().manual_seed(k)
    x, r = (torch.randn(5, k, generator=gen).to(dtype) for _ in range(2))
    norm_weight = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype)
    normed, h = rms_norm_rows(x, norm_weight, 1e-5, r)
    torch.testing.assert_close(normed, rms_norm(x + r, norm_weight, 1e-5), atol=0, rtol=0 if dtype == torch.float16 else 1e-6)
    assert torch.equal(h, x + r)
    normed, h = rms_norm_rows(x[:1], norm_weight, 1e-5)
    torch.testing.assert_close(normed, rms_norm(x[:1], norm_weight, 1e-5), atol=0, rtol=0 if dtype == torch.float16 else 1e-6)
    assert h is None


def test_norm_ops_equal_eagers_composition_where_they_fall_back():
    """On CPU the ops run eager's own ops: the same bits at every row count and dtype."""
    for dtype, rows in [(torch.float32, 1), (torch.float32, 7), (torch.bfloat16, 1), (torch.bfloat16, 3)]:
        x, r, norm_weight, weight, b = _norm_case(256, 96, dtype, True, True, seed=rows)
        x, r = x.expand(rows, -1) * 1, r.expand(rows, -1) * 1
        h = x + r
        out, total = add_rms_norm_linear(x, r, norm_weight, 1e-6, weight, b)
        assert torch.equal(out, F.linear(rms_norm(h, norm_weight, 1e-6), weight, b)) and torch.equal(total, h)
        assert torch.equal(rms_norm_linear(x, norm_weight, 1e-6, weight), F.linear(rms_norm(x, norm_weight, 1e-6), weight))


def test_norm_ops_fakes_give_the_kernels_shapes():
    with FakeTensorMode():
        x, weight, norm_weight = _fake_cuda(1, 1536), _fake_cuda(2048, 1536), _fake_cuda(1536)
        out, total = add_rms_norm_linear(x, _fake_cuda(1, 1536), norm_weight, 1e-6, weight, _fake_cuda(2048))
        assert out.shape == (1, 2048) and total.shape == (1, 1536) and out.dtype == total.dtype == torch.bfloat16
        assert rms_norm_linear(_fake_cuda(8, 1536), norm_weight, 1e-6, weight).shape == (8, 2048)


@pytest.mark.parametrize("shape", [(1, 1536), (1, 1, 1536), (3, 1536), (1, 3, 1536)])
def test_norm_ops_kernel_paths_on_cpu(monkeypatch, shape):
    """The ops' CUDA dispatch run on CPU under the interpreter (the device checks patched): one row
    takes the fused GEMV, more rows the norm kernel then fullgraph::linear; both return what eager's
    ops do (float16: the interpreter's casts round as torch's), in x's leading shape."""
    monkeypatch.setattr(gemv_module, "_norm_kernels_take", lambda *args: True)
    monkeypatch.setattr(gemv_module, "uses_gemv", lambda x, weight, bias=None: x.numel() == weight.shape[1])
    launches = _record_launches(monkeypatch, lambda args, kw: len(args) > 5)
    x, r, norm_weight, weight, b = _norm_case(2048, shape[-1], torch.float16, True, True, seed=3)
    x, r = x.expand(*shape) * 1, r.expand(*shape) * 1
    h = x + r
    out, total = add_rms_norm_linear(x, r, norm_weight, 1e-6, weight, b)
    assert torch.equal(total, h) and out.shape == (*shape[:-1], weight.shape[0])
    if x.numel() == shape[-1]:  # the GEMV's own sums
        assert launches == [True] and torch.equal(out, gemv(rms_norm(h, norm_weight, 1e-6), weight, b))
    else:  # the norm kernel, then F.linear
        assert torch.equal(out, F.linear(rms_norm(h, norm_weight, 1e-6), weight, b)) and not launches
    assert rms_norm_linear(x, norm_weight, 1e-6, weight).shape == out.shape


# ---- SiLU-mul in the GEMV's prologue (fullgraph::silu_mul_linear) ----
def _gated_case(rows: int, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    """``gate`` and ``up`` as the two halves of one ``[rows, 2K]`` gate_up output (views of stride
    2K, as ``chunk`` gives them), and a down weight."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(rows, 2 * k, generator=gen)).to(dtype)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    return (*gate_up.chunk(2, dim=-1), weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1000, 1024, 2500])
def test_silu_mul_rows_kernel_is_eagers_silu_mul(dtype, k):
    """Strided halves of a gate_up output, several rows and one: eager's ``F.silu(gate) * up``,
    float16 within one rounding (fp32 exp differs from torch's in the last bits), bfloat16 within
    three (the interpreter truncates both of its casts where a GPU rounds)."""
    gate, up, _ = _gated_case(5, k, 8, dtype, seed=k)
    for g, u in ((gate, up), (gate[:1], up[:1])):
        out = silu_mul_rows(g, u)
        assert out.is_contiguous() and out.shape == g.shape
        torch.testing.assert_close(out, F.silu(g) * u, atol=1e-3, rtol=3 * 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)


@pytest.mark.parametrize("n, k", [(37, 1000), (64, 8960), (9, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_silu_mul_gemv_is_the_gemv_of_the_rows_kernels_silu_mul(n, k, bias):
    """One launch with SiLU-mul in the prologue gives the bits of the rows kernel's SiLU-mul then
    the plain GEMV (the same rounding, the same sums in the same order), with and without PDL, and
    eager's composition within bf16 tolerance; K as down's (8960) and off the slice."""
    gate, up, weight = _gated_case(1, k, n, torch.bfloat16, seed=n)
    b = torch.randn(n).to(torch.bfloat16) if bias else None
    expected = gemv(silu_mul_rows(gate, up), weight, b)
    for pdl in (False, True):
        assert torch.equal(silu_mul_gemv(gate, up, weight, b, pdl=pdl), expected)
    torch.testing.assert_close(expected.float(), F.linear(F.silu(gate) * up, weight, b).float(), atol=0.05, rtol=0.02)


def test_silu_mul_gemv_takes_other_tilings_with_the_same_result(monkeypatch):
    """By default it launches with SILU_MUL_TILES, not the plain down's LONG_K_TILES (which made the fused
    step slower); the tiling changes which program sums what, not the products: equal within fp32
    reassociation."""
    tilings = _record_launches(monkeypatch, lambda args, kw: kw["tiles"])
    gate, up, weight = _gated_case(1, 3000, 40, torch.float32, seed=1)
    expected = silu_mul_gemv(gate, up, weight)
    assert tilings == [gemv_module.SILU_MUL_TILES] and gemv_module.SILU_MUL_TILES != gemv_module.LONG_K_TILES
    for tiles in (gemv_module.LONG_K_TILES, gemv_module.Tiles(8, 256, 4, 4)):
        torch.testing.assert_close(silu_mul_gemv(gate, up, weight, tiles=tiles), expected, atol=1e-5, rtol=1e-5)


def test_silu_mul_gemv_rejects_what_it_cannot_compute():
    gate, up, weight = _gated_case(1, 64, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="up shaped like gate"):
        silu_mul_gemv(gate, up[:, :32], weight[:, :64])
    with pytest.raises(ValueError, match=r"one row of 32 features, got x of shape \(1, 64\)"):
        silu_mul_gemv(gate, up, weight[:, :32])


def test_silu_mul_linear_equals_eagers_ops_where_it_falls_back():
    """On CPU (and in fp32) the op runs eager's own ops: the same bits, at every row count."""
    for dtype, rows in [(torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 1), (torch.bfloat16, 3)]:
        gate, up, weight = _gated_case(rows, 96, 40, dtype, seed=rows)
        b = torch.randn(40).to(dtype)
        assert torch.equal(silu_mul_linear(gate, up, weight, b), F.linear(F.silu(gate) * up, weight, b))


def test_gated_kernels_take_16_bit_cuda_rows_a_view_addresses_only():
    gate, up = torch.empty(3, 2, 512).chunk(2, dim=-1)
    assert gemv_module._rows_one_stride_apart(gate) and gemv_module._rows_one_stride_apart(up[:1])
    assert not gemv_module._rows_one_stride_apart(gate.transpose(0, 1))  # rows not one stride apart
    assert not gemv_module._rows_one_stride_apart(gate[..., ::2])  # K strided
    assert not gemv_module._rows_one_stride_apart(torch.empty(()))
    with FakeTensorMode():
        gate, up = _fake_cuda(3, 2, 512).chunk(2, dim=-1)
        assert gemv_module._gated_kernels_take(gate, up)
        assert not gemv_module._gated_kernels_take(gate.transpose(0, 1), up.transpose(0, 1))
        assert not gemv_module._gated_kernels_take(gate.float(), up.float())
        assert not gemv_module._gated_kernels_take(gate, _fake_cuda(1, 256))
        assert silu_mul_linear(gate, up, _fake_cuda(64, 256)).shape == (3, 2, 64)
    assert not gemv_module._gated_kernels_take(*torch.empty(1, 512, dtype=torch.bfloat16).chunk(2, dim=-1))  # CPU


@pytest.mark.parametrize("shape", [(1, 600), (1, 1, 600), (3, 600), (2, 3, 600)])
def test_silu_mul_linear_kernel_paths_on_cpu(monkeypatch, shape):
    """The op's CUDA dispatch run on CPU under the interpreter (the device check patched): one row
    takes the GEMV with SiLU-mul in its prologue, more rows the SiLU-mul kernel then
    fullgraph::linear; both as the kernels compose, in the input's leading shape."""
    monkeypatch.setattr(gemv_module, "_gated_kernels_take", lambda gate, up: True)
    monkeypatch.setattr(gemv_module, "uses_gemv", lambda x, weight, bias=None: x.numel() == weight.shape[1])
    launches = _record_launches(monkeypatch, lambda args, kw: kw.get("up") is not None)
    gen = torch.Generator().manual_seed(len(shape))
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(torch.float16)
    gate, up = gate_up.chunk(2, dim=-1)
    weight = (torch.randn(24, shape[-1], generator=gen) * 0.05).to(torch.float16)
    out = silu_mul_linear(gate, up, weight)
    assert out.shape == (*shape[:-1], 24)
    if gate.numel() == shape[-1]:
        assert launches == [True] and torch.equal(out, gemv(silu_mul_rows(gate, up), weight))
    else:
        assert not launches and torch.equal(out, F.linear(silu_mul_rows(gate, up), weight))


# ---- SiLU-mul in the GEMV's epilogue (fullgraph::linear_silu_mul) ----
@pytest.mark.parametrize("n, k, bias", [(74, 1000, True), (128, 1536, False), (18, 7, True), (16, 8960, False)])
def test_gemv_silu_mul_is_the_rows_kernels_silu_mul_of_the_gemv(n, k, bias):
    """One launch with SiLU-mul in the epilogue gives the bits of the plain GEMV (same tiling: the same
    sums in the same order) then the rows kernel's SiLU-mul of its halves, with and without PDL, in
    every tiling the plain GEMV takes (and 8 rows a program); eager's composition within bf16
    tolerance (the interpreter truncates where a GPU rounds)."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    tilings = (gemv_module.TILES, gemv_module.LONG_K_TILES, gemv_module.SHORT_TILES, gemv_module.Tiles(8, 256, 4, 2))
    for tiles in tilings:
        expected = silu_mul_rows(*gemv(x, weight, b, tiles=tiles).chunk(2, dim=-1))
        for pdl in (False, True):
            assert torch.equal(gemv_silu_mul(x, weight, b, pdl=pdl, tiles=tiles), expected), tiles
    gate, up = F.linear(x, weight, b).chunk(2, dim=-1)
    torch.testing.assert_close(expected.float(), (F.silu(gate) * up).float(), atol=0.07, rtol=0.03)


def test_gemv_silu_mul_takes_the_plain_gemvs_tiling_and_rejects_odd_rows(monkeypatch):
    tilings = _record_launches(monkeypatch, lambda args, kw: (kw["tiles"], kw["paired"]))
    x, weight = torch.randn(1, 64).to(torch.float16), torch.randn(4200, 64).to(torch.float16)
    assert gemv_silu_mul(x, weight).shape == (1, 2100)
    assert tilings == [(gemv_module.default_tiles(4200, 64), True)]
    with pytest.raises(ValueError, match="even number of weight rows"):
        gemv_silu_mul(x, weight[:7])
    with pytest.raises(ValueError, match="even number of weight rows"):
        gemv_silu_mul(x, weight, tiles=gemv_module.Tiles(1, 64, 4, 1))


def test_linear_silu_mul_equals_eagers_ops_where_it_falls_back():
    """On CPU (and in fp32) the op runs eager's own ops: the same bits, at every row count; its fake
    gives the kernels' shape."""
    for dtype, rows in [(torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 1), (torch.bfloat16, 3)]:
        gen = torch.Generator().manual_seed(rows)
        x, weight = torch.randn(rows, 96, generator=gen).to(dtype), torch.randn(80, 96, generator=gen).to(dtype)
        b = torch.randn(80, generator=gen).to(dtype)
        gate, up = F.linear(x, weight, b).chunk(2, dim=-1)
        assert torch.equal(linear_silu_mul(x, weight, b), F.silu(gate) * up)
    with FakeTensorMode():
        assert linear_silu_mul(_fake_cuda(3, 2, 256), _fake_cuda(64, 256)).shape == (3, 2, 32)


@pytest.mark.parametrize("shape", [(1, 600), (1, 1, 600), (3, 600), (2, 3, 600)])
def test_linear_silu_mul_kernel_paths_on_cpu(monkeypatch, shape):
    """The op's CUDA dispatch run on CPU under the interpreter (the device checks patched): one row
    takes the GEMV with SiLU-mul in its epilogue, more rows fullgraph::linear then the SiLU-mul rows
    kernel; both as the kernels compose, in the input's leading shape."""
    monkeypatch.setattr(gemv_module, "_gated_kernels_take", lambda gate, up: True)
    monkeypatch.setattr(gemv_module, "uses_gemv", lambda x, weight, bias=None: x.numel() == weight.shape[1])
    launches = _record_launches(monkeypatch, lambda args, kw: kw.get("paired"))
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen).to(torch.float16)
    weight = (torch.randn(48, shape[-1], generator=gen) * 0.05).to(torch.float16)
    out = linear_silu_mul(x, weight)
    assert out.shape == (*shape[:-1], 24)
    if x.numel() == shape[-1]:
        assert launches == [True] and torch.equal(out, silu_mul_rows(*gemv(x, weight).chunk(2, dim=-1)))
    else:
        assert not launches and torch.equal(out, silu_mul_rows(*F.linear(x, weight).chunk(2, dim=-1)))

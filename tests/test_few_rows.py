"""The few-row linear kernel (``fullgraph_backend.few_rows``): results, the split merge, the dispatch rule.

CPU tests run the kernel in Triton's interpreter (fp16: its bf16 conversions truncate); the sm_90
compile test needs Triton's ptxas, no GPU; the ``gpu`` tests run it in captured graphs on CUDA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fullgraph_backend import few_rows, pdl
from fullgraph_backend.few_rows import FewRowTiles, default_tiles, few_row_linear, split_for, uses_few_rows
from fullgraph_backend.gemv import linear
from fullgraph_backend.scratch import sm_count

from helpers import SM90_PDL_PRELUDE, run_compiler_script


def _case(m: int, n: int, k: int, bias: bool, dtype=torch.float16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    weight = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return x, weight, b


def _expected(x, weight, bias):
    """The product in fp64, rounded once to x's dtype: what an fp32 accumulation rounds to within an ulp."""
    out = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    return out.to(x.dtype)


def _within_an_ulp(got: torch.Tensor, expected: torch.Tensor) -> None:
    ulp = torch.finfo(got.dtype).eps * expected.float().abs().clamp_min(2.0 ** -14)
    assert ((got.float() - expected.float()).abs() <= ulp).all(), (got.float() - expected.float()).abs().max()


@pytest.mark.parametrize("m, n, k, bias, tiles", [
    (2, 40, 96, False, FewRowTiles(32, 32, 4, 2, 1)),
    (5, 64, 300, True, FewRowTiles(32, 64, 4, 2, 3)),    # three K ranges, the last one short
    (16, 33, 512, True, FewRowTiles(16, 128, 4, 2, 2)),  # N off the tile
    (3, 64, 256, False, FewRowTiles(32, 64, 4, 2)),      # ranges from the SM count
    (17, 32, 64, False, FewRowTiles(32, 32, 4, 2, 2)),   # past 16 rows: a 32-row tile
])
def test_few_row_linear_is_the_product_rounded_once(m, n, k, bias, tiles):
    x, weight, b = _case(m, n, k, bias)
    got = few_row_linear(x, weight, b, tiles=tiles)
    assert got.shape == (m, n) and got.dtype == x.dtype
    _within_an_ulp(got, _expected(x, weight, b))


def test_leading_dims_and_a_strided_row_view_are_taken():
    x, weight, b = _case(6, 24, 64, True)
    got = few_row_linear(x.view(2, 3, 64), weight, b, tiles=FewRowTiles(16, 32, 4, 2, 2))
    assert got.shape == (2, 3, 24)
    _within_an_ulp(got.view(6, 24), _expected(x, weight, b))
    wide = torch.cat([x, x], dim=1)[:, :64]  # rows 128 apart, unit stride along K
    assert torch.equal(few_row_linear(wide, weight, b, tiles=FewRowTiles(16, 32, 4, 2, 2)),
                       few_row_linear(x, weight, b, tiles=FewRowTiles(16, 32, 4, 2, 2)))


@pytest.mark.parametrize("tiles", [FewRowTiles(32, 64, 4, 2, 1), FewRowTiles(32, 64, 4, 2, 3)])
def test_pdl_path_and_repeated_calls_give_the_same_bits_and_leave_the_tickets_at_zero(tiles):
    x, weight, b = _case(4, 64, 320, True)
    first = few_row_linear(x, weight, b, tiles=tiles, pdl=False)
    assert torch.equal(few_row_linear(x, weight, b, tiles=tiles, pdl=True), first)
    assert torch.equal(few_row_linear(x, weight, b, tiles=tiles), first)
    assert all(not tickets.any() for _, tickets in few_rows._SCRATCH.values())


def test_split_scratch_is_made_once_per_shape_and_stale_partials_do_not_leak():
    tiles = FewRowTiles(32, 64, 4, 2, 4)
    x, weight, _ = _case(3, 32, 256, False)
    few_row_linear(x, weight, tiles=tiles)
    before = {key: tuple(t.data_ptr() for t in bufs) for key, bufs in few_rows._SCRATCH.items()}
    for partial, _ in few_rows._SCRATCH.values():
        partial.fill_(float("nan"))  # every cell a later call reads, it writes first
    got = few_row_linear(x, weight, tiles=tiles)
    assert {key: tuple(t.data_ptr() for t in bufs) for key, bufs in few_rows._SCRATCH.items()} == before
    _within_an_ulp(got, _expected(x, weight, None))


def test_a_strided_bias_view_is_read_by_its_strides():
    x, weight, _ = _case(3, 24, 64, False)
    spaced = torch.randn(48).half()[::2]  # stride 2, as a slice of a larger vector
    _within_an_ulp(few_row_linear(x, weight, spaced, tiles=FewRowTiles(16, 32, 4, 2, 2)), _expected(x, weight, spaced))


def test_no_rows_give_an_empty_output():
    _, weight, _ = _case(1, 8, 32, False)
    assert few_row_linear(torch.empty(0, 32, dtype=torch.float16), weight).shape == (0, 8)


def test_few_row_linear_rejects_what_it_cannot_compute():
    x, weight, b = _case(4, 8, 32, True)
    with pytest.raises(ValueError, match="x \\[..., 32\\]"):
        few_row_linear(torch.randn(4, 31).half(), weight)
    with pytest.raises(ValueError, match="unit stride along K"):
        few_row_linear(x, torch.randn(32, 8).half().t())
    with pytest.raises(ValueError, match="bias"):
        few_row_linear(x, weight, torch.randn(9).half())
    with pytest.raises(ValueError, match="16-bit .* use F.linear"):
        few_row_linear(x.float(), weight.float())
    with pytest.raises(ValueError, match="one dtype"):
        few_row_linear(x, weight.bfloat16())
    with pytest.raises(ValueError, match="one device"):
        few_row_linear(x, weight.to("meta"))


def test_tilings_follow_the_weight_shape_and_splits_the_sm_count():
    assert default_tiles(2048, 1536) == few_rows.NARROW_TILES  # qkv: one K range
    assert default_tiles(17920, 1536) == few_rows.WIDE_TILES  # gate_up
    assert default_tiles(151936, 1536) == few_rows.WIDE_TILES  # the LM head
    assert default_tiles(1536, 8960) == few_rows.LONG_K_TILES  # down
    cpu = torch.device("cpu")  # scratch.NOMINAL_SMS stand-in SMs
    target = few_rows.PROGRAMS_PER_SM * sm_count(cpu)
    assert split_for(2048, 1536, few_rows.NARROW_TILES, cpu) == 1  # set in the tiling
    assert split_for(32, 8960, FewRowTiles(32, 128, 4, 4), cpu) == target  # one column tile
    assert split_for(96, 8960, FewRowTiles(32, 128, 4, 4), cpu) == -(-target // 3)  # three: the fewest that reach it
    assert split_for(32, 100, FewRowTiles(32, 128, 4, 4), cpu) == 1  # one slice: one range
    assert split_for(32, 8960, FewRowTiles(32, 128, 4, 4, 100), cpu) == 70  # at most one range a slice
    # a column tile for every SM: one range (Llama-3.2-1B's gate_up, 256 tiles on an H200's 132 SMs)
    assert split_for(32 * sm_count(cpu), 8960, FewRowTiles(32, 128, 4, 4), cpu) == 1


def _fake_cuda(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def test_dispatch_takes_2_to_max_rows_of_16_bit_cuda(monkeypatch):
    with FakeTensorMode():
        weight = _fake_cuda(2048, 1536)
        assert uses_few_rows(_fake_cuda(2, 1536), weight)
        assert uses_few_rows(_fake_cuda(4, 4, 1536), weight)
        assert uses_few_rows(_fake_cuda(16, 1536, dtype=torch.float16), _fake_cuda(2048, 1536, dtype=torch.float16))
        assert not uses_few_rows(_fake_cuda(1, 1536), weight)  # the GEMV's
        assert not uses_few_rows(_fake_cuda(17, 1536), weight)  # cuBLAS was faster at 64 rows
        assert not uses_few_rows(_fake_cuda(8, 1536, dtype=torch.float32), _fake_cuda(2048, 1536, dtype=torch.float32))
        assert not uses_few_rows(_fake_cuda(8, 64), _fake_cuda(64, 64).t())
        assert not uses_few_rows(_fake_cuda(8, 1536), weight, _fake_cuda(2048, dtype=torch.float32))
        assert linear(_fake_cuda(8, 1536), weight).shape == (8, 2048)
        monkeypatch.setattr(few_rows, "MAX_ROWS", 1)  # read at the call: tools/bench_decode.py's +nofewrows
        assert not uses_few_rows(_fake_cuda(2, 1536), weight)
    assert not uses_few_rows(torch.randn(4, 8).half(), torch.randn(4, 8).half())  # CPU: F.linear


_SM90_SCRIPT = SM90_PDL_PRELUDE + r'''
from fullgraph_backend.few_rows import LONG_K_TILES, NARROW_TILES, WIDE_TILES, _few_rows_kernel as fn

types = dict(x="*bf16", w="*bf16", bias="*bf16", out="*bf16", partial="*fp32", tickets="*i32", M="i32", N="i32",
             K="i32", k_per_split="i32", splits="i32", stride_xm="i32", stride_wn="i32")
for tiles, merge in ((NARROW_TILES, False), (WIDE_TILES, False), (LONG_K_TILES, True)):
    flags = dict(HAS_BIAS=True, BLOCK_M=16, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, MERGE=merge, PDL=True,
                 DOT_FP32=False)
    ptx, wait = pdl_ptx(fn, types, flags, tiles)
    assert "ld.global" in ptx[:wait] or "cp.async" in ptx[:wait], "no weight load before the wait"
    assert "st.global" not in ptx[:wait] and "atom" not in ptx[:wait], "a store or a ticket before the wait"
    assert ("acq_rel.add" in ptx) == merge, "a ticket only where K ranges merge"
    assert "mma" in ptx, "tensor cores"
print("compiled")
'''


def test_kernel_compiles_for_sm90_with_weight_loads_before_the_wait_and_tickets_after():
    """Triton's real compiler (no GPU needed): each default tiling waits before its first store and
    ticket and triggers after the wait, loads weights before it, and multiplies on tensor cores."""
    run_compiler_script(_SM90_SCRIPT)


# ---- GPU ----
QWEN_SHAPES = [(2048, 1536, True), (1536, 1536, False), (17920, 1536, False), (1536, 8960, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 5, 16])
@pytest.mark.parametrize("n, k, bias", QWEN_SHAPES)
def test_gpu_few_row_linear_matches_cublas_in_captured_replays(rows, n, k, bias):
    """bf16 on CUDA, with PDL: within bf16 tolerance of cuBLAS, eagerly and in a captured graph
    replayed on new inputs (the split merge's tickets reset at each replay); one bit pattern for
    repeated replays of the same input."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(rows)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(few_row_linear(x, weight, b, pdl=True), F.linear(x, weight, b), atol=2e-2, rtol=2e-2)
    static = x.clone()
    out = few_row_linear(static, weight, b, pdl=True)  # warm-up: the scratch is made outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = few_row_linear(static, weight, b, pdl=True)
    for _ in range(3):
        static.copy_(torch.randn_like(static))
        graph.replay()
        torch.testing.assert_close(out, F.linear(static, weight, b), atol=2e-2, rtol=2e-2)
        first = out.clone()
        graph.replay()
        assert torch.equal(out, first)
    assert all(not tickets.any() for _, tickets in few_rows._SCRATCH.values())


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_weights_past_2_31_elements_are_addressed_right(rows):
    """Both linear kernels read weight rows through ``weight_slice``'s int64 offsets: with int32 ones
    (the GEMV's before session 22) the rows past 2**31 elements would be read from wrapped addresses.
    One row takes the GEMV, four the few-row kernel; the last rows are compared with cuBLAS's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    k = 2048
    n = 2 ** 31 // k + 256  # 4.3 GB of bf16
    torch.manual_seed(rows)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    with pdl.launches():
        out = linear(x, weight)
    tail = slice(n - 512, n)
    torch.testing.assert_close(out[:, tail], F.linear(x, weight[tail]), atol=2e-2, rtol=2e-2)

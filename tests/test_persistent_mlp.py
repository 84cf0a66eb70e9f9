"""tools/bench_persistent_mlp.py: the one-launch MLP block (issue 15's persistent-kernel lead) against
eager. CPU: Triton's interpreter, one launch per phase (it runs a grid's programs one after another, so
the grid barrier of the one-launch form would never return there); GPU: the one launch."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

pytest.importorskip("triton")
from bench_persistent_mlp import HIDDEN, INTERMEDIATE, MlpTiles, block_weights, mlp_block, reference, scratch  # noqa: E402

SMALL = MlpTiles(cols=32, block_k=64, rows=8, down_k=128)


def _inputs(hidden, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, hidden, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_two_launches_match_eager(dtype, tol):
    hidden, intermediate = 256, 512
    weights = block_weights(hidden, intermediate, "cpu", dtype=dtype)
    x, res = _inputs(hidden, dtype)
    got = mlp_block(x, res, *weights, scratch(intermediate, dtype, "cpu"), SMALL, phases=(1, 2))
    torch.testing.assert_close(got.float(), reference(x, res, *weights).float(), atol=tol, rtol=tol)


def test_gate_and_up_are_not_interchangeable():
    """The check above can fail: swapping gate's and up's rows (silu on the wrong half) moves the output."""
    hidden, intermediate = 256, 512
    norm_w, w_gate_up, w_down = block_weights(hidden, intermediate, "cpu", dtype=torch.float32)
    swapped = torch.cat([w_gate_up[intermediate:], w_gate_up[:intermediate]])
    x, res = _inputs(hidden, torch.float32)
    got = mlp_block(x, res, norm_w, swapped, w_down, scratch(intermediate, torch.float32, "cpu"), SMALL, phases=(1, 2))
    assert not torch.allclose(got, reference(x, res, norm_w, w_gate_up, w_down), atol=1e-3)


def test_tiles_must_divide_the_shapes():
    weights = block_weights(256, 512, "cpu", dtype=torch.float32)
    x, res = _inputs(256, torch.float32)
    with pytest.raises(ValueError, match="tiles that divide"):
        mlp_block(x, res, *weights, scratch(512, torch.float32, "cpu"), SMALL._replace(cols=48), phases=(1, 2))


@pytest.mark.gpu
def test_one_launch_equals_two_and_matches_eager():
    """Qwen2.5-1.5B's block on the GPU: the grid barrier's launch gives the two launches' bits."""
    weights = block_weights(HIDDEN, INTERMEDIATE, "cuda")
    x, res = _inputs(HIDDEN, torch.bfloat16, "cuda")
    buffers = scratch(INTERMEDIATE, torch.bfloat16, "cuda")
    # the counter is never reset: each launch waits for its own arrivals, the next multiple of the grid
    one, *again = [mlp_block(x, res, *weights, buffers) for _ in range(3)]
    assert all(torch.equal(out, one) for out in again)
    two = mlp_block(x, res, *weights, scratch(INTERMEDIATE, torch.bfloat16, "cuda"), phases=(1, 2))
    assert torch.equal(one, two)
    torch.testing.assert_close(one.float(), reference(x, res, *weights).float(), atol=3e-2, rtol=3e-2)

"""Our Triton kernels compiled for sm_90 (the H100 / H200) on the CPU machine.

Triton's interpreter runs a kernel as plain Python, so code that a GPU compile rejects passes every
interpreter test: a value defined in one branch of a runtime ``if`` and read after it, an accumulator
whose type changes inside a branch (both met in session 25, docs/perf-notes.md section 47). Each case
here runs a wrapper once under the interpreter, recording its launches (kernel, argument types,
constexprs, options), then a subprocess without ``TRITON_INTERPRET`` compiles every launch for sm_90
with Triton's compiler and the ptxas that ships with Triton: no GPU needed. The CPU paths' own
constexprs are set as the GPU sets them (``DOT_FP32``: tensor-core products on the GPU).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from fullgraph_backend import few_rows, gemv  # noqa: E402

from test_triton_attention import _args, _batch, _split  # noqa: E402

# constexprs whose CPU value the GPU never takes
GPU_CONSTEXPRS = {"DOT_FP32": False}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl", "launch_cooperative_grid")


def _ptxas_ships() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


pytestmark = pytest.mark.skipif(not _ptxas_ships(), reason="Triton without its NVIDIA backend's ptxas")


def _spec(fn, args: tuple, kwargs: dict) -> dict:
    """One launch as the compile subprocess takes it: the kernel by module and name, each argument's
    Triton type (``mangle_type``, as the GPU launcher derives it), constexprs by name, options."""
    from triton.runtime.jit import mangle_type

    params = list(inspect.signature(fn).parameters.values())
    bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k not in OPTIONS})
    signature, constexprs = {}, {}
    for param in params:
        value = bound.arguments.get(param.name, param.default)
        if "constexpr" in str(param.annotation) or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = GPU_CONSTEXPRS.get(param.name, value)
        else:
            signature[param.name] = mangle_type(value)
    return dict(module=fn.__module__, name=fn.__name__, signature=signature, constexprs=constexprs,
                options={k: v for k, v in kwargs.items() if k in OPTIONS and v is not None})


@pytest.fixture()
def launches(monkeypatch):
    """Launches of our kernels under the interpreter, as :func:`_spec` writes them."""
    from triton.runtime.interpreter import InterpretedFunction

    recorded = []
    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("fullgraph_backend"):
            recorded.append(_spec(self.fn, args, kwargs))
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return recorded


COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
results = []
for spec in json.load(sys.stdin):
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    names = list(spec["signature"])
    src = ASTSource(fn, spec["signature"], constexprs={(names.index(k),): v for k, v in spec["constexprs"].items()})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
        results.append(dict(name=spec["name"], shared=kernel.metadata.shared))
    except Exception as error:  # the report names the kernel and Triton's message
        results.append(dict(name=spec["name"], error=f"{type(error).__name__}: {error}"[-1500:]))
print(json.dumps(results))
"""


def _compile_for_sm90(specs: list[dict]) -> list[dict]:
    distinct = list({json.dumps(s, sort_keys=True): s for s in specs}.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(distinct), capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_all_compile(specs: list[dict], kernels: set[str]) -> None:
    assert {s["name"] for s in specs} >= kernels, f"launched {sorted({s['name'] for s in specs})}"
    results = _compile_for_sm90(specs)
    failed = [r for r in results if "error" in r]
    assert not failed, "\n\n".join(f"{r['name']}: {r['error']}" for r in failed)


def test_linear_kernels_compile_for_sm90(launches):
    """The GEMV (plain in its three tilings, norm prologue with residual, SiLU-mul prologue; with PDL's
    waits), the few-row kernel (one K range and split with tickets), the row-wise norm and SiLU-mul."""
    draw = lambda *shape: torch.randn(*shape).to(torch.bfloat16)  # noqa: E731
    for n, k in ((256, 1024), (4096, 512), (128, 4352)):  # SHORT_TILES, TILES, LONG_K_TILES
        gemv.gemv(draw(1, k), draw(n, k), pdl=True)
    x, res = draw(1, 512), draw(1, 512)
    gemv.rms_norm_gemv(x, draw(512), 1e-6, draw(256, 512), residual=res, pdl=True)
    gemv.silu_mul_gemv(x, res, draw(128, 512), pdl=True)
    few_rows.few_row_linear(draw(4, 512), draw(512, 512), pdl=True)
    split = few_rows.default_tiles(64, 2048)._replace(split_k=4)
    few_rows.few_row_linear(draw(4, 2048), draw(64, 2048), draw(64), pdl=True, tiles=split)
    gemv.rms_norm_rows(draw(3, 512), draw(512), 1e-6, residual=draw(3, 512))
    gemv.silu_mul_rows(draw(3, 512), draw(3, 512))
    _assert_all_compile(launches, {"_gemv_kernel", "_few_rows_kernel", "_rms_norm_rows_kernel", "_silu_mul_rows_kernel"})
    merges = {s["constexprs"]["MERGE"] for s in launches if s["name"] == "_few_rows_kernel"}
    assert merges == {False, True}  # one K range, and split ranges merged through tickets


@pytest.mark.parametrize("page_tiles", [False, True])
def test_attention_kernels_compile_for_sm90(launches, page_tiles):
    """The unified kernel (prefill and decode rows, with its K/V store) and split-KV decode with the
    in-launch merge, bf16; with ``page_tiles`` the K/V tiles through tensor descriptors (the sm_90 plan)."""
    from fullgraph_backend.attention.triton_paged import paged_attention

    ctx, q, k, v = _batch([5, 1], [5, 40], dtype=torch.bfloat16, head_dim=64, block_size=16)
    paged_attention(*_args(ctx, q, k, v, ctx.kv_caches[0], 0))
    ctx, q, k, v = _batch([1, 1, 1], [3, 50, 97], group=4, dtype=torch.bfloat16, head_dim=64, block_size=16)
    _split(4, **({"page_tiles": True} if page_tiles else {}))(*_args(ctx, q, k, v, ctx.kv_caches[0], 0))
    _assert_all_compile(launches, {"_store_kv_kernel", "_unified_kernel", "_split_kv_kernel"})
    described = any(t.startswith("tensordesc") for s in launches for t in s["signature"].values())
    assert described == page_tiles

"""Inductor's compile cache across engines: limits (max_model_len, max_num_seqs, num_kv_blocks) are
sizes the compiled graph reads at run time, so changing them loads the graph an earlier engine
compiled; the startup report says hit or miss and why."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import fresh_cache

from fullgraph_backend.engine import LLM, SamplingParams
from fullgraph_backend.engine.compile_cache import outcome

LIMITS = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, num_kv_blocks=24)


def tiny_llm(**changes) -> LLM:
    """A tiny engine, compiled with Inductor, capturing the warm-up's two sizes (emulated on CPU)."""
    return LLM("tiny", optimization_level=4, seed=0, compile_options={"capture_sizes": (8, 16)},
               **{**LIMITS, **changes})


@pytest.mark.slow
def test_changed_limits_load_the_compiled_graph():
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    with fresh_cache():
        first = tiny_llm()
        assert first.startup.compile_cache == "miss" and "not part of the key" in str(first.startup)
        tokens = first.generate([[1, 2, 3]], greedy)[0].token_ids
        for changes in ({}, {"max_model_len": 128}, {"max_num_seqs": 8}, {"num_kv_blocks": 40}):
            torch._dynamo.reset()
            llm = tiny_llm(**changes)
            assert llm.startup.compile_cache == "hit", (changes, str(llm.startup))
            assert "AOTAutograd's cache passed" not in str(llm.startup)
            assert llm.generate([[1, 2, 3]], greedy)[0].token_ids == tokens, changes


def test_outcome_names_the_worst_event():
    zero = dict(hit=0, miss=0, bypass=0)
    assert outcome(zero, dict(zero, hit=2))[0] == "hit"
    assert outcome(zero, dict(zero, hit=1, miss=1))[0] == "miss"
    assert outcome(zero, dict(zero, bypass=1))[0] == "bypass"
    verdict, why = outcome(zero, zero)
    assert verdict == "unused" and "compiler='eager'" in why
    verdict, why = outcome(dict(zero, aot_bypass=1), dict(zero, hit=5, aot_bypass=2))
    assert verdict == "hit" and "passed 1 graph(s) by" in why


def test_every_graph_of_an_engine_is_cached_by_aotautograd():
    """A graph AOTAutograd's cache passes by is traced again by every warm start (the regional
    epilogue was, ``autograd_cache_bypass`` 1 on CPU and on the H200: a Python function, the request
    ends, in its graph); the request ends now enter graphs as an op, and no graph is passed by."""
    from torch._dynamo.utils import counters

    with fresh_cache():
        before = counters["aot_autograd"]["autograd_cache_bypass"]
        llm = tiny_llm()
        assert counters["aot_autograd"]["autograd_cache_bypass"] == before, str(llm.startup)
        assert counters["aot_autograd"]["autograd_cache_saved"] > 0
    # the backend's own phases are in Dynamo's compile times, beside AOTAutograd's and Inductor's
    times = torch._dynamo.utils.compile_times(repr="str")
    assert all(f"fullgraph.{phase}," in times for phase in ("passes", "regions.keys", "regions.split")), times


_SCHEMA_SCRIPT = r'''
import sys
import torch
from torch._dynamo.utils import counters
import fullgraph_backend  # noqa: F401  (registers the backend)

lib = torch.library.Library("fgcache", "DEF")
lib.define(sys.argv[1])
lib.impl("f", lambda x, y=None: x + 1, "CompositeExplicitAutograd")
torch.library.register_fake("fgcache::f", lambda x, y=None: torch.empty_like(x), lib=lib)
compiled = torch.compile(lambda x: torch.ops.fgcache.f.default(x * 2) * 3, backend="fullgraph",
                         options={"cudagraph_mode": "none"})
assert compiled(torch.ones(4)).tolist() == [9.0] * 4
print("hit" if counters["inductor"]["fxgraph_cache_hit"] else "miss")
'''


@pytest.mark.parametrize("schemas, verdicts", [
    (("f(Tensor x, Tensor? y=None) -> Tensor", "f(Tensor x) -> Tensor"), ["miss", "miss"]),
    (("f(Tensor x) -> Tensor", "f(Tensor x) -> Tensor"), ["miss", "hit"]),
])
def test_a_custom_ops_schema_is_part_of_the_compile_caches_key(tmp_path, schemas, verdicts):
    """Two processes compile one graph through a custom op whose schema the second changes (as an
    upgrade of this package may change one of ours): Inductor's compiled code passes every argument
    by position, so a cache hit would call the op with the old schema's arguments and raise. The
    schemas are in the key: the second process compiles again; with the schema unchanged it loads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    seen = []
    for schema in schemas:
        result = subprocess.run([sys.executable, "-c", _SCHEMA_SCRIPT, schema], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        seen.append(result.stdout.split()[-1])
    assert seen == verdicts

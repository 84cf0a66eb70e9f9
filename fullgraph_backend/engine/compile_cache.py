"""Whether startup's compile came from Inductor's on-disk caches, and why not, for the startup report.

Inductor keeps compiled graphs under ``TORCHINDUCTOR_CACHE_DIR`` (AOTAutograd's cache over its FX
graph cache), keyed by the graph with its input shapes, the Inductor config and the torch build.
The engine's graph takes the forward context's limit-sized dims (``max_model_len``,
``max_num_seqs``, ``num_kv_blocks``, the token budget) as sizes read at run time
(``forward_context.SIZED_BY_LIMITS``), so changing those limits finds the entry that an earlier
process wrote. Inductor counts what its caches did (``torch._dynamo.utils.counters``); this module
reads those counts around the compile.
"""
from __future__ import annotations

import os

WHY = {
    "hit": "compiled code loaded from {dir}",
    "miss": ("no entry under {dir} for this graph: a first compile of this model, dtype, block_size, "
             "compile options or torch build (max_model_len, max_num_seqs and num_kv_blocks are not "
             "part of the key)"),
    "bypass": "Inductor cannot cache this graph (TORCH_LOGS=+inductor logs why)",
    "unused": ("no cache was consulted: compiler='eager', or Inductor's caches are off "
               "(force_disable_caches, fx_graph_cache=False, or a dump's trace)"),
}


def cache_events() -> dict[str, int]:
    """Inductor's FX graph cache events so far in this process (AOTAutograd's cache loads through
    it, so its hits count here too), and AOTAutograd's bypasses (``aot_bypass``): a graph it will
    not cache is traced again by every process, hits below it or not."""
    from torch._dynamo.utils import counters

    events = {verdict: counters["inductor"][f"fxgraph_cache_{verdict}"] for verdict in ("hit", "miss", "bypass")}
    return {**events, "aot_bypass": counters["aot_autograd"]["autograd_cache_bypass"]}


def outcome(before: dict[str, int], after: dict[str, int]) -> tuple[str, str]:
    """``(verdict, why)`` for the compiles between two :func:`cache_events` snapshots: ``hit`` when
    every compile loaded from the cache, else ``miss`` (any miss), ``bypass`` or ``unused``; ``why``
    also counts the graphs AOTAutograd's cache passed by."""
    seen = {verdict for verdict in ("hit", "miss", "bypass") if after[verdict] > before[verdict]}
    verdict = next((v for v in ("miss", "bypass", "hit") if v in seen), "unused")
    # Inductor sets the variable when it first finds its cache folder
    why = WHY[verdict].format(dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "Inductor's cache folder"))
    traced = after.get("aot_bypass", 0) - before.get("aot_bypass", 0)
    if traced:
        why += (f"; AOTAutograd's cache passed {traced} graph(s) by, traced again in every process "
                f"(TORCH_LOGS=+torch._functorch._aot_autograd.autograd_cache says why)")
    return verdict, why

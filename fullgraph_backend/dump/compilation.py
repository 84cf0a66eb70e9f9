"""``dump_compilation(dir)``: everything about the compilations a block of code triggers."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

from fullgraph_backend import compat
from fullgraph_backend.dump import files, manifest, schema
from fullgraph_backend.dump.quiet import quiet_third_party
from fullgraph_backend.dump.writer import dumping_into


@contextlib.contextmanager
def dump_compilation(dump_dir: str) -> Iterator[str]:
    """Dump every compilation triggered inside the block into ``dump_dir``.

    Wrap the code that *triggers* compilation (the first calls of the compiled model), not the
    ``torch.compile`` call::

        import torch
        from fullgraph_backend.dump import dump_compilation

        mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        compiled = torch.compile(mlp, backend="fullgraph", options={"capture_sizes": (8,)})
        with torch.inference_mode(), dump_compilation("dump"):
            compiled(torch.randn(4, 8))
        # then: fullgraph dump dump --html dump.html

    Inside the block, graphs compiled by ``backend="fullgraph"`` without a ``dump_dir`` option are
    dumped into ``dump_dir`` (with the option, their folders go there instead), Inductor's caches
    off while they compile (a cache hit would skip the passes and the trace). The warnings depyf,
    Dynamo and Inductor print about the dump itself are silenced
    (:mod:`fullgraph_backend.dump.quiet`). Files written:

    - ``fullgraph_dump.json``: the manifest (compile ids, every file); marks the folder as a dump.
    - ``<compile id>/`` per graph (``0_0``, ``1_0``, ``0_1`` for a recompile; ``0_0.1`` when an id
      repeats after ``torch._dynamo.reset()``), written by the backend:

      - ``graph.json``: compile id, graph-break reason, options, each Inductor compile's inputs
        (with symbolic shapes flagged), its trace folder and leftovers (KV-cache clones and
        copy-backs, ``auto_functionalized``, extern kernels, aten fallbacks, custom op calls), and
        ``regions``: per graph handed to the compiler, its regions with the compile each one
        runs (regions sharing one reused its code), or why it was compiled whole.
      - ``00_dynamo_graph.py``, ``NN_<pass>.py``: the graph as Dynamo gave it, then after each pass.
      - ``passes.txt`` / ``passes.json``: each pass's summary / report (for the attention swap:
        each node, its layer, the implementation, the buffers it reads; nodes left alone, why).
      - ``torchinductor/<graph>.<n>/``: Inductor's trace: ``fx_graph_readable.py``,
        ``fx_graph_transformed.py`` (post-grad graph), ``ir_pre_fusion.txt``,
        ``ir_post_fusion.txt``, ``output_code.py``, ``fx_graph_runnable.py``.
      - ``capture.json`` / ``capture.txt``: the capture table (size, batch kind, warmup and
        capture ms, graph-pool growth in MiB; 0 on CPU).

    - ``depyf/``: depyf's ``full_code_for_<fn>_<n>.py`` (guards, decompiled bytecode, graphs),
      ``__transformed_code_<n>_for_<fn>.py`` and ``__compiled_fn_<n>.<stage>.<n>.py`` (Dynamo,
      AOT and post-grad graphs, ``kernel_<n>`` = Inductor output code).
    - ``dynamo.json``: Dynamo's record of each frame compiled in the block: compile id,
      function, failure (a frame that fell back to eager), recompile reason.

    Yields ``dump_dir``. Dumps add to the folder: start from an empty one.
    """
    import depyf  # here, not at module level: the backend's own dump writer must not need depyf

    os.makedirs(dump_dir, exist_ok=True)
    manifest.update(dump_dir)
    # depyf writes its folder itself: it must not be a link planted to lead outside the dump
    depyf_dir = files.locate(dump_dir, manifest.DEPYF_FOLDER, manifest.DEPYF_FOLDER)
    seen = {id(r) for r in compat.compilation_records()}
    try:
        with quiet_third_party(), dumping_into(dump_dir), depyf.prepare_debug(depyf_dir):
            yield dump_dir
    finally:
        _append_dynamo_records(dump_dir, [r for r in compat.compilation_records() if id(r) not in seen])
        manifest.update(dump_dir)


def _append_dynamo_records(dump_dir: str, records: list) -> None:
    rows = files.read_json(dump_dir, manifest.DYNAMO_RECORD, schema.DYNAMO, [])
    rows += [{"compile_id": str(r.compile_id), "function": r.co_name,
              "where": f"{r.co_filename}:{r.co_firstlineno}", "fail_type": r.fail_type,
              "fail_reason": _first_lines(r.fail_reason), "recompile_reason": _first_lines(r.recompile_reason)}
             for r in records]
    files.write_text(os.path.join(dump_dir, manifest.DYNAMO_RECORD), json.dumps(rows, indent=1))


def _first_lines(text: str | None, n: int = 3) -> str | None:
    return "\n".join(text.strip().splitlines()[:n]) if text else None

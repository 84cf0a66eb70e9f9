"""Run each mode of a benchmark tool in a fresh process and merge the rows.

A mode measured second in a process has read 6-9% slower than the same mode measured first,
whatever the mode (H200, GPU time of bench_decode at batch 16 and 64, TPOT of
bench_transformers' engines at batch 1 and 8; docs/perf-notes.md, section 33). So the tools run
every mode in a process of its own by default; ``--one-process`` keeps them in one (quicker, for
smoke runs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ONE_PROCESS_HELP = "measure every mode in this process (a mode measured second has read slower)"


def child_argv(argv: list[str], mode: str, out: str) -> list[str]:
    """``argv`` (a tool's arguments, without the program) with ``--modes`` set to ``mode`` alone and
    ``--out`` to ``out``, in either spelling (``--modes a,b`` or ``--modes=a,b``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--modes", "--out"):
            skip = True
        elif not arg.startswith(("--modes=", "--out=")):
            kept.append(arg)
    return [*kept, "--modes", mode, "--out", out]


def run_modes(script: str, argv: list[str], modes: list[str], result_name: str,
              batches: list[int]) -> tuple[dict, list[dict]]:
    """Run ``script`` once per mode, each in a new Python process writing ``result_name`` (a JSON
    object with ``rows``) to a folder of its own; return the first result's other keys and every
    row, in mode order. A process that fails leaves a row ``{"mode", "batch", "error"}`` per batch
    of ``batches``; the others go on."""
    header, rows = {}, []
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="fullgraph-mode-") as out:
            code = subprocess.run([sys.executable, script, *child_argv(argv, mode, out)]).returncode
            path = os.path.join(out, result_name)
            if not os.path.exists(path):
                rows += [{"mode": mode, "batch": batch, "error": f"its process exited with code {code} and wrote no result"}
                         for batch in batches]
                continue
            with open(path) as f:
                result = json.load(f)
        header = header or {k: v for k, v in result.items() if k != "rows"}
        rows += result["rows"]
    return header, rows

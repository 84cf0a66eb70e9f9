"""Run each mode of a benchmark tool in a fresh process and merge the rows.

A mode measured second in a process has read 6-9% slower than the same mode measured first,
whatever the mode (H200, GPU time of bench_decode at batch 16 and 64, TPOT of
bench_transformers' engines at batch 1 and 8; docs/perf-notes.md, section 33). So the tools run
every mode in a process of its own by default; ``--one-process`` keeps them in one (quicker, for
smoke runs).

Host-bound numbers also move between processes of the same mode: transformers' TPOT by up to 20%
(H200, 2026-11-29/30; docs/perf-notes.md, section 34). ``--rounds N`` runs every mode N times, in
order and reversed by turns, and reports each number's median over the rounds with the rounds'
values beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ONE_PROCESS_HELP = "measure every mode in this process (a mode measured second has read slower)"
ROUNDS_HELP = "run every mode this many times, in turns, each in a process of its own; numbers are medians"
MODE_TIMEOUT_HELP = ("stop a mode's process after this many seconds, its rows then errors, and go on with the "
                     "others (a mode that hangs no longer costs the whole run); default: no limit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of running modes apart, which every tool using :func:`run_modes` takes:
    ``--one-process``, ``--rounds``, ``--mode-timeout``."""
    parser.add_argument("--one-process", action="store_true", help=ONE_PROCESS_HELP)
    parser.add_argument("--rounds", type=rounds_arg, default=1, help=ROUNDS_HELP)
    parser.add_argument("--mode-timeout", type=float, default=None, metavar="SECONDS", help=MODE_TIMEOUT_HELP)


def runs_apart(args: argparse.Namespace, modes: list[str]) -> bool:
    """Whether a tool hands its modes to :func:`run_modes`: several modes, or rounds of one, unless
    ``--one-process`` (which :func:`child_argv` gives every child, so a child measures its mode)."""
    return (len(modes) > 1 or args.rounds > 1) and not args.one_process


def rounds_arg(text: str) -> int:
    """``--rounds``: a whole number, at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--rounds takes a whole number of at least 1, not {text!r}")
    return int(text)


def child_argv(argv: list[str], mode: str, out: str) -> list[str]:
    """``argv`` (a tool's arguments, without the program) with ``--modes`` set to ``mode`` alone and
    ``--out`` to ``out``, in either spelling (``--modes a,b`` or ``--modes=a,b``), and
    ``--one-process``: the child measures its mode itself, whatever ``--rounds`` says."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--modes", "--out"):
            skip = True
        elif not arg.startswith(("--modes=", "--out=")) and arg != "--one-process":
            kept.append(arg)
    return [*kept, "--one-process", "--modes", mode, "--out", out]


def run_modes(script: str, argv: list[str], modes: list[str], result_name: str,
              batches: list[int], rounds: int = 1, timeout: float | None = None) -> tuple[dict, list[dict]]:
    """Run ``script`` once per mode, each in a new Python process writing ``result_name`` (a JSON
    object with ``rows``) to a folder of its own; return the first result's other keys and every
    row, in mode order. A process that fails, or runs past ``timeout`` seconds and is stopped,
    leaves a row ``{"mode", "batch", "error"}`` per batch of ``batches`` it has no row for (a stopped
    process keeps the rows its result file held); the others go on. With
    ``rounds`` > 1 the modes run that many times, in order and reversed by turns, and a mode's row
    per batch is :func:`median_row` of its rounds."""
    header, runs = {}, {mode: [] for mode in modes}
    for turn in range(rounds):
        for mode in modes if turn % 2 == 0 else modes[::-1]:
            result = _run_one(script, argv, mode, result_name, batches, timeout)
            header = header or {k: v for k, v in result.items() if k != "rows"}
            runs[mode] += result["rows"]
    if rounds == 1:
        return header, [row for mode in modes for row in runs[mode]]
    rows = []
    for mode in modes:
        by_batch = {}
        for row in runs[mode]:
            by_batch.setdefault(row["batch"], []).append(row)
        rows += [median_row(same) for same in by_batch.values()]
    return header, rows


def median_row(rows: list[dict]) -> dict:
    """One row for the rounds ``rows`` of a mode and batch: the first's keys, each number the median
    of the rounds that measured it (to 6 decimals; a count, such as graphs, the lower middle one: a whole number),
    those values as ``<key>_rounds``; an error only if every round failed."""
    measured = [row for row in rows if "error" not in row] or rows[:1]
    merged = {**measured[0], "rounds": len(measured)}
    for key, value in measured[0].items():
        if key != "batch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [row[key] for row in measured if isinstance(row.get(key), (int, float))]
            counts = all(isinstance(v, int) for v in values)
            # the mean of two middle values in binary floating point (1.82 and 1.83 -> 1.8250000000000002),
            # rounded back to what the rows' own digits can tell
            merged[key] = statistics.median_low(values) if counts else round(statistics.median(values), 6)
            merged[f"{key}_rounds"] = values
    return merged


def _run_one(script: str, argv: list[str], mode: str, result_name: str, batches: list[int],
             timeout: float | None) -> dict:
    def failed(why: str) -> dict:
        return {"rows": [{"mode": mode, "batch": batch, "error": why} for batch in batches]}

    with tempfile.TemporaryDirectory(prefix="fullgraph-mode-") as out:
        path = os.path.join(out, result_name)
        try:
            code = subprocess.run([sys.executable, script, *child_argv(argv, mode, out)], timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            # the tools write their result after each row: what finished before the stop is kept
            why = f"its process ran past --mode-timeout {timeout:g} s and was stopped"
            try:
                with open(path) as f:
                    result = json.load(f)
            except (OSError, ValueError):  # none written yet, or stopped while writing it
                return failed(why)
            done = {row["batch"] for row in result["rows"]}
            result["rows"] += [row for row in failed(why)["rows"] if row["batch"] not in done]
            return result
        if not os.path.exists(path):
            return failed(f"its process exited with code {code} and wrote no result")
        with open(path) as f:
            return json.load(f)

"""``print_overview``: a dump on the terminal. Text read from the dump is shown as plain text,
never as Rich markup, and without escape sequences or other control characters."""
from __future__ import annotations

import os
import re

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fullgraph_backend.dump.report import Dump, dynamo_record, warnings_of

# ANSI CSI and OSC sequences whole, then any other C0 / C1 control except tab and newline, and
# the bidirectional overrides that reorder what a terminal shows
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
                      r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """``str(value)`` without terminal escape sequences and control characters (tab and newline kept)."""
    return _ESCAPES.sub("", str(value))


def plain(value: object, style: str = "") -> Text:
    """``value`` as Rich text that is never parsed as markup, made :func:`printable`."""
    return Text(printable(value), style=style)


def print_overview(dump: Dump, console: Console) -> None:
    """Print the dump: graphs, passes, attention swaps, regional compiles, capture tables, then the
    warnings."""
    console.print(Text.assemble(("fullgraph dump", "bold"), " ", plain(
        f"{dump.root}: {len(dump.graphs)} graph(s), torch {dump.manifest['torch']}, "
        f"{len(dump.manifest['depyf'])} depyf file(s)")))
    console.print(_graphs_table(dump, console.width))
    for g in dump.graphs:
        console.rule(plain(f"graph {g.name}  ({os.path.relpath(g.folder, dump.root)}/)"))
        for p in g.passes:
            console.print(Text.assemble(plain(p["name"], "bold"), " -> ", plain(p["graph"])))
            console.print(plain("  " + p["summary"].replace("\n", "\n  ")))
        swapped, left = g.swaps
        if swapped:
            console.print(_table(f"{g.name}: attention swap", ("node", "layer", "impl", "reads"),
                                 [(s["node"], s["layer_idx"], s["impl"], ", ".join(s["reads"])) for s in swapped],
                                 overflow="fold"))
        for node, why in left:
            console.print(plain(f"  left alone: {node}: {why}"))
        for report in g.record["regions"]:
            console.print(plain(f"  regional compile: {report['summary']}"))
        if g.capture:
            console.print(_table(f"{g.name}: capture", ("size", "kind", "warmup ms", "capture ms", "pool MiB"),
                                 [(r["size"], r["kind"], f"{r['warmup_ms']:.2f}", f"{r['capture_ms']:.2f}",
                                   f"{r['pool_mib']:.2f}") for r in g.capture], justify="right"))
        for piece in g.record["pieces"]:
            if piece["output_code"]:
                calls = {**piece["extern_kernels"], **piece["custom_op_calls"]}
                console.print(plain(f"  output code: {piece['inductor']}/{piece['output_code']}: "
                                    f"{sum(piece['generated_kernels'].values())} generated kernel(s); calls "
                                    + (", ".join(f"{k} x{v}" for k, v in calls.items()) or "none")))
    found = warnings_of(dump)
    console.rule("warnings")
    for w in found:
        console.print(Text("! ", style="yellow") + plain(w))
    if not found:
        console.print("[green]no warnings[/green]: no KV-cache copies, fallbacks, graph breaks or recompiles")


def _graphs_table(dump: Dump, width: int) -> Table:
    """One row per graph; the function name takes the width the other columns leave."""
    header = ("graph", "function", "mode", "compiler", "end", "inputs", "swaps", "kernels", "keys")
    rows = []
    for g in dump.graphs:
        pieces = g.record["pieces"]
        kernels = sum(sum(p["generated_kernels"].values()) for p in pieces)
        config = g.record["config"]
        rows.append([printable(cell) for cell in (
            g.name, dynamo_record(dump, g).get("function", "-"), config["cudagraph_mode"], config["compiler"],
            "break" if g.record["graph_break"] else "return", len(pieces[0]["inputs"]) if pieces else "-",
            len(g.swaps[0]), kernels if any(p["inductor"] for p in pieces) else "-", len(g.capture))])
    table = Table(title="graphs", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    spare = width - sum(widths) + widths[1] - 2 * len(header)
    for i, column in enumerate(header):
        table.add_column(column, no_wrap=True, overflow="ellipsis", min_width=None if i == 1 else widths[i],
                         max_width=max(spare, 8) if i == 1 else None)
    for row in rows:
        table.add_row(*map(Text, row))
    return table


def _table(title: str, header: tuple[str, ...], rows: list[tuple], **column) -> Table:
    table = Table(title=plain(title))
    for name in header:
        table.add_column(name, **column)
    for row in rows:
        table.add_row(*map(plain, row))
    return table

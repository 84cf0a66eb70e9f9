"""Reading a dump folder back: the graphs, their passes and swaps, capture tables, and warnings."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fullgraph_backend.dump import manifest


@dataclass
class GraphInfo:
    """One compiled graph of a dump: its ``graph.json``, ``passes.json`` and ``capture.json``."""

    folder: str  # absolute
    record: dict
    passes: list[dict] = field(default_factory=list)
    capture: list[dict] = field(default_factory=list)

    @property
    def compile_id(self) -> str:
        return self.record.get("compile_id") or os.path.basename(self.folder)

    @property
    def name(self) -> str:
        """The compile id, with the folder's ``.N`` suffix when the id repeats in this dump."""
        base = os.path.basename(self.folder)
        return self.compile_id + base[base.index("."):] if "." in base else self.compile_id

    @property
    def occurrence(self) -> int:
        """0 for the first graph with this compile id in the dump, 1 for ``<id>.1``..."""
        suffix = os.path.basename(self.folder).rpartition(".")[2]
        return int(suffix) if "." in os.path.basename(self.folder) and suffix.isdigit() else 0

    @property
    def swaps(self) -> tuple[list[dict], list[list[str]]]:
        """Swapped attention nodes and (node, why) left alone, from the attention swap's report."""
        for p in self.passes:
            report = p.get("report")
            if isinstance(report, dict) and "swapped" in report:
                return report["swapped"], report.get("left_alone", [])
        return [], []

    def graph_files(self) -> list[tuple[str, str]]:
        """(label, path) of the graph as received and after each pass, in order."""
        if not self.passes and not os.path.exists(os.path.join(self.folder, "00_dynamo_graph.py")):
            return []
        files = [("dynamo graph", os.path.join(self.folder, "00_dynamo_graph.py"))]
        return files + [(p["name"], os.path.join(self.folder, p["graph"])) for p in self.passes]


@dataclass
class Dump:
    """A dump folder, read."""

    root: str
    manifest: dict
    graphs: list[GraphInfo]
    dynamo: list[dict]


def load_dump(root: str) -> Dump:
    """Read dump folder ``root``; :class:`~fullgraph_backend.dump.manifest.DumpError` if it is none."""
    m = manifest.read(root)
    graphs = []
    for entry in m["graphs"]:
        folder = os.path.join(root, entry["folder"])
        record = _json(os.path.join(folder, manifest.GRAPH_RECORD), {"compile_id": entry.get("compile_id")})
        graphs.append(GraphInfo(os.path.abspath(folder), record,
                                _json(os.path.join(folder, "passes.json"), {}).get("passes", []),
                                _json(os.path.join(folder, "capture.json"), [])))
    return Dump(os.path.abspath(root), m, graphs, _json(os.path.join(root, manifest.DYNAMO_RECORD), []))


def dynamo_record(dump: Dump, g: GraphInfo) -> dict:
    """Dynamo's record of the frame compile that produced ``g`` ({} without dump_compilation)."""
    same_id = [r for r in dump.dynamo if r["compile_id"] == g.compile_id and not r.get("fail_type")]
    return same_id[g.occurrence] if g.occurrence < len(same_id) else {}


def warnings_of(dump: Dump) -> list[str]:
    """What deserves a look: KV-cache copies, leftover functionalization, fallbacks, breaks, recompiles."""
    found = []
    for g in dump.graphs:
        for i, piece in enumerate(g.record.get("pieces", [])):
            where = g.name if len(g.record["pieces"]) == 1 else f"{g.name} piece {i}"
            clones, backs = piece.get("kv_cache_clones", []), piece.get("kv_cache_copy_backs", [])
            if clones or backs or piece.get("kv_cache_copies_in_output_code"):
                found.append(f"{where}: KV cache cloned {len(clones)}x / copied back {len(backs)}x in the post-grad "
                             f"graph ({', '.join(sorted(set(clones + backs)))}), "
                             f"{piece.get('kv_cache_copies_in_output_code', 0)} clone/copy line(s) in the output "
                             f"code: an in-place cache update was not reinplaced, so every step copies the cache")
            if piece.get("auto_functionalized"):
                found.append(f"{where}: {piece['auto_functionalized']} auto_functionalized node(s) left in the "
                             f"post-grad graph (mutations not reinplaced)")
            if piece.get("aten_fallbacks"):
                calls = ", ".join(f"{k} x{v}" for k, v in piece["aten_fallbacks"].items())
                found.append(f"{where}: aten fallback(s) in the output code (not lowered by Inductor): {calls}")
        if g.record.get("graph_break"):
            found.append(f"graph break: graph {g.name} ends early: {_first_line(g.record['graph_break'])}")
        frame, _, count = g.compile_id.partition("/")
        if count.isdigit() and int(count) > 0:
            reason = dynamo_record(dump, g).get("recompile_reason")
            found.append(f"recompile: graph {g.name} is compile {int(count) + 1} of frame {frame}"
                         + (f": {_first_line(reason)}" if reason else ""))
    for r in dump.dynamo:
        if r.get("fail_type"):
            found.append(f"graph break: frame {r['compile_id']} ({r['function']} at {r['where']}) was not "
                         f"compiled ({r['fail_type']}): {_first_line(r.get('fail_reason') or '')}")
    return found


def print_overview(dump: Dump, console: Console) -> None:
    """Print the dump: graphs, passes, attention swaps, capture tables, then the warnings."""
    console.print(f"[bold]fullgraph dump[/bold] {dump.root}: {len(dump.graphs)} graph(s), "
                  f"torch {dump.manifest.get('torch')}, {len(dump.manifest.get('depyf') or [])} depyf file(s)")
    header = ("graph", "function", "mode", "compiler", "end", "inputs", "swaps", "kernels", "keys")
    rows = []
    for g in dump.graphs:
        pieces = g.record.get("pieces", [])
        kernels = sum(sum(p.get("generated_kernels", {}).values()) for p in pieces)
        config = g.record.get("config", {})
        rows.append((g.name, dynamo_record(dump, g).get("function", "-"), config.get("cudagraph_mode", "?"),
                     config.get("compiler", "?"), "break" if g.record.get("graph_break") else "return",
                     str(len(pieces[0]["inputs"])) if pieces else "-", str(len(g.swaps[0])),
                     str(kernels) if any(p.get("inductor") for p in pieces) else "-", str(len(g.capture))))
    table = Table(title="graphs", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    spare = console.width - sum(widths) + widths[1] - 2 * len(header)  # the function name takes what is left
    for i, column in enumerate(header):
        table.add_column(column, no_wrap=True, overflow="ellipsis", min_width=None if i == 1 else widths[i],
                         max_width=max(spare, 8) if i == 1 else None)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for g in dump.graphs:
        console.rule(f"graph {g.name}  ({os.path.relpath(g.folder, dump.root)}/)")
        for p in g.passes:
            console.print(f"[bold]{p['name']}[/bold] -> {p['graph']}")
            console.print("  " + p["summary"].replace("\n", "\n  "), markup=False, highlight=False)
        swapped, left = g.swaps
        if swapped:
            swaps = Table(title=f"{g.name}: attention swap")
            for column in ("node", "layer", "impl", "reads"):
                swaps.add_column(column, overflow="fold")
            for s in swapped:
                swaps.add_row(s["node"], str(s["layer_idx"]), s["impl"], ", ".join(s["reads"]))
            console.print(swaps)
        for node, why in left:
            console.print(f"  left alone: {node}: {why}", markup=False, highlight=False)
        if g.capture:
            capture = Table(title=f"{g.name}: capture")
            for column in ("size", "kind", "warmup ms", "capture ms", "pool MiB"):
                capture.add_column(column, justify="right")
            for r in g.capture:
                capture.add_row(str(r["size"]), r["kind"], f"{r['warmup_ms']:.2f}", f"{r['capture_ms']:.2f}",
                                f"{r['pool_mib']:.2f}")
            console.print(capture)
        for i, piece in enumerate(g.record.get("pieces", [])):
            if piece.get("output_code"):
                calls = {**piece.get("extern_kernels", {}), **piece.get("custom_op_calls", {})}
                console.print(f"  output code: {piece['inductor']}/{piece['output_code']}: "
                              f"{sum(piece.get('generated_kernels', {}).values())} generated kernel(s); calls "
                              + (", ".join(f"{k} x{v}" for k, v in calls.items()) or "none"),
                              markup=False, highlight=False)
    found = warnings_of(dump)
    console.rule("warnings")
    for w in found:
        console.print(Text("! ", style="yellow") + Text(w))
    if not found:
        console.print("[green]no warnings[/green]: no KV-cache copies, fallbacks, graph breaks or recompiles")


def _json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""

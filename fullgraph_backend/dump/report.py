"""Reading a dump folder back: the graphs, their passes and swaps, capture tables, and warnings.

Every JSON file is checked against :mod:`fullgraph_backend.dump.schema` and every file name in
it is located inside the folder (:mod:`fullgraph_backend.dump.files`) while loading, so a bad
dump fails in :func:`load_dump` with a :class:`DumpError`, before anything is shown.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from fullgraph_backend.dump import files, manifest, schema

DYNAMO_GRAPH = "00_dynamo_graph.py"


@dataclass
class GraphInfo:
    """One compiled graph of a dump: its ``graph.json``, ``passes.json`` and ``capture.json``, checked."""

    folder: str  # absolute
    record: dict
    passes: list[dict]
    capture: list[dict]
    graph_files: list[tuple[str, str]]  # (label, path): the graph as Dynamo gave it, then after each pass
    code_files: list[tuple[str, str]]  # ("<trace folder>/<file>", path): each piece's Inductor output code

    @property
    def compile_id(self) -> str:
        return self.record["compile_id"] or os.path.basename(self.folder)

    @property
    def name(self) -> str:
        """The compile id, with the folder's ``.N`` suffix when the id repeats in this dump."""
        base = os.path.basename(self.folder)
        return self.compile_id + base[base.index("."):] if "." in base else self.compile_id

    @property
    def occurrence(self) -> int:
        """0 for the first graph with this compile id in the dump, 1 for ``<id>.1``..."""
        suffix = os.path.basename(self.folder).rpartition(".")[2]
        return int(suffix) if "." in os.path.basename(self.folder) and suffix.isdecimal() else 0

    @property
    def swaps(self) -> tuple[list[dict], list[list[str]]]:
        """Swapped attention nodes and (node, why) left alone, from the attention swap's report."""
        for p in self.passes:
            if isinstance(p["report"], dict) and "swapped" in p["report"]:
                return p["report"]["swapped"], p["report"]["left_alone"]
        return [], []


@dataclass
class Dump:
    """A dump folder, read."""

    root: str
    manifest: dict
    graphs: list[GraphInfo]
    dynamo: list[dict]


def load_dump(root: str) -> Dump:
    """Read dump folder ``root``; :class:`~fullgraph_backend.dump.schema.DumpError` if it is none or is bad."""
    m = manifest.read(root)
    graphs = [_load_graph(root, i, entry) for i, entry in enumerate(m["graphs"])]
    return Dump(os.path.abspath(root), m, graphs, files.read_json(root, manifest.DYNAMO_RECORD, schema.DYNAMO, []))


def _load_graph(root: str, index: int, entry: dict) -> GraphInfo:
    folder = entry["folder"]
    path = files.locate(root, folder, f"{manifest.MANIFEST}: graphs[{index}].folder")

    def name(file: str) -> str:
        return os.path.join(folder, file)

    record = files.read_json(root, name(manifest.GRAPH_RECORD), schema.GRAPH_RECORD,
                             {"compile_id": entry["compile_id"]})
    passes = files.read_json(root, name("passes.json"), schema.PASSES, {})["passes"]
    for i, p in enumerate(passes):
        if isinstance(p["report"], dict) and "swapped" in p["report"]:
            p["report"] = schema.checked(p["report"], schema.SWAP_REPORT, name("passes.json"), f"passes[{i}].report")
    graph_files = []
    if passes or os.path.exists(os.path.join(path, DYNAMO_GRAPH)):
        graph_files = [("dynamo graph", files.locate(root, name(DYNAMO_GRAPH), name(DYNAMO_GRAPH)))]
        graph_files += [(p["name"], files.locate(root, name(p["graph"]), f"{name('passes.json')}: passes[{i}].graph"))
                        for i, p in enumerate(passes)]
    code_files = [(f"{piece['inductor']}/{piece['output_code']}",
                   files.locate(root, name(os.path.join(piece["inductor"], piece["output_code"])),
                                f"{name(manifest.GRAPH_RECORD)}: pieces[{i}].output_code"))
                  for i, piece in enumerate(record["pieces"]) if piece["inductor"] and piece["output_code"]]
    capture = files.read_json(root, name("capture.json"), schema.CAPTURE, [])
    return GraphInfo(path, record, passes, capture, graph_files, code_files)


def dynamo_record(dump: Dump, g: GraphInfo) -> dict:
    """Dynamo's record of the frame compile that produced ``g`` ({} without dump_compilation)."""
    same_id = [r for r in dump.dynamo if r["compile_id"] == g.compile_id and not r["fail_type"]]
    return same_id[g.occurrence] if g.occurrence < len(same_id) else {}


def warnings_of(dump: Dump) -> list[str]:
    """What deserves a look: KV-cache copies, leftover functionalization, fallbacks, breaks, recompiles."""
    found = []
    for g in dump.graphs:
        for i, piece in enumerate(g.record["pieces"]):
            where = g.name if len(g.record["pieces"]) == 1 else f"{g.name} piece {i}"
            clones, backs = piece["kv_cache_clones"], piece["kv_cache_copy_backs"]
            if clones or backs or piece["kv_cache_copies_in_output_code"]:
                found.append(f"{where}: KV cache cloned {len(clones)}x / copied back {len(backs)}x in the post-grad "
                             f"graph ({', '.join(sorted(set(clones + backs)))}), "
                             f"{piece['kv_cache_copies_in_output_code']} clone/copy line(s) in the output "
                             f"code: an in-place cache update was not reinplaced, so every step copies the cache")
            if piece["auto_functionalized"]:
                found.append(f"{where}: {piece['auto_functionalized']} auto_functionalized node(s) left in the "
                             f"post-grad graph (mutations not reinplaced)")
            if piece["aten_fallbacks"]:
                calls = ", ".join(f"{k} x{v}" for k, v in piece["aten_fallbacks"].items())
                found.append(f"{where}: aten fallback(s) in the output code (not lowered by Inductor): {calls}")
        if g.record["graph_break"]:
            found.append(f"graph break: graph {g.name} ends early: {_first_line(g.record['graph_break'])}")
        frame, _, count = g.compile_id.partition("/")
        if count.isdecimal() and int(count) > 0:
            reason = dynamo_record(dump, g).get("recompile_reason")
            found.append(f"recompile: graph {g.name} is compile {int(count) + 1} of frame {frame}"
                         + (f": {_first_line(reason)}" if reason else ""))
    for r in dump.dynamo:
        if r["fail_type"]:
            found.append(f"graph break: frame {r['compile_id']} ({r['function']} at {r['where']}) was not "
                         f"compiled ({r['fail_type']}): {_first_line(r['fail_reason'] or '')}")
    return found


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""

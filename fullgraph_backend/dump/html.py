"""One static HTML page of a dump: per graph, the code before and after each pass side by side."""
from __future__ import annotations

import difflib
import html
import os

from fullgraph_backend.dump import files
from fullgraph_backend.dump.report import Dump, GraphInfo, warnings_of

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
pre, table.diff { font-family: monospace; font-size: 12px; }
table.diff { border-collapse: collapse; width: 100%; table-layout: fixed; }
table.diff td { vertical-align: top; white-space: pre-wrap; word-break: break-all; padding: 0 4px; }
table.diff td.diff_header { width: 3em; color: #888; text-align: right; }
table.diff .diff_next { display: none; }
.diff_add { background: #dfd; } .diff_chg { background: #ffa; } .diff_sub { background: #fdd; }
table.grid { border-collapse: collapse; margin: .5em 0; }
table.grid td, table.grid th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
.warn { color: #a60; } section { border-top: 2px solid #444; margin-top: 2em; }
"""


def write_html(dump: Dump, path: str) -> str:
    """Write ``path``: a self-contained page (inline CSS, no scripts or external assets).

    Everything read from the dump is HTML-escaped, file contents and names included.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fullgraph dump {_e(dump.root)}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>fullgraph dump</h1><p>{_e(dump.root)}: {len(dump.graphs)} graph(s), "
             f"torch {_e(dump.manifest['torch'])}</p>", "<h2>warnings</h2>"]
    found = warnings_of(dump)
    parts.append("<ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in found) + "</ul>" if found
                 else "<p>none</p>")
    parts += [_graph_section(dump.root, g) for g in dump.graphs]
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def _graph_section(root: str, g: GraphInfo) -> str:
    out = [f"<section id='graph-{_e(g.name)}'><h2>graph {_e(g.name)}</h2>"]
    if g.record["graph_break"]:
        out.append(f"<p class='warn'>ends at a graph break: {_e(g.record['graph_break'])}</p>")
    swapped, left = g.swaps
    if swapped or left:
        rows = [[s["node"], s["layer_idx"], s["impl"], ", ".join(s["reads"])] for s in swapped]
        out.append(_table(["node", "layer", "impl", "reads"], rows))
        out += [f"<p>left alone: {_e(node)}: {_e(why)}</p>" for node, why in left]
    out += [f"<p>regional compile: {_e(report['summary'])}</p>" for report in g.record["regions"]]
    files = g.graph_files
    for (before_label, before), (label, after), p in zip(files, files[1:], g.passes):
        out.append(f"<h3>{_e(p['name'])}: {_e(os.path.basename(before))} &rarr; {_e(os.path.basename(after))}</h3>")
        out.append(f"<pre>{_e(p['summary'])}</pre>")
        # HtmlDiff escapes the lines but not the two column labels
        out.append(difflib.HtmlDiff(tabsize=4).make_table(_lines(root, before), _lines(root, after),
                                                          _e(before_label), _e(label)))
    if g.capture:
        out.append("<h3>capture</h3>" + _table(["size", "kind", "warmup ms", "capture ms", "pool MiB"],
                                               [[r["size"], r["kind"], f"{r['warmup_ms']:.2f}",
                                                 f"{r['capture_ms']:.2f}", f"{r['pool_mib']:.2f}"] for r in g.capture]))
    for label, code in g.code_files:
        out.append(f"<details><summary>Inductor output code: {_e(label)}</summary>"
                   f"<pre>{_e(''.join(_lines(root, code)))}</pre></details>")
    out.append("</section>")
    return "\n".join(out)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='grid'><tr>{head}</tr>{body}</table>"


def _lines(root: str, path: str) -> list[str]:
    name = os.path.relpath(path, root)
    text = files.read_text(path, name)
    return [f"({name} is missing)\n"] if text is None else text.splitlines(keepends=True)


def _e(value: object) -> str:
    return html.escape(str(value))

"""The dump root's marker file, ``fullgraph_dump.json``: what a dump holds, refreshed on every write.

::

    {"format": "fullgraph-dump", "version": 1, "torch": "2.13.0+cpu",
     "graphs": [{"compile_id": "0/0", "folder": "0_0", "files": ["00_dynamo_graph.py", ...]}],
     "depyf": ["depyf/full_code_for_forward_0.py", ...],
     "dynamo": "dynamo.json"}
"""
from __future__ import annotations

import json
import os

import torch

from fullgraph_backend.dump import files, schema
from fullgraph_backend.dump.schema import DumpError

MANIFEST = "fullgraph_dump.json"
FORMAT = "fullgraph-dump"
VERSION = 1
GRAPH_RECORD = "graph.json"
DYNAMO_RECORD = "dynamo.json"
DEPYF_FOLDER = "depyf"


def update(root: str, compile_id: str | None = None, folder: str | None = None) -> dict:
    """Add graph ``folder`` (if given) to the manifest of ``root`` and refresh every file list."""
    os.makedirs(root, exist_ok=True)
    manifest = _load(root) or {"format": FORMAT, "version": VERSION, "torch": torch.__version__, "graphs": []}
    if folder is not None and all(g["folder"] != folder for g in manifest["graphs"]):
        manifest["graphs"].append({"compile_id": compile_id, "folder": folder})
    for i, graph in enumerate(manifest["graphs"]):
        graph["files"] = files_under(files.locate(root, graph["folder"], f"{MANIFEST}: graphs[{i}].folder"))
    manifest["depyf"] = [os.path.join(DEPYF_FOLDER, f) for f in files_under(os.path.join(root, DEPYF_FOLDER))]
    manifest["dynamo"] = DYNAMO_RECORD if os.path.exists(os.path.join(root, DYNAMO_RECORD)) else None
    files.write_text(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def read(root: str) -> dict:
    """The manifest of dump folder ``root``; a :class:`DumpError` saying what is wrong otherwise."""
    if not os.path.isdir(root):
        raise DumpError(f"no such folder: {root}")
    manifest = _load(root)
    if manifest is None:
        raise DumpError(f"{root} is not a fullgraph dump (it has no {MANIFEST}); make one with "
                        f"torch.compile(..., backend='fullgraph', options={{'dump_dir': ...}}), "
                        f"fullgraph_backend.dump.dump_compilation(...) or `fullgraph demo --dump-dir ...`")
    return manifest


def files_under(folder: str) -> list[str]:
    """Every file below ``folder``, relative to it, sorted; [] when it does not exist."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(parent, n), folder) for n in names if not n.endswith(".lock")]
    return sorted(found)


def _load(root: str) -> dict | None:
    """The checked manifest of ``root``, None if it has none; a foreign format is a DumpError."""
    manifest = files.read_json(root, MANIFEST, schema.ANY, None)
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise DumpError(f"{os.path.join(root, MANIFEST)} is not a fullgraph dump manifest (format {found!r:.80})")
    return schema.checked(manifest, schema.MANIFEST, MANIFEST)

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

MANIFEST = "fullgraph_dump.json"
FORMAT = "fullgraph-dump"
VERSION = 1
GRAPH_RECORD = "graph.json"
DYNAMO_RECORD = "dynamo.json"
DEPYF_FOLDER = "depyf"


class DumpError(Exception):
    """A folder that cannot be read as a fullgraph dump."""


def update(root: str, compile_id: str | None = None, folder: str | None = None) -> dict:
    """Add graph ``folder`` (if given) to the manifest of ``root`` and refresh every file list."""
    path = os.path.join(root, MANIFEST)
    manifest = _load(path) if os.path.exists(path) else {"format": FORMAT, "version": VERSION,
                                                          "torch": torch.__version__, "graphs": []}
    if folder is not None and all(g["folder"] != folder for g in manifest["graphs"]):
        manifest["graphs"].append({"compile_id": compile_id, "folder": folder})
    for graph in manifest["graphs"]:
        graph["files"] = files_under(os.path.join(root, graph["folder"]))
    manifest["depyf"] = [os.path.join(DEPYF_FOLDER, f) for f in files_under(os.path.join(root, DEPYF_FOLDER))]
    manifest["dynamo"] = DYNAMO_RECORD if os.path.exists(os.path.join(root, DYNAMO_RECORD)) else None
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read(root: str) -> dict:
    """The manifest of dump folder ``root``; a :class:`DumpError` saying what is wrong otherwise."""
    if not os.path.isdir(root):
        raise DumpError(f"no such folder: {root}")
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        raise DumpError(f"{root} is not a fullgraph dump (it has no {MANIFEST}); make one with "
                        f"torch.compile(..., backend='fullgraph', options={{'dump_dir': ...}}), "
                        f"fullgraph_backend.dump.dump_compilation(...) or `fullgraph demo --dump-dir ...`")
    manifest = _load(path)
    if manifest.get("format") != FORMAT:
        raise DumpError(f"{path} is not a fullgraph dump manifest (format {manifest.get('format')!r})")
    return manifest


def files_under(folder: str) -> list[str]:
    """Every file below ``folder``, relative to it, sorted; [] when it does not exist."""
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(parent, n), folder) for n in names if not n.endswith(".lock")]
    return sorted(found)


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DumpError(f"cannot read {path}: {e}") from e

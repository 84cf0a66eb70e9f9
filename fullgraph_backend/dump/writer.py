"""Writing a dump: the backend fills one folder per compiled graph, ``<root>/<compile id>/``.

The backend opens a :class:`GraphDump` for every graph Dynamo hands it and passes it along:
the pass manager writes the graphs into ``dump.folder``, ``dump.compiler(...)`` wraps each
Inductor call (trace on, caches off, leftovers inspected), the regional compiler reports each graph's
regions to ``dump.write_regions``, and the graph runner calls ``dump.write_capture_table`` after
each capture loop. When nothing is dumped, ``folder`` is None
and every method does nothing, so the backend calls them unconditionally.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Callable, Iterator

import torch

from fullgraph_backend import compat
from fullgraph_backend.dump import files, leftovers, manifest
from fullgraph_backend.dump.quiet import quiet_third_party

_active_root: str | None = None  # set by dump_compilation(); the dump_dir option wins over it


@contextlib.contextmanager
def dumping_into(root: str) -> Iterator[None]:
    """Graphs compiled in the block without a ``dump_dir`` option are dumped into ``root``."""
    global _active_root
    previous, _active_root = _active_root, root
    try:
        yield
    finally:
        _active_root = previous


class GraphDump:
    """One compiled graph's dump folder, or a stand-in that writes nothing (``folder`` None)."""

    def __init__(self, root: str | None, folder: str | None, record: dict) -> None:
        self.root, self.folder, self.record = root, folder, record

    @classmethod
    def open(cls, config, gm: torch.fx.GraphModule) -> "GraphDump":
        """Start the dump of Dynamo graph ``gm`` (before any pass) under ``config.dump_dir``.

        Without the option, the folder of an enclosing :func:`dump_compilation` is used; with
        neither, nothing is dumped. A second graph with the same compile id (after
        ``torch._dynamo.reset()``) gets ``<id>.1``, ``<id>.2``...
        """
        root = config.dump_dir or _active_root
        if root is None:
            return cls(None, None, {})
        compile_id = compat.compile_id(gm)
        name = _free_name(root, compile_id.replace("/", "_").replace("!", "ca") if compile_id else "graph")
        os.makedirs(os.path.join(root, name))
        record = {"compile_id": compile_id, "folder": name, "graph_break": compat.graph_break_reason(gm),
                  "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
                  "pieces": [], "regions": []}
        dump = cls(root, os.path.join(root, name), record)
        dump._save()
        return dump

    def compiler(self, compile_fn: Callable) -> Callable:
        """``compile_fn`` with Inductor's trace written into this folder and inspected afterwards."""
        if self.folder is None:
            return compile_fn

        def compile_and_inspect(gm: torch.fx.GraphModule, example_inputs: list):
            traces = os.path.join(self.folder, "torchinductor")
            before = set(os.listdir(traces)) if os.path.isdir(traces) else set()
            with quiet_third_party(), torch._inductor.config.patch(compat.inductor_trace_patches(self.folder)):
                compiled = compile_fn(gm, example_inputs)
            new = sorted(set(os.listdir(traces)) - before) if os.path.isdir(traces) else []
            inputs = list(gm.graph.find_nodes(op="placeholder"))
            piece = {"inputs": [_describe(n) for n in inputs], "inductor": None}
            if new:  # Inductor ran (not compiler="eager"): one trace folder per compile
                trace = os.path.join(traces, new[-1])
                piece["inductor"] = os.path.relpath(trace, self.folder)
                piece.update(leftovers.inspect_trace(trace, [n.name for n in inputs]))
            self.record["pieces"].append(piece)
            self._save()
            return compiled

        return compile_and_inspect

    def write_regions(self, report) -> None:
        """Keep, in graph.json, how the compiler cut one graph it was handed into regions: a
        :class:`~fullgraph_backend.regions.RegionReport` (each region's compile is an index into
        ``pieces``; regions sharing one reused its code)."""
        if self.folder is None:
            return
        self.record["regions"].append({"regions": [list(r) for r in report.regions], "why_not": report.why_not,
                                       "summary": report.summary()})
        self._save()

    def write_capture_table(self, table: list) -> None:
        """Write the runner's capture table (rows of ``CaptureRecord``) as capture.json / .txt."""
        if self.folder is None:
            return
        rows = [dataclasses.asdict(r) for r in table]
        files.write_text(os.path.join(self.folder, "capture.json"), json.dumps(rows, indent=1))
        lines = [f"{'size':>6} {'kind':<7} {'warmup ms':>10} {'capture ms':>11} {'pool MiB':>9}"]
        lines += [f"{str(r['size']):>6} {r['kind']:<7} {r['warmup_ms']:>10.2f} {r['capture_ms']:>11.2f} "
                  f"{r['pool_mib']:>9.2f}" for r in rows]
        files.write_text(os.path.join(self.folder, "capture.txt"), "\n".join(lines) + "\n")
        manifest.update(self.root)

    def _save(self) -> None:
        record = json.dumps(self.record, indent=1, default=str)
        files.write_text(os.path.join(self.folder, manifest.GRAPH_RECORD), record)
        manifest.update(self.root, self.record["compile_id"], self.record["folder"])


def _free_name(root: str, name: str) -> str:
    # lexists: a dangling symlink planted under a name takes it too (makedirs would fail on it)
    taken = lambda n: os.path.lexists(os.path.join(root, n))  # noqa: E731
    if not taken(name):
        return name
    return next(f"{name}.{i}" for i in range(1, 10_000) if not taken(f"{name}.{i}"))


def _describe(node: torch.fx.Node) -> dict:
    """A placeholder: name, ``dtype[shape]`` (or ``Sym(...)``), and whether its shape is symbolic."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor):
        shape = ", ".join(str(d) for d in value.shape)
        return {"name": node.name, "type": f"{str(value.dtype).removeprefix('torch.')}[{shape}]",
                "symbolic": not all(isinstance(d, int) for d in value.shape)}
    if isinstance(value, torch.SymInt):
        return {"name": node.name, "type": f"Sym({value})", "symbolic": True}
    return {"name": node.name, "type": type(value).__name__ if value is not None else "?", "symbolic": False}

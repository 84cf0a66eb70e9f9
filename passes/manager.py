"""Run the graph passes in order, keep what each reported, and dump the graphs if asked."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from fullgraph_backend.dump.files import write_text


@dataclass
class PassResult:
    """One pass's outcome: its report object, a one-screen summary and the graph it left."""

    name: str
    report: object
    summary: str
    code_after: str


class PassManager:
    """Runs ``(name, fn)`` passes over a graph module in place; ``fn(gm)`` returns its report.

    With ``dump_dir`` (the backend hands it one folder per compiled graph), writes the graph as
    received (``00_dynamo_graph.py``), the graph after each pass (``NN_<name>.py``),
    ``passes.txt`` with every summary and ``passes.json`` with every report as data.
    """

    def __init__(self, passes: list[tuple[str, Callable[[torch.fx.GraphModule], object]]],
                 dump_dir: str | None = None) -> None:
        self.passes, self.dump_dir = passes, dump_dir

    def run(self, gm: torch.fx.GraphModule) -> list[PassResult]:
        """Apply every pass to ``gm`` in order and return their results."""
        results = []
        self._write("00_dynamo_graph.py", gm.code)
        for i, (name, fn) in enumerate(self.passes, start=1):
            report = fn(gm)
            summary = report.summary() if hasattr(report, "summary") else str(report)
            results.append(PassResult(name, report, summary, gm.code))
            self._write(f"{i:02d}_{name}.py", gm.code)
        self._write("passes.txt", "\n\n".join(f"== {r.name}\n{r.summary}" for r in results) + "\n")
        self._write("passes.json", json.dumps({
            "input": "00_dynamo_graph.py",
            "passes": [{"name": r.name, "graph": f"{i:02d}_{r.name}.py", "summary": r.summary,
                        "report": _as_data(r.report)} for i, r in enumerate(results, start=1)]}, indent=1))
        return results

    def _write(self, name: str, text: str) -> None:
        if self.dump_dir:
            os.makedirs(self.dump_dir, exist_ok=True)
            write_text(os.path.join(self.dump_dir, name), text)


def _as_data(value: object) -> object:
    """A pass report as JSON data: dataclasses by field, tensors as ``dtype[shape]``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, dict):
        return {str(k): _as_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_data(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)

"""Run the graph passes in order, keep what each reported, and dump the graphs if asked."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PassResult:
    """One pass's outcome: its report object, a one-screen summary and the graph it left."""

    name: str
    report: object
    summary: str
    code_after: str


class PassManager:
    """Runs ``(name, fn)`` passes over a graph module in place; ``fn(gm)`` returns its report.

    With ``dump_dir``, writes the graph as received (``00_dynamo_graph.py``), the graph after each
    pass (``NN_<name>.py``) and ``passes.txt`` with every summary.
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
        return results

    def _write(self, name: str, text: str) -> None:
        if self.dump_dir:
            os.makedirs(self.dump_dir, exist_ok=True)
            with open(os.path.join(self.dump_dir, name), "w") as f:
                f.write(text)


def eliminate_dead_code(gm: torch.fx.GraphModule) -> str:
    """Drop nodes nothing uses (Dynamo's leftover shape checks); mutating ops are kept."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return f"removed {before - len(gm.graph.nodes)} dead node(s)"

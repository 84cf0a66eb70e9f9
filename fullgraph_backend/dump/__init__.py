"""FX graph dumps: see what the backend did to a model, graph by graph.

Produce one with ``torch.compile(..., backend="fullgraph", options={"dump_dir": DIR})`` (or the
``FULLGRAPH_DUMP_DIR`` environment variable): graphs before/after each pass, Inductor's trace
and leftovers, the capture table. Wrap the first calls in :func:`dump_compilation` to add
depyf's decompiled bytecode and guards and Dynamo's per-frame records. Read one with
``fullgraph dump DIR [--html OUT.html]`` or :func:`load_dump` / :func:`print_overview`.
"""
from fullgraph_backend.dump.compilation import dump_compilation
from fullgraph_backend.dump.html import write_html
from fullgraph_backend.dump.overview import print_overview
from fullgraph_backend.dump.report import Dump, GraphInfo, load_dump, warnings_of
from fullgraph_backend.dump.schema import DumpError

__all__ = ["dump_compilation", "write_html", "DumpError", "Dump", "GraphInfo", "load_dump", "print_overview",
           "warnings_of"]

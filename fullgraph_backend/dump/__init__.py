"""FX graph dumps: see what the backend did to a model, graph by graph.

Produce one with ``torch.compile(..., backend="fullgraph", options={"dump_dir": DIR})`` (or the
``FULLGRAPH_DUMP_DIR`` environment variable): graphs before/after each pass, Inductor's trace
and leftovers, the capture table. Wrap the first calls in :func:`dump_compilation` to add
depyf's decompiled bytecode and guards and Dynamo's per-frame records. Read one with
``fullgraph dump DIR [--html OUT.html]`` or :func:`load_dump` / :func:`print_overview`.
"""
import importlib

# public name -> its module. Imported on first use (PEP 562): the backend imports ``dump.writer``
# with every engine, and the readers (rich tables, about 0.1 s to import) serve the tools only.
_EXPORTS = {"dump_compilation": "compilation", "write_html": "html", "print_overview": "overview",
            "Dump": "report", "GraphInfo": "report", "load_dump": "report", "warnings_of": "report",
            "DumpError": "schema"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """``fullgraph_backend.dump.<name>``, importing its module."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

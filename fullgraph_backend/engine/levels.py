"""Optimization levels -O0..-O4: one dict from level to the backend options it implies.

| level | compile  | CUDA graphs                                               |
|-------|----------|-----------------------------------------------------------|
| -O0   | none     | none (the eager model)                                    |
| -O1   | Inductor | none                                                      |
| -O2   | Inductor | piecewise (split at attention) for every batch            |
| -O3   | Inductor | full graphs for uniform-decode batches, piecewise for mixed |
| -O4   | Inductor | one full graph for every batch, decode and mixed          |

``cudagraph_mode`` (``none``, ``piecewise``, ``full_and_piecewise``, ``full``) overrides the
level's choice, as vLLM's ``-O.cudagraph_mode=...`` does; ``compile_options`` (any
``torch.compile(backend="fullgraph", options=...)`` key) override both.
"""
from __future__ import annotations

from fullgraph_backend.config import CUDAGRAPH_MODES

# level -> torch.compile(backend="fullgraph") options; None runs the model eagerly
OPTIMIZATION_LEVELS: dict[int, dict | None] = {
    0: None,
    1: {"cudagraph_mode": "none"},
    2: {"cudagraph_mode": "piecewise"},
    3: {"cudagraph_mode": "full_and_piecewise"},
    4: {"cudagraph_mode": "full"},
}


def backend_options(level: int, cudagraph_mode: str | None = None,
                    compile_options: dict | None = None) -> dict | None:
    """The backend options for ``level`` with the overrides applied; None means eager.

    Raises ValueError for an unknown level or mode, or a graph mode without compilation.
    """
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization_level must be one of {sorted(OPTIMIZATION_LEVELS)}, got {level!r}")
    if cudagraph_mode is not None and cudagraph_mode not in CUDAGRAPH_MODES:
        raise ValueError(f"cudagraph_mode must be one of {list(CUDAGRAPH_MODES)}, got {cudagraph_mode!r}")
    preset = OPTIMIZATION_LEVELS[level]
    if preset is None:
        if cudagraph_mode not in (None, "none") or compile_options:
            raise ValueError(f"-O0 runs the model eagerly: cudagraph_mode={cudagraph_mode!r} and compile_options "
                             f"need compilation (optimization_level >= 1)")
        return None
    return {**preset, **({"cudagraph_mode": cudagraph_mode} if cudagraph_mode else {}), **(compile_options or {})}

"""Programmatic dependent launch (PDL) for our Triton kernels and Inductor's: which launches take it.

On Hopper and later a kernel launched with PDL (``launch_pdl=True``, the CUDA launch attribute
"programmatic stream serialization") may start while the kernel before it on the stream is still
running, once every program of that kernel has signalled ``gdc_launch_dependents`` (or exited).
Before it reads anything the previous kernel wrote, it must ``gdc_wait`` (PTX
``griddepcontrol.wait``: all prerequisite grids complete, their writes visible). What comes before
the wait overlaps the previous kernel's tail and the launch gap: our GEMV issues its first weight
loads there, which depend on no kernel. Stream capture turns the launch attribute into a
programmatic edge of the CUDA graph (docs/perf-notes.md, section 18, has the sources;
``tests/test_pdl.py`` checks it on a GPU).

Rules our kernels keep, so the chain stays ordered however its neighbours launch:
- every program waits before its first load of another kernel's output and before its first store
  (a buffer it writes may be one the previous kernel still reads: graphs reuse pool memory);
- so a PDL kernel never completes before the kernel before it, and a wait on it covers them all;
- ``gdc_launch_dependents`` comes right after the wait, never before it. Inductor's kernels
  (``triton.enable_pdl``) wait before their first access only if it touches a buffer *the kernel
  just before* wrote (or, for a store, read); otherwise after their first load. So a kernel after
  ours may read, unwaited, what the kernel before ours wrote. Triggering after our wait means that
  kernel is complete by the time the next one launches. (Triggering first, as we did until
  perf-notes section 35, left that window open.)

The backend turns PDL on for the compiled calls of a ``pdl=True`` config (:func:`launches`), and
for Inductor's kernels in the graphs it compiles for capture (their own wait-then-trigger);
the kernel wrappers ask :func:`enabled` at launch, i.e. at warm-up and capture of each graph.
Inductor waits after a kernel's first load at the latest, so a kernel with no load at all (a fill,
an ``arange``) never waits: it may finish before the kernel before it, and the kernel after it then
launches early enough to read that kernel's output unfinished. A graph whose Inductor code has such
a kernel is compiled again without Inductor's PDL (:func:`unwaited`; the backend logs it).
Kernels call this module's ``gdc_wait`` and ``gdc_launch_dependents``: Triton's, or no-ops where
it has none (older Triton) or interprets, under a ``PDL`` constexpr (:func:`kernel_flag`).
"""
from __future__ import annotations

import contextlib
import functools
import re
from contextvars import ContextVar
from typing import Callable, Iterator

import torch

from fullgraph_backend import compat

try:
    import triton
    import triton.language as tl  # noqa: F401  (the interpreter wants it visible to the jitted no-ops)
except ImportError:  # optional: without Triton no kernel of ours runs
    triton = gdc_wait = gdc_launch_dependents = None

if triton is not None and compat.triton_has_pdl():
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
elif triton is not None:  # no PDL in this Triton, or its interpreter: the PDL path runs with no-op waits
    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

_PDL: ContextVar[bool] = ContextVar("fullgraph_pdl", default=False)


@contextlib.contextmanager
def launches(pdl: bool = True) -> Iterator[None]:
    """Kernels our wrappers launch inside this block use PDL where :func:`supported` (or not, for
    ``pdl=False``). Example::

        with pdl.launches():
            y = gemv(x, w)  # launch_pdl=True on an H100 or H200
    """
    token = _PDL.set(pdl)
    try:
        yield
    finally:
        _PDL.reset(token)


def enabled(device: torch.device) -> bool:
    """Whether a kernel launched now on ``device`` takes PDL: asked for and :func:`supported`."""
    return _PDL.get() and supported(device)


def with_launches(fn: Callable, pdl: bool) -> Callable:
    """``fn`` running under ``launches(pdl)``: what the backend wraps each compiled graph in."""
    if not pdl:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with launches(True):
            return fn(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=None)
def supported(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later, with a Triton that has PDL (not interpreting)."""
    return (device.type == "cuda" and compat.triton_has_pdl()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def unwaited(sources: list[tuple[str, str]]) -> list[str]:
    """Names of the Inductor kernels in ``sources`` (``(name, Triton source)``, as
    :func:`fullgraph_backend.compat.inductor_triton_sources` records them) that launch with PDL and
    have programs that never call ``gdc_wait``. A combo kernel (``combo_kernels``) runs each part in
    programs of their own (``if pid < num_xblocks_0:`` ... ``elif``), so every part must wait."""
    return [name for name, source in sources
            if "'launch_pdl': True" in source and not all("gdc_wait()" in part for part in _program_parts(source))]


# a combo kernel's dispatch, as torch 2.11 and 2.13 write it (triton_combo_kernel.py, both dispatchers)
_COMBO_BRANCH = re.compile(r"^\s*(?:if|elif) pid < num_\w*blocks_\d+:\s*$", re.MULTILINE)


def _program_parts(source: str) -> list[str]:
    """The code each part of a kernel's programs runs: the whole source, or a combo kernel's branches."""
    starts = [m.end() for m in _COMBO_BRANCH.finditer(source)]
    return [source[a:b] for a, b in zip(starts, starts[1:] + [len(source)])] or [source]


def kernel_flag(requested: bool, device: torch.device) -> bool:
    """The ``PDL`` constexpr of our kernels: the waits and early loads of the PDL path. Off on a CUDA
    device without PDL (``griddepcontrol`` needs sm_90); on CPU (Triton's interpreter) the path runs
    with no-op waits, so CPU tests cover its control flow."""
    return requested and (device.type == "cpu" or supported(device))

"""tools/bench_startup.py: the compile's phases read from Dynamo's compile times."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from bench_startup import phase_seconds  # noqa: E402

PHASES = {"trace": "bytecode_tracing", "load": "AOTAutogradCache.inductor_load", "absent": "no_such_key"}


def test_phases_from_the_plain_format_and_from_tabulates_table():
    """Without tabulate the lines are ``key, t1, t2``; with it (the GPU machine) a padded table,
    which the first version of the parser read as all zeros."""
    plain = "TorchDynamo compilation metrics:\nFunction, Runtimes (s)\nbytecode_tracing, 5.1511\n" \
            "AOTAutogradCache.inductor_load, 0.0362, 0.0308, 0.0170"
    table = "TorchDynamo compilation metrics:\nFunction                        Runtimes (s)\n" \
            "------------------------------  ------------------------\n" \
            "bytecode_tracing                5.1511\n" \
            "AOTAutogradCache.inductor_load  0.0362, 0.0308, 0.0170\n"
    want = {"trace": 5.151, "load": 0.084, "absent": 0.0}
    assert phase_seconds(plain, PHASES) == want
    assert phase_seconds(table, PHASES) == want


def test_phases_of_a_real_compile():
    torch._dynamo.reset()
    torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.randn(3))
    assert phase_seconds(torch._dynamo.utils.compile_times(repr="str"), PHASES)["trace"] > 0

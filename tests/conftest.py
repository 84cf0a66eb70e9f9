"""pytest hooks and fixtures; the helpers tests share live in helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in its interpreter; set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns at each compile while this is unset, and 3.10 turns FP fusion off by default: the
# tests compile as every Triton before 3.10 did (and the GPU machine's 3.6 does)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from helpers import RunnerCapture  # noqa: E402  (imports fullgraph_backend: after the environment is set)


# ---- markers ------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip without CUDA (another helper may add the same; the skip is idempotent)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not any(m.name == "skip" for m in item.iter_markers()):
            item.add_marker(skip)


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def dynamo_reset():
    """Every test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture()
def seeded():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture()
def capture_backend():
    return RunnerCapture

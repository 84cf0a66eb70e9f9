"""The ``fullgraph`` command line: the demo job end to end on the tiny model (CPU)."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.utils.cpp_extension

from fullgraph_backend.cli import main
from fullgraph_backend.demo import ModeResult, check, no_cuda_runtime_notice, run_modes, token_agreement
from fullgraph_backend.models import build_model, get_config


def test_demo_runs_every_mode_and_matches_eager(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # a pipe: rich lays out 80 columns
    code = main(["demo", "--device", "cpu", "--batch", "3", "--prompt-len", "9", "--steps", "3",
                 "--modes", "eager,none,piecewise,full", "--compiler", "eager"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert list(rows) == ["eager", "none", "piecewise", "full"]
    assert all("100%" in rows[mode] for mode in ("none", "piecewise", "full")), out
    assert "emulated graphs" in out and "CUDA graphs" not in out
    assert "timings vary widely" in out and "float32 must give 100%" in out
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80, out


def test_demo_compares_teacher_forced_logits_with_the_first_mode():
    config = get_config("tiny")
    ctx = config.forward_context(max_num_seqs=2, max_num_tokens=16, max_model_len=16)
    prompts = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    eager, full = run_modes(lambda: build_model(config), ctx, prompts, 3, ("eager", "full"), {"compiler": "eager"})
    assert eager.logit_error is None and full.logit_error < 1e-5
    assert eager.agreement is None and full.agreement == 1.0
    assert full.tokens == eager.tokens and len(full.tokens) == 2 and len(full.tokens[0]) == 3
    assert full.graphs > 0 and len(full.step_ms) == 3


def result(mode: str, agreement: float | None = None, logit_error: float | None = None) -> ModeResult:
    return ModeResult(mode, 0.0, [1.0], 0, agreement=agreement, logit_error=logit_error)


@pytest.mark.parametrize("dtype, later, failure", [
    (torch.float32, result("full", 1.0, 1e-7), None),
    (torch.float32, result("full", 0.75, 1e-7), "greedy tokens differ"),
    (torch.bfloat16, result("full", 0.75, 1e-2), None),  # near-ties flip in bf16: logits are the check
    (torch.bfloat16, result("full", 1.0, 0.2), "logits differ"),
])
def test_demo_checks_tokens_in_float32_and_logits_in_bf16(dtype, later, failure):
    got = check([result("eager"), later], dtype)
    assert got is None if failure is None else failure in got


def test_token_agreement_counts_places():
    assert token_agreement([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == 0.75


def test_demo_drops_only_the_no_cuda_runtime_notice(monkeypatch, tmp_path):
    # torch's CUDA build logs this on a CPU-only machine with a CUDA toolkit; the CPU build logs it
    # the same way when CUDA_HOME names a folder, so the test runs anywhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    logger = logging.getLogger("torch.utils.cpp_extension")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        torch.utils.cpp_extension._find_cuda_home()
        with no_cuda_runtime_notice():
            torch.utils.cpp_extension._find_cuda_home()
            logger.warning("another warning")
        torch.utils.cpp_extension._find_cuda_home()
    finally:
        logger.removeHandler(handler)
    notice = f"No CUDA runtime is found, using CUDA_HOME='{tmp_path}'"
    assert seen == [notice, "another warning", notice]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "cpu", "--modes", "eager,fast"], "unknown mode"),
    (["demo", "--device", "cpu", "--model", "gpt-5"], "unknown"),
])
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises((SystemExit, ValueError), match=message):
        main(argv)


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "fullgraph_backend.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "dump" in result.stdout

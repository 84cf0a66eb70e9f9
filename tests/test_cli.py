"""The ``fullgraph`` command line: the demo job end to end on the tiny model (CPU)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fullgraph_backend.cli import main
from fullgraph_backend.demo import run_modes
from fullgraph_backend.models import build_model, get_config


def test_demo_runs_every_mode_and_matches_eager(capsys):
    code = main(["demo", "--device", "cpu", "--batch", "3", "--prompt-len", "9", "--steps", "3",
                 "--modes", "eager,none,piecewise,full", "--compiler", "eager"])
    out = capsys.readouterr().out
    assert code == 0, out
    for mode in ("eager", "none", "piecewise", "full"):
        assert mode in out
    assert "NO" not in out


def test_demo_compares_teacher_forced_logits_with_the_first_mode():
    config = get_config("tiny")
    ctx = config.forward_context(max_num_seqs=2, max_num_tokens=16, max_model_len=16)
    prompts = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    eager, full = run_modes(lambda: build_model(config), ctx, prompts, 3, ("eager", "full"), {"compiler": "eager"})
    assert eager.logit_error is None and full.logit_error < 1e-5
    assert full.tokens == eager.tokens and len(full.tokens) == 2 and len(full.tokens[0]) == 3
    assert full.graphs > 0 and len(full.step_ms) == 3


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

"""The README's Python snippets are the files in examples/, and each runs as a newcomer runs it.

A snippet that drifts from its file, or a file that stops running, fails here instead of in a new
user's first ten minutes.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def readme_python_blocks(text: str) -> list[str]:
    """The bodies of the README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_python_blocks_are_the_example_files():
    blocks = readme_python_blocks((ROOT / "README.md").read_text())
    files = {path.name: path.read_text() for path in EXAMPLES}
    assert len(blocks) == len(files), (f"README has {len(blocks)} python blocks, examples/ {len(files)} files: "
                                       "every README snippet is an example file")
    for block in blocks:
        name = block.split(":", 1)[0].removeprefix("# examples/")
        assert name in files, f"a README block starts {block.splitlines()[0]!r}, not '# examples/<file>.py: ...'"
        assert block == files[name], f"README's block differs from examples/{name}: copy one over the other"


def test_readme_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert readme_python_blocks(text) == ["x = 1\n", "y = 2\n"]


@pytest.mark.slow
@pytest.mark.parametrize("path, expected", [
    ("api_tour.py", r"logits \(6, 512\) torch\.\w+ on (cpu|cuda), max \|compiled - eager\| \d\.\de[+-]\d\d\n"
                    r"next token of each request: \[\d+, \d+\]"),
    ("engine.py", r"-O4 \(full\): load .* compile .* graphs.*compile cache: \w+.*\n"
                  r"prompt \[1, 2, 3, 4, 5\]: 100 tokens \[.*\]\.\.\., length, first token after \d+ ms\n"
                  r"prompt \[6, 7, 8\]: 100 tokens"),
], ids=["api_tour", "engine"])
def test_example_runs_and_prints_for_a_newcomer(path, expected):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / path)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(expected, result.stdout), result.stdout
    assert result.stderr == "", f"examples/{path} printed warnings or logs:\n{result.stderr}"

"""The README's front door: its first Quick start Python block runs verbatim, offline, from the repository root."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env

# Runs the block with every outgoing connection refused, so "offline" is checked, not assumed.
_NO_NETWORK = """
import socket, sys
def _refuse(*args, **kwargs):
    raise OSError('network access attempted by the offline quick start')
socket.socket.connect = _refuse
socket.create_connection = _refuse
code = open(sys.argv[1], encoding='utf-8').read()
exec(compile(code, 'README quick start', 'exec'), {'__name__': '__main__'})
"""


def first_python_block(markdown: str) -> str:
    """The first fenced ```python block of a Markdown text."""
    match = re.search(r"^```python\n(.*?)^```", markdown, re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_first_python_block_is_the_quick_start():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = first_python_block(readme)
    assert readme.index("## Quick start") < readme.index(block)
    assert "compute_legrad" in block and "visualize(" in block


@pytest.mark.subprocess
def test_quick_start_runs_verbatim_offline(tmp_path):
    block = first_python_block((REPO / "README.md").read_text(encoding="utf-8"))
    script = tmp_path / "quickstart.py"
    script.write_text(block + "\nprint('heatmaps', tuple(heatmaps.shape), float(heatmaps.min()), "
                      "float(heatmaps.max()))\n", encoding="utf-8")
    res = subprocess.run([PYTHON, "-c", _NO_NETWORK, str(script)], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # The block's own shape comment holds: one [0, 1] map per prompt at the model's native size.
    shape = re.search(r"heatmaps \((\d+), (\d+), (\d+), (\d+)\) (\S+) (\S+)", res.stdout)
    assert shape, res.stdout
    assert (int(shape[1]), int(shape[2])) == (1, 3) and float(shape[5]) == 0.0 and float(shape[6]) == 1.0

"""``legrad playground`` (the package's playground) and ``playground.py`` (its thin entry point): the same
program, offline from the bundled scenes, whatever the working directory."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env
from PIL import Image

from legrad.cli import main as legrad_main
from legrad.cli.playground import DEFAULT_OUT, default_scene
from legrad.frontend.scenes import SCENES_DIR, sample_scenes


def _table(stdout: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^\s+(.+?)\s+(-?\d+\.\d+)\s+(\d+\.\d+)$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_scenes_ship_inside_the_package():
    assert SCENES_DIR.parent.parent.name == "legrad" and (SCENES_DIR / "scenes.json").is_file()
    scenes = sample_scenes()
    assert len(scenes) >= 2 and all(s.path.parent == SCENES_DIR and s.path.is_file() for s in scenes)
    assert not (REPO / "assets" / "scenes.json").exists()  # one copy only


def test_subcommand_and_entry_point_print_the_same_table(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    try:
        import playground
    finally:
        sys.path.remove(str(REPO))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert legrad_main(["playground", "--scene", "2", "--out", str(a)]) == 0
    first = capsys.readouterr().out
    assert playground.main(["--scene", "2", "--out", str(b)]) == 0
    second = capsys.readouterr().out
    assert _table(first) == _table(second) and len(_table(first)) >= 3
    _, phrases, absent, label = default_scene(2)
    assert list(_table(first)) == [*phrases, absent] and f"image: {label}" in first
    with Image.open(a) as fa, Image.open(b) as fb:
        assert fa.size == fb.size
    # The checkout's entry point keeps writing to the checkout's outputs/ by default.
    assert playground.DEFAULT_OUT == REPO / "outputs" / "playground.png"


def test_subcommand_errors_are_one_line_named_for_the_command(tmp_path, capsys):
    assert legrad_main(["playground", "--scene", "99", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("legrad playground: error: --scene must be between 0 and")


@pytest.mark.subprocess
def test_default_out_is_under_the_working_directory(tmp_path):
    """Run from outside the checkout (as after a wheel install): the figure goes to ./outputs/playground.png."""
    res = subprocess.run([PYTHON, "-m", "legrad", "playground"], cwd=tmp_path, env=subprocess_env(),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    out = tmp_path / DEFAULT_OUT
    assert out.is_file() and f"wrote {DEFAULT_OUT}" in res.stdout
    with Image.open(out) as fig:
        assert fig.format == "PNG"

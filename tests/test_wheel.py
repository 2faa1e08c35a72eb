"""The wheel is the whole product: built from this checkout, it holds every file of the package (code, the
demo checkpoint, the demo scenes, the command line with its playground, the app module once it is in
the package), the licence and the ``legrad`` command. (A fresh-venv install of it is checked by hand,
see the report of issue 21; it needs torch from a local disk, too slow for the suite.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def _package_files() -> set[str]:
    """Every file of the source tree's ``legrad`` package, as wheel paths (compiled caches excluded)."""
    return {p.relative_to(REPO).as_posix() for p in (REPO / "legrad").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building needs setuptools>=77 (license-files), found {setuptools.__version__}")
    # A copy of what the build reads, so that the checkout gets no build/ or egg-info folders.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "legrad", src / "legrad", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = out.glob("legrad_torch-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_holds_every_package_file(wheel):
    names = set(wheel.namelist())
    missing = sorted(_package_files() - names)
    assert not missing, missing
    # What the offline front door needs, named so that a rename or a move fails here loudly.
    for needed in ("legrad/assets/toy_clip.pt", "legrad/assets/scenes/scenes.json", "legrad/assets/scenes/scene_0.png",
                   "legrad/cli/playground.py", "legrad/frontend/scenes.py"):
        assert needed in names, needed


def test_wheel_holds_the_licence_and_the_command(wheel):
    names = wheel.namelist()
    licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence and wheel.read(licence[0]) == (REPO / "LICENSE").read_bytes()
    assert b"MIT License" in wheel.read(licence[0])
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in wheel.read(meta).decode()
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "legrad = legrad.cli:main" in wheel.read(entry).decode()


def test_nothing_outside_the_package(wheel):
    """Tests, scripts, docs and the checkout's entry points stay out of the wheel."""
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"legrad"}

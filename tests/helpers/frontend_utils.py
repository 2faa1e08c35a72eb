"""Helpers shared by the front-end tests (CLI, playground, app): the bundled demo scenes, subprocess setup."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bundled_scenes() -> list[tuple[Path, list[str]]]:
    """The demo scenes shipped in the package (``legrad/assets/scenes/``) as ``(path, phrases)``."""
    from legrad.frontend.scenes import sample_scenes

    scenes = sample_scenes()
    assert scenes, "legrad/assets/scenes/scenes.json and its images are missing"
    return [(s.path, list(s.phrases)) for s in scenes]


def copy_scenes(folder: Path, scenes: list[tuple[Path, list[str]]]) -> list[tuple[Path, list[str]]]:
    """Copies scene images into ``folder``; returns the copies with their phrases."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    return [(Path(shutil.copy(path, folder / path.name)), phrases) for path, phrases in scenes]


def subprocess_env() -> dict[str, str]:
    """Environment for front-end subprocesses: one torch thread, headless matplotlib, repo on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PYTHON = sys.executable

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


def signal_after_first_output(args: list[str], out: Path, pattern: str, sig: int, step_s: float = 0.02
                              ) -> tuple[int, str]:
    """Runs ``python -m legrad ARGS``, sends ``sig`` once a file matching ``pattern`` appears in ``out``,
    and returns ``(exit status, stderr)``. Fails if the run ends before it could be signalled."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([PYTHON, "-m", "legrad", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=REPO,
                            # A job started in the background by a non-interactive shell (a CI script)
                            # inherits SIGINT ignored, and Python keeps ignoring it: restore the default
                            # so that the child sees the Ctrl-C a test sends.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(step_s)
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be signalled: {proc.communicate()[1][-2000:]}")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err

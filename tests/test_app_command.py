"""``legrad app``: the demo server as a subcommand of the package (``app.py`` is a thin entry point)."""

from __future__ import annotations

import subprocess

import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env

from legrad.cli import main


def test_app_help_lists_the_server_flags(capsys):
    assert main(["app", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--allow-dir", "--allow-urls", "--time-limit", "--concurrency", "--model"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["--time-limit", "-1"], "--time-limit must be"),
    (["--time-limit", "nan"], "--time-limit must be"),
    (["--concurrency", "0"], "--concurrency must be"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be"),
])
def test_bad_flags_are_refused_before_serving(capsys, argv, message):
    assert main(["app", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_settings_belong_to_the_app_not_the_library():
    """The operator's settings are an object each app is built with (from the flags), not a module global."""
    import argparse

    import legrad.app.requests as requests
    import legrad.app.server as server
    import legrad.app.settings as settings

    for module in (requests, server, settings):
        assert not [n for n, v in vars(module).items() if isinstance(v, settings.AppSettings)], module
    p = argparse.ArgumentParser()
    server.add_arguments(p)
    parsed, initial = server.settings_from_flags(p.parse_args(["--time-limit", "0", "--allow-urls", "-p", "a cat"]))
    assert parsed.time_limit is None and parsed.allow_urls and initial == "a cat"
    first, second = requests.DemoApp(parsed), requests.DemoApp()
    assert first.settings is parsed and second.settings.time_limit == settings.DEFAULT_TIME_LIMIT_S
    assert not second.settings.allow_urls


def test_missing_gradio_names_the_extra(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app", "--device", "cpu"]) == 1
    assert "pip install 'legrad_torch[app]'" in capsys.readouterr().err


@pytest.mark.subprocess
def test_help_loads_neither_gradio_nor_torch():
    code = ("import sys; from legrad.cli import main; rc = main(['app', '--help']); "
            "print('LOADED', sorted(m for m in ('gradio', 'torch') if m in sys.modules)); sys.exit(rc)")
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout and "--time-limit" in out.stdout
    # The top-level script is the same server.
    out = subprocess.run([PYTHON, "app.py", "--help"], cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--time-limit" in out.stdout and "--concurrency" in out.stdout


@pytest.mark.subprocess
def test_start_up_line_names_the_apps_own_share_flag(tmp_path):
    # Gradio's own start-up text advises `share=True` in `launch()`; the app's switch is --share.
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**subprocess_env(), "GRADIO_TEMP_DIR": str(tmp_path)}
    proc = subprocess.Popen([PYTHON, str(REPO / "app.py"), "--port", str(port), "--device", "cpu"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving on" in line:
                break
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    text = "".join(lines) + (rest or "")
    assert f"serving on http://127.0.0.1:{port}" in text and "--share" in text, text
    assert "share=True" not in text, text

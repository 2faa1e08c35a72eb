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

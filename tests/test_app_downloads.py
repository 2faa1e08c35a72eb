"""The demo app's model list: only models that load without a download, unless the operator passes
``--allow-downloads`` (issue 26, item 3)."""

from __future__ import annotations

import argparse
import socket

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[app]')")

from legrad.app.requests import DemoApp, _openclip_labels  # noqa: E402
from legrad.app.server import add_arguments, settings_from_flags  # noqa: E402
from legrad.app.settings import TOY_LABEL, AppSettings  # noqa: E402

#: A downloadable entry (OpenCLIP weights on the Hugging Face Hub).
DOWNLOADABLE = "ViT-B-32 · laion2b_s34b_b79k"


def _flags(*argv: str) -> AppSettings:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return settings_from_flags(p.parse_args(["--device", "cpu", *argv]))[0]


def _dropdown_choices(app: DemoApp) -> list[str]:
    """The model dropdown's choices as the page's config (what Gradio's /config serves) lists them."""
    from legrad.app.page import build_demo

    demo = build_demo(app)
    config = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    (dropdown,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "model"]
    return [c[1] if isinstance(c, (list, tuple)) else c for c in dropdown["props"]["choices"]]


@pytest.fixture()
def no_network(monkeypatch):
    """Records (and refuses) every attempt to open a network connection or resolve a host name."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test that must make none")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture()
def loads(monkeypatch):
    """Replaces the model loader with a recorder that fails like an unreachable download would."""
    from legrad.frontend.explainer import Explainer
    from legrad.io.errors import ModelLoadError

    calls: list[tuple[str, str | None]] = []

    def fake_load(cls, name, pretrained, device, **kwargs):
        calls.append((name, pretrained))
        raise ModelLoadError("stand-in loader: no download in this test")

    monkeypatch.setattr(Explainer, "load", classmethod(fake_load))
    return calls


def test_flag_defaults_off_and_is_documented(capsys):
    assert _flags().allow_downloads is False
    assert _flags("--allow-downloads").allow_downloads is True
    from legrad.cli import main

    assert main(["app", "--help"]) == 0
    assert "--allow-downloads" in capsys.readouterr().out


def test_default_list_holds_only_models_that_load_without_a_download():
    downloadable = set(_openclip_labels())
    assert DOWNLOADABLE in downloadable  # the control: such entries exist
    app = DemoApp(_flags())
    assert app.model_labels() == [TOY_LABEL]
    assert _dropdown_choices(app) == [TOY_LABEL]
    # The operator's own --model entries are listed (the operator chose them), nothing else.
    operator = DemoApp(_flags("--model", "timm:vit_tiny_patch16_224", "--pretrained", "none"))
    assert _dropdown_choices(operator) == [TOY_LABEL, "timm:vit_tiny_patch16_224 · none"]


def test_allow_downloads_lists_the_downloadable_models():
    app = DemoApp(_flags("--allow-downloads"))
    choices = _dropdown_choices(app)
    assert choices[0] == TOY_LABEL and DOWNLOADABLE in choices
    assert set(_openclip_labels()) <= set(choices)


def test_a_request_naming_a_downloadable_model_is_refused_without_network(no_network, loads):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    gallery, status = DemoApp(_flags()).predict(image, "", "a red circle", DOWNLOADABLE)
    assert gallery == []
    assert status.startswith("**Error:** unknown model choice") and "--allow-downloads" in status, status
    assert loads == [] and no_network == []
    # The control: with the operator's opt-in, the same request does reach the loader.
    gallery, status = DemoApp(_flags("--allow-downloads")).predict(image, "", "a red circle", DOWNLOADABLE)
    assert gallery == [] and loads == [("ViT-B-32", "laion2b_s34b_b79k")], status

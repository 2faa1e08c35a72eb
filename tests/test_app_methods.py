"""The demo app's method choice (issue 28, item 4): a dropdown of the one method registry, default LeGrad,
checked server-side (in-process, as tests/test_app.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.frontend_utils import bundled_scenes
from PIL import Image

pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[app]')")

from legrad.app.requests import UNKNOWN_METHOD_MSG, VLM_METHOD_MSG, DemoApp, checked_method  # noqa: E402
from legrad.app.settings import TOY_LABEL  # noqa: E402
from legrad.methods import METHODS, GradCAM, method_names, register_method  # noqa: E402
from legrad.viz import fit_for_display, overlay  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return DemoApp()


@pytest.fixture(scope="module")
def scene():
    path, phrases = bundled_scenes()[0]
    return Image.open(path).convert("RGB"), phrases


def _page_component(app, elem_id):
    from legrad.app.page import build_demo

    demo = build_demo(app)
    config = demo.get_config_file() if hasattr(demo, "get_config_file") else demo.config
    (component,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    (explain,) = [d for d in config["dependencies"] if d.get("api_name") == "explain"]
    return component, explain


def test_the_dropdown_lists_the_registry_with_legrad_first(app):
    dropdown, explain = _page_component(app, "method")
    values = [c[1] if isinstance(c, (list, tuple)) else c for c in dropdown["props"]["choices"]]
    assert values == method_names() and values[0] == "legrad"
    assert dropdown["props"]["value"] == "legrad"
    assert dropdown["id"] == explain["inputs"][-1]  # the Explain button sends the choice, last
    labels = [c[0] for c in dropdown["props"]["choices"]]
    assert labels[values.index("gradcam")] == "GradCAM"


def test_a_registered_method_is_offered_and_accepted(app):
    class Flipped(GradCAM):
        name = "flipped_gradcam_app_test"

    register_method(Flipped)
    try:
        assert ("Flipped", Flipped.name) in app.method_choices()
        assert checked_method(Flipped.name) == Flipped.name
    finally:
        METHODS.pop(Flipped.name)
    with pytest.raises(ValueError, match="unknown method choice"):
        checked_method(Flipped.name)


@pytest.mark.parametrize("method", ["gradcam", "rollout"])
def test_a_method_choice_draws_that_methods_maps(app, scene, method):
    image, phrases = scene
    gallery, status = app.predict(image, "", phrases[0], TOY_LABEL, "", None, 0.5, method)
    assert len(gallery) == 1, status
    assert f"method {METHODS[method].__name__}" in status
    explainer = app.get_explainer("toy", None)
    maps = explainer.explain(image, [phrases[0]], method=method).maps
    expected = overlay(fit_for_display(image), maps[0, 0], alpha=0.5)
    assert np.array_equal(np.asarray(gallery[0][0]), np.asarray(expected))
    legrad = explainer.explain(image, [phrases[0]]).maps
    assert not torch.allclose(maps, legrad)  # the choice reaches the computation


@pytest.mark.parametrize("method", [None, "", "legrad"])
def test_the_default_is_legrad(app, scene, method):
    image, phrases = scene
    default, _ = app.predict(image, "", phrases[0], TOY_LABEL, "", None, 0.5)
    chosen, status = app.predict(image, "", phrases[0], TOY_LABEL, "", None, 0.5, method)
    assert "layer index" in status
    assert np.array_equal(np.asarray(default[0][0]), np.asarray(chosen[0][0]))


@pytest.mark.parametrize("method", ["LeGrad", "legrad@-3", "rollout@2", "nope", "../../etc/passwd", 3, ["legrad"],
                                    " legrad"])
def test_a_value_not_in_the_registry_is_refused_before_any_work(app, scene, method, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work done for a refused method")

    monkeypatch.setattr(app, "get_explainer", no_work)
    monkeypatch.setattr(app, "read_visitor_image", no_work)
    gallery, status = app.predict(scene[0], "", "a red circle", TOY_LABEL, "", None, 0.6, method)
    assert gallery == [] and status == f"**Error:** {UNKNOWN_METHOD_MSG}"  # fixed: the value is not echoed


def test_a_vlm_is_explained_by_legrad_only(app, monkeypatch):
    monkeypatch.setattr(app, "is_vlm_label", lambda label: True)
    monkeypatch.setattr(app, "vlm_explainer", lambda name: pytest.fail("the VLM was loaded"))
    gallery, status = app.predict(None, "", "What is it?\na cat", "hf:/some/vlm", "", None, 0.6, "gradcam")
    assert gallery == [] and status == f"**Error:** {VLM_METHOD_MSG}"

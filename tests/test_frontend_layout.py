"""The front-end layout: compatibility aliases resolve to the same objects, and there is one URL test.

(The layer rules, module sizes and private names of the whole package are checked by tests/test_layout.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "legrad"


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_aliases_resolve_to_the_front_end_objects():
    import legrad.explainer
    import legrad.loading
    import legrad.viz
    import utils
    from legrad.frontend import errors, explainer, files, images, logs, models, options, scenes

    same = {
        "ModelLoadError": errors.ModelLoadError, "ImageLoadError": errors.ImageLoadError,
        "ImageTooLargeError": errors.ImageTooLargeError, "load_model": models.load_model,
        "default_layer_index": models.default_layer_index, "native_image_size": models.native_image_size,
        "resolve_device": models.resolve_device, "model_choices": models.model_choices, "TOY_NAME": models.TOY_NAME,
        "load_image": images.load_image, "MAX_IMAGE_PIXELS": images.MAX_IMAGE_PIXELS,
        "parse_size": options.parse_size, "configure_logging": logs.configure_logging,
        "absent_phrase": scenes.absent_phrase, "sample_scenes": scenes.sample_scenes,
    }
    for name, obj in same.items():
        assert getattr(legrad.loading, name) is obj, name
    for name in ("Explainer", "Explanation", "clean_prompts", "clean_targets", "MAX_TOKENS"):
        assert getattr(legrad.explainer, name) is getattr(explainer, name), name
    assert legrad.viz.atomic_writer is files.atomic_writer
    assert utils.visualize is legrad.viz.visualize and utils.overlay is legrad.viz.overlay


@pytest.mark.parametrize("text, url", [
    ("http://example.com/a.png", True), ("HTTPS://example.com/a.png", True), ("https://x", True),
    ("ftp://example.com/a.png", False), ("httpx://a", False), ("./http://a.png", False), ("a/http://b", False),
    ("images/cat.png", False), ("", False), (" http://a", False),
])
def test_is_url(text, url):
    from legrad.frontend.fetch import is_url

    assert is_url(text) is url


def test_is_url_is_the_only_url_test():
    """Paths and URLs are told apart in one place; other modules call ``is_url``."""
    files = [*_modules(), REPO / "app.py", REPO / "playground.py"]
    hits = [p.relative_to(REPO).as_posix() for p in files
            if "https?://" in p.read_text(encoding="utf-8")
            or '"http://", "https://"' in p.read_text(encoding="utf-8")]
    assert hits == ["legrad/frontend/fetch.py"]

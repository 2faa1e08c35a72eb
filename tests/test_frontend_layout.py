"""The front-end layout: one public path per name (no alias modules), and there is one URL test.

(The layer rules, module sizes and private names of the whole package are checked by tests/test_layout.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "legrad"


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


#: Alias modules of 1.x-era and early 2.0 layouts, dropped in 2.x (one public path per name).
DROPPED = ("towers", "hf", "baselines", "metrics", "benchmark", "loading", "explainer")


def test_every_name_has_one_public_path():
    """The alias modules are gone (importing one fails), nothing in the repository names them, and the
    original LeGrad usage keeps working: ``from legrad import LeWrapper, LePreprocess, list_pretrained,
    visualize`` and, in a checkout, ``from utils import visualize``."""
    import importlib.util
    import re

    import legrad
    import legrad.viz
    import utils

    for name in DROPPED:
        assert not (PKG / f"{name}.py").exists() and not (PKG / name).exists(), name
        # (A shared editable install of another checkout may still resolve the name; never to this package.)
        spec = importlib.util.find_spec(f"legrad.{name}")
        assert spec is None or not Path(spec.origin).is_relative_to(PKG), spec
    pattern = re.compile(r"\blegrad\.(" + "|".join(DROPPED) + r")\b(?!\.py)|from legrad import (" + "|".join(DROPPED) + r")\b")
    docs = [*_modules(), *sorted((REPO / "docs").glob("*.md")), REPO / "README.md", REPO / "app.py",
            REPO / "playground.py", *sorted((REPO / "examples").glob("*.ipynb"))]
    named = [p.relative_to(REPO).as_posix() for p in docs if pattern.search(p.read_text(encoding="utf-8"))]
    assert not named, named
    for name in ("LeWrapper", "LePreprocess", "list_pretrained", "visualize"):
        assert name in legrad.__all__ and getattr(legrad, name) is not None, name
    assert legrad.visualize is legrad.viz.visualize and utils.visualize is legrad.viz.visualize


@pytest.mark.parametrize("text, url", [
    ("http://example.com/a.png", True), ("HTTPS://example.com/a.png", True), ("https://x", True),
    ("ftp://example.com/a.png", False), ("httpx://a", False), ("./http://a.png", False), ("a/http://b", False),
    ("images/cat.png", False), ("", False), (" http://a", False),
])
def test_is_url(text, url):
    from legrad.io.fetch import is_url

    assert is_url(text) is url


def test_is_url_is_the_only_url_test():
    """Paths and URLs are told apart in one place; other modules call ``is_url``."""
    files = [*_modules(), REPO / "app.py", REPO / "playground.py"]
    hits = [p.relative_to(REPO).as_posix() for p in files
            if "https?://" in p.read_text(encoding="utf-8")
            or '"http://", "https://"' in p.read_text(encoding="utf-8")]
    assert hits == ["legrad/io/fetch.py"]

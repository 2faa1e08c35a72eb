"""The supported transformers range of the VLM path: a transformers older than the first release whose VLM forwards
take ``mm_encoder_outputs`` is refused when a VLM is wrapped, with a TypeError naming the installed version and the
minimum, before any work; the minimum is the one pyproject's ``vlm`` extra and docs/vlm.md declare."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

transformers = pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.vlm import version  # noqa: E402
from legrad.adapters.vlm.version import MIN_TRANSFORMERS, check_transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", ["5.17.0", "5.0.0", "4.57.1", "4.50.0"])
def test_an_older_transformers_is_refused_at_wrap_before_any_work(old, monkeypatch):
    model = V.llava()
    monkeypatch.setattr(version, "installed_transformers", lambda: old)
    monkeypatch.setattr(model, "get_image_features", lambda *a, **k: pytest.fail("ran the model"))
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran the model"))
    with pytest.raises(TypeError) as info:
        LeWrapper(model)
    msg = str(info.value)
    assert f"transformers {old} is installed" in msg and f">= {MIN_TRANSFORMERS}" in msg
    assert "mm_encoder_outputs" in msg


def test_the_minimum_and_later_releases_pass(monkeypatch):
    assert version.installed_transformers() == transformers.__version__
    for ok in (MIN_TRANSFORMERS, "5.18.1", "5.25.0", "5.18.0.dev0", "6.0"):
        check_transformers(ok)
    monkeypatch.setattr(version, "installed_transformers", lambda: MIN_TRANSFORMERS)
    LeWrapper(V.llava())  # wraps (and passes the drift guard)
    with pytest.raises(ValueError, match="cannot read"):
        check_transformers("unknown")


def test_the_minimum_is_declared_in_the_vlm_extra_and_the_docs():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.replace(" ", "").startswith(f"transformers>={MIN_TRANSFORMERS},") for r in extras["vlm"])
    assert f"transformers >= {MIN_TRANSFORMERS}" in (ROOT / "docs" / "vlm.md").read_text()

"""Explainer.explain refuses bad images before any work."""

import pytest
from PIL import Image

from legrad.frontend.explainer import Explainer


@pytest.fixture(scope="module")
def explainer():
    return Explainer.load()


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_zero_sized_image_is_a_value_error(explainer, size):
    with pytest.raises(ValueError, match="empty"):
        explainer.explain(Image.new("RGB", size), "a red circle")


def test_non_image_is_a_type_error(explainer):
    with pytest.raises(TypeError, match="PIL"):
        explainer.explain(["not an image"], "a red circle")


def test_valid_image_still_explained(explainer):
    out = explainer.explain(Image.new("RGB", (40, 30), (200, 30, 30)), ["a red circle", "a blue square"])
    assert out.maps.shape[:2] == (1, 2)

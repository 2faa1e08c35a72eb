"""``visualize``: batch figures captioned with each image's own prompts, and the optional colour bar."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from legrad.viz import visualize


def _images(b: int, side: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(b)]


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.get_axes() if ax.get_title()]


def test_per_image_prompts_caption_each_row():
    prompts = [["a purple star", "a red triangle"], ["a green cross", "an orange cross"], ["a cat", "a dog"]]
    fig = visualize(_images(3), np.random.default_rng(1).random((3, 2, 12, 12)), text_prompts=prompts)
    assert _titles(fig) == ["image 1", *prompts[0], "image 2", *prompts[1], "image 3", *prompts[2]]


def test_shared_prompts_caption_every_row_and_one_image_is_untitled_by_number():
    fig = visualize(_images(2), np.zeros((2, 2, 12, 12)), text_prompts=("a", "b"))
    assert _titles(fig) == ["image 1", "a", "b", "image 2", "a", "b"]
    fig = visualize(_images(1)[0], np.zeros((2, 12, 12)), text_prompts=["a", "b"])
    assert _titles(fig) == ["image", "a", "b"]


@pytest.mark.parametrize("prompts, match", [
    ([["a", "b"]], "2 lists of 2 strings"),                       # one row for two images
    ([["a", "b"], ["c"]], "a row of 1 text_prompts for 2"),        # a short row
    ([["a", "b"], "c"], "2 lists of 2 strings"),                  # mixed forms
    (["a", "b", "c"], "got 3 text_prompts for 2"),
])
def test_bad_caption_shapes_are_refused(prompts, match):
    with pytest.raises(ValueError, match=match):
        visualize(_images(2), np.zeros((2, 2, 12, 12)), text_prompts=prompts)


def test_colorbar_spans_the_map_scale_with_the_colormap(tmp_path):
    maps = np.random.default_rng(2).random((2, 3, 12, 12))
    plain = visualize(_images(2), maps, colormap="viridis")
    fig = visualize(_images(2), maps, colorbar=True, colormap="viridis", save_path=tmp_path / "f.png")
    extra = [ax for ax in fig.get_axes() if ax not in fig.get_axes()[:8]]
    assert len(fig.get_axes()) == len(plain.get_axes()) + 1 and len(extra) == 1
    bar = extra[0]
    assert bar.get_ylim() == pytest.approx((0.0, 1.0))
    mappable = bar.collections[0] if bar.collections else bar.images[0]
    assert mappable.get_cmap().name == colormaps["viridis"].name
    with Image.open(tmp_path / "f.png") as png:
        assert png.format == "PNG"
    # The heatmap panels are drawn exactly as without the bar.
    for a, b in zip(plain.get_axes(), fig.get_axes()[:8]):
        if a.get_images():
            assert np.array_equal(np.asarray(a.get_images()[0].get_array()), np.asarray(b.get_images()[0].get_array()))


def test_colorbar_must_be_a_bool():
    with pytest.raises(TypeError, match="colorbar"):
        visualize(_images(1)[0], np.zeros((1, 12, 12)), colorbar="yes")

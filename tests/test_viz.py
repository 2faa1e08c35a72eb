"""Tests of legrad.viz (overlay pixel values, shapes, figures, files) and the repo-root utils shim."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from legrad.io.files import atomic_writer
from legrad.preprocess import OPENAI_MEAN, OPENAI_STD
from legrad.viz import (
    DISPLAY_MAX_SIDE,
    colorize,
    fit_for_display,
    overlay,
    to_rgb_array,
    visualize,
)

REPO = Path(__file__).resolve().parents[1]


def _cmap_rgb(value: float, name: str = "jet") -> np.ndarray:
    # Independent reference: matplotlib's colormap evaluated on a scalar, in 0-255.
    return np.asarray(matplotlib.colormaps[name](value)[:3]) * 255.0


def _random_image(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.6, 1.0])
def test_zero_map_tints_by_colormap_minimum(alpha):
    img = _random_image()
    out = np.asarray(overlay(img, np.zeros((20, 30)), alpha=alpha), dtype=np.float64)
    expected = (1 - alpha) * img.astype(np.float64) + alpha * _cmap_rgb(0.0)
    assert out.shape == (20, 30, 3)
    assert np.abs(out - expected).max() <= 0.5 + 1e-9


def test_constant_one_map_tints_by_colormap_maximum_other_cmap():
    img = _random_image(seed=1)
    out = np.asarray(overlay(img, np.ones((20, 30)), alpha=0.5, colormap="viridis"), dtype=np.float64)
    expected = 0.5 * img + 0.5 * _cmap_rgb(1.0, "viridis")
    assert np.abs(out - expected).max() <= 0.5 + 1e-9


def test_hot_spot_is_where_the_map_is_high():
    img = np.full((32, 32, 3), 128, dtype=np.uint8)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[4:10, 20:28] = 1.0
    out = np.asarray(overlay(img, heat, alpha=0.6), dtype=np.float64)
    hot = _cmap_rgb(1.0)
    cold = _cmap_rgb(0.0)
    # Inside the spot the pixel is the image blended with the colormap's top colour, outside with its bottom.
    assert np.allclose(out[6, 24], 0.4 * 128 + 0.6 * hot, atol=0.5)
    assert np.allclose(out[25, 5], 0.4 * 128 + 0.6 * cold, atol=0.5)
    # The reddest pixels (jet's top is dark red) are inside the spot.
    redness = out[..., 0] - out[..., 2]
    ys, xs = np.unravel_index(np.argmax(redness), redness.shape)
    assert 4 <= ys < 10 and 20 <= xs < 28


def test_map_is_resized_to_the_image():
    img = _random_image(40, 60, seed=2)
    heat = np.zeros((4, 6), dtype=np.float32)
    heat[:, 3:] = 1.0  # right half hot
    out = np.asarray(overlay(img, torch.from_numpy(heat)[None, None], alpha=1.0), dtype=np.float64)
    assert out.shape == (40, 60, 3)
    assert np.allclose(out[20, 55], _cmap_rgb(1.0), atol=0.5)
    assert np.allclose(out[20, 3], _cmap_rgb(0.0), atol=0.5)


def test_pil_and_array_inputs_agree():
    img = _random_image(seed=3)
    heat = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    a = np.asarray(overlay(img, heat))
    b = np.asarray(overlay(Image.fromarray(img), heat))
    c = np.asarray(overlay(img.astype(np.float32) / 255.0, heat))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() <= 1
    assert isinstance(overlay(img, heat), Image.Image)


@pytest.mark.parametrize("batched", [False, True])
def test_normalised_tensor_is_unnormalised(batched):
    img = _random_image(16, 16, seed=4)
    mean, std = np.array(OPENAI_MEAN), np.array(OPENAI_STD)
    t = torch.from_numpy(((img / 255.0 - mean) / std).transpose(2, 0, 1).copy()).float()
    if batched:
        t = t[None]
    out = np.asarray(overlay(t, np.zeros((16, 16)), alpha=0.0))
    assert np.abs(out.astype(int) - img.astype(int)).max() <= 1


def test_normalisation_taken_from_preprocess_and_pairs():
    import open_clip

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pre = open_clip.image_transform(16, is_train=False, mean=mean, std=std)
    img = _random_image(16, 16, seed=5)
    t = torch.from_numpy(((img / 255.0 - 0.5) / 0.25).transpose(2, 0, 1).copy()).float()
    for norm in (pre, (mean, std)):
        out = np.asarray(overlay(t, np.zeros((16, 16)), alpha=0.0, normalization=norm))
        assert np.abs(out.astype(int) - img.astype(int)).max() <= 1
    # With the wrong (default OpenAI) statistics the colours differ.
    wrong = np.asarray(overlay(t, np.zeros((16, 16)), alpha=0.0))
    assert np.abs(wrong.astype(int) - img.astype(int)).max() > 5


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(heatmap=np.full((4, 4), 2.0)), ValueError),
        (dict(heatmap=np.full((4, 4), np.nan)), ValueError),
        (dict(heatmap=np.zeros((2, 4, 4))), ValueError),
        (dict(alpha=1.5), ValueError),
        (dict(colormap="no-such-map"), ValueError),
        (dict(image="not an image"), TypeError),
        (dict(image=torch.zeros(2, 3, 4, 4)), ValueError),
    ],
)
def test_bad_input_is_rejected(kwargs, err):
    args = dict(image=np.zeros((4, 4, 3), np.uint8), heatmap=np.zeros((4, 4)))
    args.update(kwargs)
    with pytest.raises(err):
        overlay(**args)


def test_visualize_panels_titles_and_file(tmp_path):
    img = _random_image(24, 24, seed=6)
    maps = torch.rand(1, 3, 24, 24)
    prompts = ["a cat", "a dog", "a remote control"]
    path = tmp_path / "sub" / "fig.png"
    fig = visualize(img, maps, text_prompts=prompts, save_path=path)
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert len(axes) == 4
    assert [ax.get_title() for ax in axes] == ["image", *prompts]
    # The first panel is the original image, the others its overlays.
    assert np.array_equal(axes[0].get_images()[0].get_array(), img)
    assert np.array_equal(np.asarray(axes[2].get_images()[0].get_array()), np.asarray(overlay(img, maps[0, 1])))
    assert path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.width > png.height  # one row of four panels
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_visualize_batch_rows_and_default_titles():
    images = torch.randn(2, 3, 16, 16)
    fig = visualize(images, torch.rand(2, 2, 16, 16))
    titles = [ax.get_title() for ax in fig.get_axes()]
    assert titles == ["image 1", "prompt 1", "prompt 2", "image 2", "prompt 1", "prompt 2"]  # rows numbered


def test_visualize_rejects_mismatches():
    with pytest.raises(ValueError, match="text_prompts"):
        visualize(_random_image(8, 8), np.zeros((2, 8, 8)), text_prompts=["one"])
    with pytest.raises(ValueError, match="images"):
        visualize(_random_image(8, 8), np.zeros((2, 1, 8, 8)))


def test_visualize_never_opens_a_window_headless(monkeypatch):
    # No display and show=None: no pyplot figure is created (nothing could block).
    import matplotlib.pyplot as plt

    plt.close("all")
    visualize(_random_image(8, 8), np.zeros((8, 8)))
    assert plt.get_fignums() == []


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with atomic_writer(dest) as fh:
            fh.write(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_writer(dest) as fh:
        fh.write(b"done")
    assert dest.read_bytes() == b"done"
    # Same permissions as a file made by a plain open() (mkstemp alone would give 0600).
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert os.stat(dest).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_repo_root_utils_shim(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("utils", None)
    import utils

    assert utils.visualize is visualize
    assert utils.overlay is overlay


def test_normalisation_taken_from_the_model_config():
    import open_clip

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    model, _, _ = open_clip.create_model_and_transforms(
        "ViT-B-16", pretrained=None, embed_dim=32, image_mean=mean, image_std=std,
        vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
        text_cfg=dict(width=32, heads=2, layers=1, context_length=8),
    )
    img = _random_image(16, 16, seed=8)
    t = torch.from_numpy(((img / 255.0 - 0.5) / 0.25).transpose(2, 0, 1).copy()).float()
    out = np.asarray(overlay(t, np.zeros((16, 16)), alpha=0.0, normalization=model))
    assert np.abs(out.astype(int) - img.astype(int)).max() <= 1


# ---------------------------------------------------------------- bounded display size


def test_colorize_matches_matplotlib_exactly():
    heat = np.random.default_rng(9).random((37, 23)).astype(np.float32)
    heat[0, :4] = [0.0, 1.0, 0.5, 1 / 256]
    for name in ("jet", "viridis", "inferno"):
        ref = matplotlib.colormaps[name](heat)[..., :3] * 255.0
        assert np.array_equal(colorize(heat, name), ref)


def test_large_images_are_drawn_at_a_bounded_size():
    img = np.full((100, 4100, 3), (10, 200, 90), dtype=np.uint8)
    heat = np.zeros((4, 8), dtype=np.float32)
    heat[:, 4:] = 1.0
    out = overlay(img, heat, alpha=0.5)
    assert out.size == (DISPLAY_MAX_SIDE, round(100 * DISPLAY_MAX_SIDE / 4100))
    arr = np.asarray(out, dtype=np.float64)
    assert np.allclose(arr[10, 5], 0.5 * np.array([10, 200, 90]) + 0.5 * _cmap_rgb(0.0), atol=0.5)
    assert np.allclose(arr[10, -5], 0.5 * np.array([10, 200, 90]) + 0.5 * _cmap_rgb(1.0), atol=0.5)
    # max_side=None keeps the full size; the map given is never modified.
    before = heat.copy()
    assert overlay(img, heat, max_side=None).size == (4100, 100)
    assert np.array_equal(heat, before)


def test_downscaling_averages_areas():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    got = fit_for_display(img, max_side=48).astype(np.float64)
    # Independent reference: mean over each 2x2 block.
    ref = img.astype(np.float64).reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    assert got.shape == (32, 48, 3)
    assert np.abs(got - ref).max() <= 1.0


@pytest.mark.parametrize("mode", ["1", "L", "P", "I;16"])
def test_huge_pil_images_never_become_full_size_arrays(mode):
    import tracemalloc

    big = Image.new(mode, (12000, 12000), 1)
    tracemalloc.start()
    try:
        out = overlay(big, np.zeros((8, 8)), alpha=0.3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.size == (2048, 2048)
    assert peak < 150_000_000  # numpy allocations; a full-size RGB array alone would be 432 MB


def test_16bit_images_are_scaled_for_display():
    raw = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    arr = to_rgb_array(Image.fromarray(raw))
    assert arr[0, 1, 0] == 255 and arr[1, 0, 0] == 128 and arr[1, 1, 0] == 4


def test_zero_sized_inputs_are_value_errors():
    with pytest.raises(ValueError, match="zero"):
        overlay(np.zeros((0, 4, 3), np.uint8), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="zero"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((0, 2)))


def test_figure_renders_itself_as_png_outside_pyplot():
    # What a notebook displays (tests/test_notebooks.py runs real kernels): one PNG of the whole figure.
    import io

    from legrad.viz import NotebookFigure

    fig = visualize(_random_image(16, 16), np.zeros((2, 16, 16)), dpi=50)
    assert isinstance(fig, NotebookFigure)
    with Image.open(io.BytesIO(fig._repr_png_())) as png:
        assert png.format == "PNG" and png.width > 2 * png.height


def test_show_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="show"):
        visualize(_random_image(8, 8), np.zeros((8, 8)), show="yes")


def test_visualize_is_exported_from_the_package_like_the_original():
    # The original LeGrad README imports it as `from legrad import LeWrapper, LePreprocess, visualize`.
    import legrad
    from legrad.viz import visualize as viz_visualize

    assert legrad.visualize is viz_visualize
    assert "visualize" in dir(legrad)

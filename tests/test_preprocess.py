"""LePreprocess: resolution change that keeps the wrapped preprocess's conversion and normalisation."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from legrad import LePreprocess
from legrad.preprocess import OPENAI_MEAN, OPENAI_STD, normalization_of


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(224, is_train=False, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _image(w=100, h=60):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,expected", [(448, (448, 448)), ((224, 320), (224, 320)), (64, (64, 64))])
def test_output_size_and_normalisation(preprocess, size, expected):
    img = _image()
    out = LePreprocess(preprocess, size)(img)
    assert out.shape == (3, *expected)
    # independent computation: bicubic resize with PIL-equivalent torchvision then normalise
    from torchvision.transforms import functional as TF

    ref = TF.to_tensor(TF.resize(img, list(expected), interpolation=TF.InterpolationMode.BICUBIC, antialias=True))
    ref = (ref - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    torch.testing.assert_close(out, ref)


def test_grayscale_and_rgba_converted(preprocess):
    gray = _image().convert("L")
    assert LePreprocess(preprocess, 32)(gray).shape == (3, 32, 32)
    assert LePreprocess(preprocess, 32)(_image().convert("RGBA")).shape == (3, 32, 32)


def test_mean_std_exposed(preprocess):
    p = LePreprocess(preprocess, 32)
    assert p.mean == pytest.approx((0.5, 0.4, 0.3)) and p.std == pytest.approx((0.2, 0.25, 0.3))
    assert normalization_of(object()) == (OPENAI_MEAN, OPENAI_STD)
    assert LePreprocess(p, 64).image_size == (64, 64)


@pytest.mark.parametrize("bad", ["448", (1, 2, 3), 0, (224, -1), 2.5, True])
def test_bad_size(preprocess, bad):
    with pytest.raises((TypeError, ValueError), match="image_size"):
        LePreprocess(preprocess, bad)


def test_bad_preprocess():
    with pytest.raises(TypeError, match="Compose"):
        LePreprocess(lambda x: x, 224)

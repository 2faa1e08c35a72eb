"""Tests of the synthetic scene generator (numpy + Pillow only, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from legrad.toy import COLOURS, SHAPES, VOCABULARY, make_scene, make_scenes, phrase_for


def test_vocabulary_covers_every_colour_and_shape():
    assert len(SHAPES) >= 4 and {"circle", "square", "triangle"} <= set(SHAPES)
    assert len(COLOURS) >= 6
    assert len(VOCABULARY) == len(set(VOCABULARY)) == len(SHAPES) * len(COLOURS)
    assert "a red circle" in VOCABULARY and "an orange star" in VOCABULARY and "a pink cross" in VOCABULARY
    assert phrase_for("blue", "cross") == "a blue cross"


def test_same_seed_same_scenes_different_seed_different_scenes():
    a, b, c = make_scenes(8, seed=3), make_scenes(8, seed=3), make_scenes(8, seed=4)
    for sa, sb in zip(a, b):
        assert sa.caption == sb.caption
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
        for oa, ob in zip(sa.objects, sb.objects):
            assert np.array_equal(oa.mask, ob.mask)
    assert any(not np.array_equal(np.asarray(sa.image), np.asarray(sc.image)) for sa, sc in zip(a, c))
    assert np.array_equal(np.asarray(make_scene(11).image), np.asarray(make_scene(np.random.default_rng(11)).image))


@pytest.mark.parametrize("size", [64, 160])
def test_scene_structure(size):
    scenes = make_scenes(60, seed=0, size=size)
    counts = set()
    for s in scenes:
        assert s.image.mode == "RGB" and s.image.size == (size, size)
        assert 1 <= len(s.objects) <= 3
        counts.add(len(s.objects))
        assert len(set(s.phrases)) == len(s.phrases)
        for o in s.objects:
            assert o.phrase in VOCABULARY
            assert o.mask.dtype == bool and o.mask.shape == (size, size)
            assert o.mask.sum() >= 20
            assert o.phrase in s.caption
    assert counts == {1, 2, 3}


def test_objects_do_not_overlap():
    for s in make_scenes(200, seed=1):
        total = np.zeros(s.objects[0].mask.shape, dtype=int)
        for o in s.objects:
            total += o.mask
        assert total.max() == 1


def test_masks_match_drawn_pixels():
    """Inside a mask the pixels carry the object's colour; the background is never that colour."""
    for s in make_scenes(100, seed=2):
        img = np.asarray(s.image, dtype=np.float32)
        union = np.zeros(img.shape[:2], dtype=bool)
        for o in s.objects:
            union |= o.mask
            dist = np.abs(img[o.mask] - np.array(o.rgb, dtype=np.float32)).max(axis=1)
            assert np.median(dist) <= 12  # only the light pixel noise remains
            assert (dist <= 30).mean() > 0.99
        # Pixels of the background a couple of pixels away from any object never match an object colour.
        grown = union.copy()
        for axis in (0, 1):
            for shift in (-2, -1, 1, 2):
                grown |= np.roll(union, shift, axis=axis)
        bg = img[~grown]
        for o in s.objects:
            dist = np.abs(bg - np.array(o.rgb, dtype=np.float32)).max(axis=1)
            assert (dist <= 30).mean() < 0.01


def test_every_colour_and_shape_occurs():
    scenes = make_scenes(300, seed=5)
    seen = {p for s in scenes for p in s.phrases}
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert len(seen) > 0.9 * len(VOCABULARY)


def test_fixed_object_count_and_bad_count():
    assert all(len(s.objects) == 2 for s in make_scenes(10, seed=0, n_objects=2))
    with pytest.raises(ValueError):
        make_scene(0, n_objects=4)

"""The bundled demo model convinces: it recognises a lone object against the phrases one word away,
points at the prompted object (also when another object has its colour), and gets every object of the
bundled demo scenes right, with the default ``LeWrapper(model)``.

These are the checks of ``bench/toy_demo_quality.py`` (the benchmark: 1000 scenes per metric, seed
2026) on 50 scenes of a seed used nowhere else. The bundled checkpoint meets issue 29's demo-quality bars
on the benchmark (docs/demo_model.md); 50 scenes cannot show a bar, so the thresholds sit about 3 standard
errors of these sample sizes below the benchmark's values (and several scenes below what these samples
measure), above the previous checkpoint, far above a random-init copy:
* recognition: benchmark 0.988 (0.94 here, 47 of 50) -> 0.80; previous checkpoint 0.66 here; random init 0.02.
* pointing game: benchmark 0.983 (0.99 here, 100 of 101 objects, SE ~0.015) -> 0.93; previous 0.91; random
  init 0.17.
* shared colour: benchmark 0.938 (0.98 here, 59 of 60 objects, SE ~0.03) -> 0.80; previous 0.43; random
  init ~0.13.
* demo scenes: a map is *right* when its peak inside the object beats its peak outside by more than
  ``TIE`` (0.01 of the [0, 1] map) and *wrong* when the reverse holds; closer peaks are near-ties whose
  argmax another CPU, thread count or batch shape may flip (measured: 12 right, 0 wrong, 2 near-ties at
  0.000 and 0.007, the closest right one by 0.033). Thresholds: >= 11 right, <= 1 wrong (one object of
  margin each way); scene 0, the playground's default, all three right. Every object's phrase is above
  every phrase sharing neither colour nor shape with its scene, and 13 of 14 above every absent phrase
  (the closest by 0.035; the pink square of scene 0 loses to an absent phrase by 0.15) -> >= 12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from legrad import LeWrapper
from legrad.toy import COLOURS, SHAPES, VOCABULARY, load_model, make_scenes, phrase_for
from legrad.toy.model import CHECKPOINT_PATH, build_model, load_checkpoint
from legrad.toy.scenes import draw_sample_scenes, make_scene

SEED = 777001  # used by no training stream, validation or benchmark
RECOGNITION_THRESHOLD = 0.80
PG_THRESHOLD = 0.93
PG_SHARED_THRESHOLD = 0.80
DEMO_MAPS_RIGHT = 11
DEMO_MAPS_WRONG = 1
DEMO_RANKINGS_RIGHT = 12
TIE = 0.01  # peaks closer than this are near-ties (float noise across CPUs is ~1e-5)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy():
    return load_model()


def _side(model) -> int:
    return model.visual.image_size[0]


def _vocab(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenizer(list(VOCABULARY)), normalize=True)


def _recognition(model, preprocess, tokenizer, scenes) -> float:
    vocab = _vocab(model, tokenizer)
    with torch.no_grad():
        sims = model.encode_image(torch.stack([preprocess(s.image) for s in scenes]), normalize=True) @ vocab.T
    hits = 0
    for s, row in zip(scenes, sims):
        o = s.objects[0]
        own = row[VOCABULARY.index(o.phrase)]
        # Every phrase one word away: the same shape in the 7 other colours, the same colour in the 4 other shapes.
        others = [phrase_for(c, o.shape) for c in COLOURS if c != o.colour] + [
            phrase_for(o.colour, s) for s in SHAPES if s != o.shape]
        assert len(others) == 11
        hits += all(own > row[VOCABULARY.index(p)] for p in others)
    return hits / len(scenes)


def _hits(model, preprocess, tokenizer, scenes) -> list[tuple[bool, bool]]:
    """(argmax inside the mask, the object's colour is shared) per object, default LeWrapper."""
    wrapper = LeWrapper(model)
    vocab = _vocab(model, tokenizer)
    out = []
    for s in scenes:
        image = preprocess(s.image).unsqueeze(0)
        maps = wrapper.compute_legrad(vocab[[VOCABULARY.index(p) for p in s.phrases]], image=image)[0]
        side = maps.shape[-1]
        for k, o in enumerate(s.objects):
            y, x = np.unravel_index(int(maps[k].argmax()), (side, side))
            scale = o.mask.shape[0] / side
            shared = any(p.colour == o.colour for j, p in enumerate(s.objects) if j != k)
            out.append((bool(o.mask[int((y + 0.5) * scale), int((x + 0.5) * scale)]), shared))
    return out


def test_recognises_a_lone_object_against_phrases_one_word_away(toy):
    model, preprocess, tokenizer = toy
    scenes = make_scenes(50, seed=SEED, size=_side(model), n_objects=1)
    assert _recognition(model, preprocess, tokenizer, scenes) >= RECOGNITION_THRESHOLD
    torch.manual_seed(0)
    random_model = build_model(load_checkpoint(CHECKPOINT_PATH, fold=False)[1]).eval()
    assert _recognition(random_model, preprocess, tokenizer, scenes) < RECOGNITION_THRESHOLD / 2  # it can fail


def test_points_at_the_prompted_object_also_when_its_colour_is_shared(toy):
    model, preprocess, tokenizer = toy
    hits = _hits(model, preprocess, tokenizer, make_scenes(50, seed=SEED + 1, size=_side(model)))
    assert np.mean([h for h, _ in hits]) >= PG_THRESHOLD
    # Scenes drawn until two objects share a colour (a property of the scene, not of the model).
    rng = np.random.default_rng(SEED + 2)
    shared_scenes = []
    while len(shared_scenes) < 30:
        s = make_scene(rng, size=_side(model))
        if len({o.colour for o in s.objects}) < len(s.objects):
            shared_scenes.append(s)
    shared = [h for h, sh in _hits(model, preprocess, tokenizer, shared_scenes) if sh]
    assert len(shared) >= 60
    assert np.mean(shared) >= PG_SHARED_THRESHOLD


def _peak_margins(model, preprocess, tokenizer, scenes) -> list[float]:
    """Per object: the map's peak inside the object's mask minus its peak outside (default LeWrapper)."""
    wrapper = LeWrapper(model)
    vocab = _vocab(model, tokenizer)
    out = []
    for s in scenes:
        maps = wrapper.compute_legrad(vocab[[VOCABULARY.index(p) for p in s.phrases]],
                                      image=preprocess(s.image).unsqueeze(0))[0].numpy()
        side = maps.shape[-1]
        for k, o in enumerate(s.objects):
            centres = ((np.arange(side) + 0.5) * (o.mask.shape[0] / side)).astype(int)
            inside = o.mask[np.ix_(centres, centres)]  # the same pixel-centre rule as _hits
            out.append(float(maps[k][inside].max() - maps[k][~inside].max()))
    return out


def test_the_bundled_demo_scenes(toy):
    model, preprocess, tokenizer = toy
    vocab = _vocab(model, tokenizer)
    scenes = draw_sample_scenes()  # the bundled scenes (legrad/assets/scenes), drawn again with their masks
    assert sum(len(s.objects) for s in scenes) == 14
    margins = _peak_margins(model, preprocess, tokenizer, scenes)
    assert all(m > TIE for m in margins[:len(scenes[0].objects)])  # the playground's default scene
    assert sum(m > TIE for m in margins) >= DEMO_MAPS_RIGHT
    assert sum(m < -TIE for m in margins) <= DEMO_MAPS_WRONG
    ranked_first = 0
    for s in scenes:
        with torch.no_grad():
            sims = (model.encode_image(preprocess(s.image).unsqueeze(0), normalize=True) @ vocab.T)[0]
        present = [VOCABULARY.index(p) for p in s.phrases]
        absent = [i for i in range(len(VOCABULARY)) if i not in present]
        ranked_first += int((sims[present] > sims[absent].max()).sum())
        words = {w for p in s.phrases for w in p.split()[1:]}
        # Contrast prompts as the playground picks them: sharing neither colour nor shape with the scene.
        unrelated = [i for i, v in enumerate(VOCABULARY) if not words & set(v.split()[1:])]
        assert unrelated and sims[present].min() > sims[unrelated].max(), s.caption
    assert ranked_first >= DEMO_RANKINGS_RIGHT

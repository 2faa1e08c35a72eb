"""A small real CLIP trained on synthetic scenes, bundled for offline demos and localization checks.

Usage::

    from legrad import LeWrapper
    from legrad.toy import LAYER_INDEX, load_model, make_scenes

    model, preprocess, tokenizer = load_model()          # offline, plain open_clip CLIP
    wrapper = LeWrapper(model, layer_index=LAYER_INDEX)
    scene = make_scenes(1, seed=0)[0]                    # PIL image, caption, per-object masks
    text = model.encode_text(tokenizer([scene.objects[0].phrase]), normalize=True)
    heatmap = wrapper.compute_legrad(text, image=preprocess(scene.image).unsqueeze(0))

The scene generator only needs numpy and Pillow; the model parts (`load_model`, `LAYER_INDEX`,
`ToyConfig`, ...) import torch/open_clip lazily on first access.
"""

from __future__ import annotations

from typing import Any

from .scenes import COLOURS, SHAPES, VOCABULARY, Scene, SceneObject, make_scene, make_scenes, phrase_for

_LAZY = {"load_model", "LAYER_INDEX", "CHECKPOINT_PATH", "ToyConfig", "load_checkpoint"}

__all__ = [
    "COLOURS",
    "SHAPES",
    "VOCABULARY",
    "Scene",
    "SceneObject",
    "make_scene",
    "make_scenes",
    "phrase_for",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)

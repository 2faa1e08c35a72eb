"""A small real CLIP trained on synthetic scenes, bundled for offline demos and localization checks.

Usage::

    from legrad import LeWrapper
    from legrad.toy import load_model, make_scenes

    model, preprocess, tokenizer = load_model()          # offline, plain open_clip CLIP
    wrapper = LeWrapper(model)                           # the model's recommended LAYER_INDEX
    scene = make_scenes(1, seed=0)[0]                    # PIL image, caption, per-object masks
    text = model.encode_text(tokenizer([scene.objects[0].phrase]), normalize=True)
    heatmap = wrapper.compute_legrad(text, image=preprocess(scene.image).unsqueeze(0))

``create_model_and_transforms()`` / ``get_tokenizer()`` give the same in open_clip's shapes
(``model, _, preprocess = ...``). The loaded model takes OpenAI's CLIP normalisation (the training
normalisation is folded into its weights, see `legrad.toy.model`).

The scene generator only needs numpy and Pillow; the model parts (`load_model`, `LAYER_INDEX`,
`ToyConfig`, ...) import torch/open_clip lazily on first access.
"""

from __future__ import annotations

from typing import Any

from .scenes import COLOURS, SHAPES, VOCABULARY, Scene, SceneObject, make_scene, make_scenes, phrase_for

_LAZY = {
    "load_model", "LAYER_INDEX", "CHECKPOINT_PATH", "ToyConfig", "load_checkpoint", "create_model_and_transforms",
    "get_tokenizer",
}

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

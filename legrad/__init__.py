"""legrad: LeGrad explainability heatmaps for vision-language Vision Transformers (OpenCLIP).

Usage::

    model = LeWrapper(open_clip_model)            # layer_index: the model's recommended one, else -2
    maps = model.compute_legrad(text_embedding, image=images)   # [B, P, H, W] in [0, 1]

The names below are imported on first use (module ``__getattr__``), so ``import legrad`` (and
``import legrad.cli`` / ``legrad.toy``) does not import torch or any model library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "2.0.0"

# name -> module that defines it
_EXPORTS = {
    "LeWrapper": "legrad.wrapper",
    "DriftError": "legrad.adapters.drift",
    "LePreprocess": "legrad.preprocess",
    "list_pretrained": "legrad.pretrained",
    "LayerStep": "legrad.engine.step",
    "LeGradOutput": "legrad.engine.scores",
    "TowerAdapter": "legrad.adapters.base",
    "register_tower": "legrad.adapters.registry",
    "supported_tower_names": "legrad.adapters.registry",
    "register_attention_ops": "legrad.ops.attention",
    # The original LeGrad package's `from legrad import LeWrapper, LePreprocess, visualize` keeps working;
    # matplotlib is still only imported when visualize is first used.
    "visualize": "legrad.viz",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'legrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

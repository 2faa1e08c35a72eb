"""Explanation methods as peers: ``Method(model, **options).attribute(inputs, target=..., **call_options)``
returns ``[B, P, H, W]`` maps.

* :class:`LeGrad` -- LeGrad (:meth:`legrad.LeWrapper.compute_legrad`'s pipeline call);
* :class:`GradCAM`, :class:`CheferCAM` -- gradient baselines; :class:`AttentionRollout`,
  :class:`RawAttention` -- attention baselines (the maps of :mod:`legrad.eval.baselines`);
* targets (:mod:`legrad.methods.targets`): :class:`Text`, :class:`Classes`, :class:`Answers`, :class:`Score`;
* the registry (:mod:`legrad.methods.registry`): :data:`METHODS`, :func:`register_method`, :func:`make_method`.

Example::

    from legrad.methods import GradCAM, LeGrad, Score
    maps = LeGrad(model).attribute(images, target=text_embedding)            # [B, P, H, W] in [0, 1]
    raw = GradCAM(classifier).attribute(images, target=[281], normalize=False)
    maps = LeGrad(classifier).attribute(images, target=Score(lambda logits: logits[:, [281]] - logits[:, [285]]))

Names are imported on first use, so ``import legrad.methods`` loads no model library.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Method": "legrad.methods.base",
    "LeGrad": "legrad.methods.legrad",
    "GradCAM": "legrad.methods.gradients",
    "CheferCAM": "legrad.methods.gradients",
    "AttentionRollout": "legrad.methods.attention",
    "RawAttention": "legrad.methods.attention",
    "Target": "legrad.methods.targets",
    "Text": "legrad.methods.targets",
    "Classes": "legrad.methods.targets",
    "Answers": "legrad.methods.targets",
    "Score": "legrad.methods.targets",
    "METHODS": "legrad.methods.registry",
    "register_method": "legrad.methods.registry",
    "make_method": "legrad.methods.registry",
    "method_names": "legrad.methods.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'legrad.methods' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

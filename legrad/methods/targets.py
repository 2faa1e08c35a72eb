"""What a map explains, as types: text, classes, VLM answers, or a score function of the model's readout.

The target types live in the engine (:mod:`legrad.engine.targets`), where the pipeline calls them; this
module re-exports them for the methods and adds :func:`as_target`, which resolves a plain value:

* :class:`Text` -- normalised text embeddings ``[P, D]`` (shared by the batch) or ``[B, P, D]`` (per
  image), or strings encoded with a tokenizer (CLIP-like models);
* :class:`Classes` -- class indices ``[P]`` / ``[B, P]`` (image classifiers);
* :class:`Answers` -- candidate answers of a vision-language model (strings or token-id tensors);
* :class:`Score` -- a function of the model's readout (a CLIP-like tower's un-normalised image embedding
  ``[B, E]``, a classifier's logits ``[B, K]``) returning the ``[B, P]`` scores to explain, as
  pytorch-grad-cam's targets. ``Score(lambda r: F.normalize(r, dim=-1) @ t.T)`` is ``Text(t)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..engine.targets import Answers, AnswerScores, Classes, Logits, Score, Target, Text

__all__ = ["Target", "Text", "Classes", "Answers", "Score", "as_target", "target_kind", "is_classifier",
           "TEXT", "CLASSES", "ANSWERS"]

#: The kinds of target a model is explained against (:func:`target_kind`).
TEXT, CLASSES, ANSWERS = "text", "classes", "answers"


def target_kind(adapter: Any) -> str:
    """The kind of target a tower adapter explains (from its readout space): :data:`TEXT`, :data:`CLASSES`
    or :data:`ANSWERS`."""
    space = adapter.readout_space
    if isinstance(space, Logits):
        return CLASSES
    if isinstance(space, AnswerScores):
        return ANSWERS
    return TEXT


def is_classifier(adapter: Any) -> bool:
    """Whether the adapter's model is an image classifier (explained against class indices)."""
    return isinstance(adapter.readout_space, Logits)

def as_target(target: Any, adapter: Any) -> Target:
    """``target`` as a :class:`Target`: a Target as is, else a plain value resolved for the model's kind.

    Plain values: a callable is a :class:`Score`; a floating tensor, text embeddings; an int, ints or an
    integer tensor, class indices; strings, text prompts (CLIP-like) or answers (VLMs).

    Raises:
        TypeError: for a value none of these, or None.
    """
    if isinstance(target, Target):
        return target
    kind = target_kind(adapter)
    if target is None:
        need = {TEXT: "text embeddings (Text(...))", CLASSES: "class indices (Classes(...))",
                ANSWERS: "candidate answers (Answers(...))"}[kind]
        raise TypeError(f"target= is required: this model ({adapter.family}) is explained against {need}")
    if isinstance(target, torch.Tensor):
        if target.is_floating_point():
            return Text(target)
        return Classes(target)
    if callable(target):
        return Score(target)
    if isinstance(target, (str, Sequence)) and not isinstance(target, (bytes, bytearray)):
        items = [target] if isinstance(target, str) else list(target)
        if items and all(isinstance(t, str) for t in items):
            return Answers(target) if kind == ANSWERS else Text(target)
        if kind == ANSWERS:
            return Answers(target)
    if kind == ANSWERS:
        return Answers(target)
    if isinstance(target, bool):
        raise TypeError("target must be class indices, text or a score function, got a bool")
    if isinstance(target, (int, Sequence)) or hasattr(target, "__array__"):
        return Classes(target)
    raise TypeError(f"target must be a Text, Classes, Answers or Score target (or a tensor, ints, strings or a "
                    f"function), got {type(target).__name__}")

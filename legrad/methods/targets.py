"""What a map explains, as types: text, classes, VLM answers, or a score function of the model's readout.

Every method of :mod:`legrad.methods` takes ``target=`` as one of these (or a plain value that
:func:`as_target` resolves without ambiguity):

* :class:`Text` -- normalised text embeddings ``[P, D]`` (shared by the batch) or ``[B, P, D]`` (per
  image), or strings encoded with a tokenizer (CLIP-like models);
* :class:`Classes` -- class indices ``[P]`` / ``[B, P]`` (image classifiers);
* :class:`Answers` -- candidate answers of a vision-language model (strings or token-id tensors);
* :class:`Score` -- a function of the model's readout (a CLIP-like tower's un-normalised image embedding
  ``[B, E]``, a classifier's logits ``[B, K]``) returning the ``[B, P]`` scores to explain, as
  pytorch-grad-cam's targets. ``Score(lambda r: F.normalize(r, dim=-1) @ t.T)`` is ``Text(t)``.

This module is the one place outside the engine that reads an adapter's kind of target
(:func:`target_kind`); the engine itself still keys its validation on the adapter's ``scorer`` attribute
(:mod:`legrad.engine.pipeline`), which item 8 of issue 28 (a smaller adapter protocol) is to remove.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Target", "Text", "Classes", "Answers", "Score", "as_target", "target_kind", "is_classifier",
           "TEXT", "CLASSES", "ANSWERS"]

#: The kinds of target a model is explained against (:func:`target_kind`).
TEXT, CLASSES, ANSWERS = "text", "classes", "answers"

# The adapters' scorer flags, translated here once.
_KINDS = {"cosine": TEXT, "dot": TEXT, "logit": CLASSES, "answer": ANSWERS}


def target_kind(adapter: Any) -> str:
    """The kind of target a tower adapter explains: :data:`TEXT`, :data:`CLASSES` or :data:`ANSWERS`."""
    return _KINDS.get(getattr(adapter, "scorer", "cosine"), TEXT)


def is_classifier(adapter: Any) -> bool:
    """Whether the adapter's model is an image classifier (explained against class indices)."""
    return target_kind(adapter) == CLASSES


class Target:
    """A target of an explanation: what :meth:`request` gives the pipeline for a model."""

    def request(self, wrapper: Any) -> dict[str, Any]:
        """The :class:`legrad.engine.pipeline.Request` fields of this target (``text``, ``target`` or ``score``).

        Args:
            wrapper: the :class:`~legrad.LeWrapper` of the explained model.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Text(Target):
    """Text prompts: normalised embeddings ``[P, D]`` / ``[B, P, D]``, or strings and a tokenizer.

    Attributes:
        text: the embeddings (used as given), or a string / list of P strings.
        tokenizer: list of str -> token ids for ``model.encode_text``; None: the wrapper's ``tokenizer``.
    """

    text: Any
    tokenizer: Callable | None = None

    def request(self, wrapper: Any) -> dict[str, Any]:
        text = self.text
        if isinstance(text, str):
            text = [text]
        if isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text):
            tokenizer = self.tokenizer if self.tokenizer is not None else wrapper.tokenizer
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer: Text(prompts, tokenizer=tokenizer), or wrap "
                                 "the model with LeWrapper(model, tokenizer=tokenizer)")
            with torch.no_grad():
                tokens = tokenizer(list(text)).to(wrapper.adapter.device())
                text = F.normalize(wrapper.model.encode_text(tokens).float(), dim=-1)
        return {"text": text}


@dataclass(frozen=True)
class Classes(Target):
    """Class indices of an image classifier: an int, ints, or a LongTensor ``[P]`` (shared) / ``[B, P]``."""

    classes: Any

    def request(self, wrapper: Any) -> dict[str, Any]:
        return {"target": self.classes}


@dataclass(frozen=True)
class Answers(Target):
    """Candidate answers of a vision-language model: strings (the wrapper's tokenizer) or token-id tensors."""

    answers: Any

    def request(self, wrapper: Any) -> dict[str, Any]:
        return {"answers": self.answers}


@dataclass(frozen=True)
class Score(Target):
    """A score function ``readout [B, E] -> [B, P]``, differentiable (pytorch-grad-cam's targets).

    The readout is what the model scores: a CLIP-like tower's un-normalised image embedding (LeGrad:
    each explained layer's), an image classifier's logits. SigLIP's empty-prompt correction does not
    apply (there is no empty prompt to score).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Score takes a function of the readout [B, E] -> [B, P], got {type(self.fn).__name__}")

    def request(self, wrapper: Any) -> dict[str, Any]:
        return {"score": self.fn}


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

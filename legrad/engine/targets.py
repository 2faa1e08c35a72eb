"""What a map explains, as types: the tower's readout space and the targets scored in it.

A tower adapter describes what its readout is (``adapter.readout_space``), as a type:

* :class:`Embedding` -- an image embedding ``[B, width]`` compared with text embeddings (CLIP-like towers);
* :class:`Logits` -- an image classifier's logits ``[B, classes]``;
* :class:`AnswerScores` -- a vision-language model, whose readout is the log-probability of an answer.

A target says what is scored in that space; it alone checks that it fits the model, validates its values
before any work, and scores a layer's readout:

* :class:`Text` -- normalised text embeddings ``[P, D]`` (shared by the batch) or ``[B, P, D]`` (per
  image), or strings encoded by the model's text tower with a tokenizer;
* :class:`Classes` -- class indices ``[P]`` / ``[B, P]`` (image classifiers);
* :class:`Answers` -- candidate answers of a vision-language model (strings or token-id tensors), explained
  by the model's own language head (:meth:`legrad.LeWrapper.compute_legrad` with ``answers=``);
* :class:`Score` -- a function of the readout (un-normalised embedding ``[B, E]`` or logits ``[B, K]``)
  returning the ``[B, P]`` scores to explain, as pytorch-grad-cam's targets.
  ``Score(lambda r: F.normalize(r, dim=-1) @ t.T)`` is ``Text(t)``.

The pipeline (:mod:`legrad.engine.pipeline`) calls only the :class:`Target` protocol; no other module
keys behaviour on the kind of target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .step import Scorer, compute_dtype_for, cosine_scores, dot_scores, logit_scores
from .validation import check_targets, check_text

__all__ = ["Embedding", "Logits", "AnswerScores", "ReadoutSpace", "Target", "Text", "Classes", "Answers", "Score"]


# ------------------------------------------------------------------------------------------ readout spaces
@dataclass(frozen=True)
class Embedding:
    """A vision-language tower's image embedding ``[B, width]``, compared with text embeddings.

    Attributes:
        width: the embedding width (the text embeddings' width).
        cosine: scored by cosine similarity; False: by a plain dot product (legrad-torch 1.1's CoCa
            maps, ``LeWrapper(reference="1.1")``).
    """

    width: int
    cosine: bool = True


@dataclass(frozen=True)
class Logits:
    """An image classifier's logits ``[B, classes]``."""

    classes: int


@dataclass(frozen=True)
class AnswerScores:
    """A vision-language model: the readout is an answer's log-probability under the model's language head."""


ReadoutSpace = Embedding | Logits | AnswerScores

_VLM_HINT = ("a vision-language model explains candidate answers: compute_legrad(image=processor_output, "
             "answers=['a cat', 'a dog']) (or target=Answers([...]))")


def _refuse_answers(space: Any) -> None:
    if isinstance(space, AnswerScores):
        raise TypeError(_VLM_HINT)


# ------------------------------------------------------------------------------------------ targets
class Target:
    """A target of an explanation: checked against the model's readout space, then scored there.

    Subclasses implement :meth:`check` and :meth:`prompts`, and :meth:`outputs` where ``return_scores``
    applies.
    """

    #: Whether the empty-prompt correction of attention-pooled towers applies (text prompts only).
    correctable: ClassVar[bool] = False

    def check(self, adapter: Any) -> None:
        """Checks that the target fits the model (its ``adapter.readout_space``), before any work.

        Raises:
            TypeError: naming what the model explains instead, and how to pass it.
        """
        raise NotImplementedError

    def prompts(self, adapter: Any, model: Any, tokenizer: Any, batch: int) -> tuple[torch.Tensor, Scorer]:
        """The validated prompts and the scorer of a layer's readout against them.

        Args:
            adapter: the model's tower adapter.
            model: the model (its text tower encodes string prompts).
            tokenizer: the wrapper's tokenizer (used when the target has none of its own).
            batch: B, the image batch size.

        Returns:
            ``(prompts, scorer)``: prompts ``[P, ...]`` shared by the batch or ``[B, P, ...]`` per image,
            and ``scorer(readout [B, E], prompts) -> [B, P]``, differentiable in the readout.

        Raises:
            TypeError, ValueError: on bad values, naming the fix.
        """
        raise NotImplementedError

    def outputs(self, readout: torch.Tensor, prompts: torch.Tensor, num_prompts: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_features, scores)`` of ``return_scores`` from the model's own readout ``[B, E]``.

        Raises:
            ValueError: where the target has no model scores to return.
        """
        raise ValueError(f"return_scores=True is not available for a {type(self).__name__} target")

    #: Whether :meth:`outputs` applies (checked before any work).
    returns_scores: ClassVar[bool] = True


@dataclass(frozen=True)
class Text(Target):
    """Text prompts: normalised embeddings ``[P, D]`` / ``[B, P, D]``, or strings and a tokenizer.

    Attributes:
        text: the embeddings (used as given), or a string / list of P strings.
        tokenizer: list of str -> token ids for the model's text tower; None: the wrapper's ``tokenizer``.
    """

    text: Any
    tokenizer: Callable | None = None
    correctable: ClassVar[bool] = True

    def check(self, adapter: Any) -> None:
        space = adapter.readout_space
        _refuse_answers(space)
        if isinstance(space, Logits):
            if self.text is None:  # nothing given: say what a classifier needs
                check_targets(None, 1, space.classes)
            hint = ""
            if isinstance(self.text, torch.Tensor) and self.text.ndim == 4:
                hint = " (the image goes in image=...: compute_legrad(image=x, target=...))"
            raise TypeError(
                f"this model is an image classifier ({adapter.family}): it explains class logits, not text; pass "
                f"target=class indices instead of text_embedding{hint}"
            )

    def _strings(self) -> list[str] | None:
        text = [self.text] if isinstance(self.text, str) else self.text
        if isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text):
            return list(text)
        return None

    def prompts(self, adapter: Any, model: Any, tokenizer: Any, batch: int) -> tuple[torch.Tensor, Scorer]:
        text = self.text
        strings = self._strings()
        if strings is not None:
            tokenizer = self.tokenizer if self.tokenizer is not None else tokenizer
            if tokenizer is None:
                raise TypeError("text must be a torch.Tensor [P, D] / [B, P, D] of text embeddings, or strings with "
                                "a tokenizer: Text(prompts, tokenizer=tokenizer), or wrap the model with "
                                "LeWrapper(model, tokenizer=tokenizer)")
            with torch.no_grad():
                text = adapter.encode_prompts(model, tokenizer, strings)
        space = adapter.readout_space
        text = check_text(text, space.width, batch)
        return text, cosine_scores if space.cosine else dot_scores

    def outputs(self, readout: torch.Tensor, prompts: torch.Tensor, num_prompts: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return F.normalize(readout, dim=-1), cosine_scores(readout, prompts[..., :num_prompts, :])


@dataclass(frozen=True)
class Classes(Target):
    """Class indices of an image classifier: an int, ints, or a LongTensor ``[P]`` (shared) / ``[B, P]``."""

    classes: Any

    def check(self, adapter: Any) -> None:
        space = adapter.readout_space
        _refuse_answers(space)
        if not isinstance(space, Logits):
            raise TypeError(
                f"target= selects classes of an image classifier, but this model's tower ({adapter.family}) is "
                "explained against text: pass text_embedding (e.g. model.encode_text(tokens, normalize=True))"
            )

    def prompts(self, adapter: Any, model: Any, tokenizer: Any, batch: int) -> tuple[torch.Tensor, Scorer]:
        return check_targets(self.classes, batch, adapter.readout_space.classes), logit_scores

    def outputs(self, readout: torch.Tensor, prompts: torch.Tensor, num_prompts: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return readout, logit_scores(readout, prompts)


@dataclass(frozen=True)
class Answers(Target):
    """Candidate answers of a vision-language model: strings (the wrapper's tokenizer) or token-id tensors.

    Explained by the model's language head (the VLM path of :meth:`legrad.LeWrapper.compute_legrad`), not by
    :meth:`prompts`.
    """

    answers: Any

    def check(self, adapter: Any) -> None:
        if not isinstance(adapter.readout_space, AnswerScores):
            raise TypeError(f"answers= applies to vision-language models (LLaVA, PaliGemma, Qwen-VL, ...); this "
                            f"model's tower ({adapter.family}) is explained against text_embedding")

    def prompts(self, adapter: Any, model: Any, tokenizer: Any, batch: int) -> tuple[torch.Tensor, Scorer]:
        raise TypeError("answers are explained by LeWrapper.compute_legrad(image=..., answers=...)")


@dataclass(frozen=True)
class Score(Target):
    """A score function ``readout [B, E] -> [B, P]``, differentiable (pytorch-grad-cam's targets).

    The readout is what the model scores: a CLIP-like tower's un-normalised image embedding (LeGrad:
    each explained layer's), an image classifier's logits. SigLIP's empty-prompt correction does not
    apply (there is no empty prompt to score), nor ``return_scores`` (call the function on the model's
    output yourself).
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    returns_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Score takes a function of the readout [B, E] -> [B, P], got {type(self.fn).__name__}")

    def check(self, adapter: Any) -> None:
        _refuse_answers(adapter.readout_space)

    def prompts(self, adapter: Any, model: Any, tokenizer: Any, batch: int) -> tuple[torch.Tensor, Scorer]:
        # A probe on a zero readout checks the function's contract (floating [B, P]) before any work and finds P.
        space = adapter.readout_space
        width = space.classes if isinstance(space, Logits) else space.width
        with torch.no_grad():
            probe = self.fn(torch.zeros(batch, width, device=adapter.device(),
                                        dtype=compute_dtype_for(adapter.param_dtype())))
        if not isinstance(probe, torch.Tensor) or probe.ndim != 2 or probe.shape[0] != batch or probe.shape[1] < 1 \
                or not probe.is_floating_point():
            got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ValueError(f"a score function must return floating scores [B, P] = [{batch}, P] for a readout "
                             f"[{batch}, {width}], got {got}")
        fn = self.fn

        def scorer(feature: torch.Tensor, _prompts: torch.Tensor) -> torch.Tensor:
            return fn(feature)

        return torch.zeros(probe.shape[1], 0), scorer

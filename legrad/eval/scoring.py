"""What the perturbation test (:func:`legrad.eval.metrics.perturbation_curve`) scores on perturbed images:
the image-text cosine of a CLIP-style model's ``encode_image``, or the target class's logit of an image
classifier's own forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.targets import Logits
from ..engine.validation import check_targets

__all__ = ["Scorer", "class_scorer", "known_num_classes", "text_scorer"]

#: ``score(model output [N, ...], [(image, prompt, fraction)] * N) -> [N]`` float64 scores.
Scorer = Callable[[torch.Tensor, list[tuple[int, int, int]]], torch.Tensor]


def text_scorer(model: Any, text_embedding: Any, b: int, p: int,
                device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], Scorer]:
    """The model's ``encode_image`` and the cosine of its rows with the prompt of each (image, prompt, fraction).

    Args:
        model: an OpenCLIP model / wrapper, or a callable ``images [N, C, H, W] -> embeddings [N, D]``.
        text_embedding: ``[P, D]`` or ``[B, P, D]`` prompt embeddings.
        b, p: the maps' batch and prompt counts.
        device: where the images are.

    Returns:
        ``(forward, score)``.

    Raises:
        TypeError, ValueError: for a model without ``encode_image`` that is not callable, or mismatched text.
    """
    encode = getattr(model, "encode_image", model)
    if not callable(encode):
        raise TypeError(f"model must have encode_image or be callable, got {type(model).__name__}")
    if text_embedding is None:
        raise ValueError("give text_embedding [P, D] / [B, P, D] (or target=class indices for an image classifier)")
    if not isinstance(text_embedding, torch.Tensor) or text_embedding.ndim not in (2, 3):
        raise ValueError("text_embedding must be a tensor [P, D] or [B, P, D]")
    if text_embedding.shape[-2] != p or (text_embedding.ndim == 3 and text_embedding.shape[0] != b):
        raise ValueError(
            f"text_embedding {tuple(text_embedding.shape)} does not match maps [B={b}, P={p}, ...]: one prompt per map"
        )
    text = text_embedding.detach().to(device, torch.float64)
    text = text.expand(b, -1, -1) if text.ndim == 2 else text

    def score(emb: torch.Tensor, where: list[tuple[int, int, int]]) -> torch.Tensor:
        emb = F.normalize(emb.double(), dim=-1)
        rows = torch.stack([text[bi, pi] for bi, pi, _ in where]).to(emb.device)
        return (emb * rows).sum(-1)

    return encode, score


def known_num_classes(model: Any) -> int | None:
    """The class count of a wrapped classifier (its adapter) or a model exposing ``num_classes``; else None."""
    adapter = getattr(model, "adapter", None)
    space = getattr(adapter, "readout_space", None)
    if isinstance(space, Logits):
        return space.classes
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def class_scorer(model: Any, target: Any, b: int, p: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], Scorer]:
    """The model's forward (logits ``[N, K]``) and the target logit of each (image, class, fraction).

    Args:
        model: an image classifier, its :class:`~legrad.LeWrapper`, or a callable ``images -> logits [N, K]``
            (an output with ``.logits`` is accepted).
        target: class indices, checked by :func:`legrad.engine.validation.check_targets`.
        b, p: the maps' batch and prompt counts.

    Returns:
        ``(forward, score)``.

    Raises:
        TypeError, ValueError: for bad targets (the class range once the model's logits are seen, when the
            class count is not known up front).
    """
    if not callable(model):
        raise TypeError(f"model must be a callable image classifier (images -> logits), got {type(model).__name__}")
    known = known_num_classes(model)
    classes = check_targets(target, b, known if known is not None else 2**62)
    if classes.shape[-1] != p:
        raise ValueError(f"target holds {classes.shape[-1]} classes but maps have P={p}: one class per map")
    classes = classes.expand(b, -1) if classes.ndim == 1 else classes

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if not isinstance(logits, torch.Tensor):
            logits = getattr(logits, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise TypeError("with target=, the model's forward must return logits [N, K] (or an output with .logits)")
        return logits

    def score(logits: torch.Tensor, where: list[tuple[int, int, int]]) -> torch.Tensor:
        idx = torch.tensor([int(classes[bi, pi]) for bi, pi, _ in where], device=logits.device)
        if int(idx.max()) >= logits.shape[1]:
            check_targets(classes, b, logits.shape[1])  # raises, naming the class and the model's range
        return logits.double().gather(1, idx[:, None])[:, 0]

    return forward, score

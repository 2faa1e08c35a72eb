"""The empty-prompt correction of attention-pooled (SigLIP-style) towers.

Maps of towers whose embedding comes from an attention pooler (``map`` pool) tend to light up the
same few tokens whatever the prompt. The correction computes the map of a content-free prompt
(``"a photo of a"``) alongside the real prompts (one extra prompt in the same batched backward, no
extra forward), min-max normalises it on the patch grid and zeroes the real maps wherever it exceeds
a threshold; the pipeline then upsamples and min-max normalises as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .maps import min_max

__all__ = ["EMPTY_PROMPT", "resolve_empty_embedding", "apply_empty_prompt_correction"]

#: The content-free prompt whose map marks the tokens to suppress.
EMPTY_PROMPT = "a photo of a"


def resolve_empty_embedding(
    model: nn.Module,
    adapter: Any,
    tokenizer: Any,
    embedding: torch.Tensor | None,
) -> torch.Tensor:
    """The ``[D]`` embedding of :data:`EMPTY_PROMPT` for the correction.

    An explicit ``embedding`` is used as given; otherwise the prompt is encoded by the adapter's
    ``encode_prompts(model, tokenizer, prompts)`` (the family's own text API). Nothing is ever downloaded.
    The adapter's ``correction_hint`` says how to provide the prompt when it is missing.

    Raises:
        ValueError: if neither is available, or the embedding has the wrong shape or width.
        TypeError: if the explicit embedding is not a float tensor.
    """
    dim = adapter.embed_dim
    if embedding is not None:
        if not isinstance(embedding, torch.Tensor) or not embedding.is_floating_point():
            raise TypeError(f"empty_text_embedding must be a float torch.Tensor [D], got {type(embedding).__name__}")
        emb = embedding.detach().reshape(-1) if embedding.ndim == 2 and embedding.shape[0] == 1 else embedding
        if emb.ndim != 1 or emb.shape[0] != dim:
            raise ValueError(
                f"empty_text_embedding must be [D] with D={dim} (the text embedding width), got shape "
                f"{tuple(embedding.shape)}"
            )
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("empty_text_embedding contains NaN or infinite values")
        return emb.detach()
    if tokenizer is None:
        raise ValueError(
            f"this tower ({adapter.family}) applies the empty-prompt correction, which needs the embedding of "
            f"the prompt {EMPTY_PROMPT!r}: {adapter.correction_hint}"
        )
    with torch.no_grad():
        emb = adapter.encode_prompts(model, tokenizer, [EMPTY_PROMPT])
    emb = emb.reshape(-1)
    if emb.shape[0] != dim:
        raise ValueError(
            f"the tokenizer's prompt encodes to width {emb.shape[0]}, the image tower's is {dim}; "
            f"{adapter.correction_hint}"
        )
    return emb


def apply_empty_prompt_correction(rel: torch.Tensor, rel_empty: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zeroes relevance where the empty prompt's min-max normalised relevance exceeds ``threshold``.

    Args:
        rel: ``[B, P, N]`` relevance of the real prompts on the patch grid (summed over layers).
        rel_empty: ``[B, 1, N]`` relevance of the empty prompt.
        threshold: in [0, 1].

    Returns:
        ``[B, P, N]`` corrected relevance (a new tensor).
    """
    return rel.masked_fill(min_max(rel_empty) > threshold, 0.0)

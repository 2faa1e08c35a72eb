"""Scores with the maps: ``compute_legrad(..., return_scores=True)``.

The tower is run once for the maps (:meth:`legrad.adapters.base.TowerAdapter.steps`): the blocks before
the first explained one without a graph, then every explained block up to the tower's **last** block
(``layer_index`` only chooses where the explained layers start, they always run to the end). So the
last step already sees the tower's final tokens, and the model's own image embedding (its real pooling
and head, what ``encode_image`` returns; the logits for a classifier) comes from them with no second
forward pass: :func:`model_output` applies the adapter's readout (its pooling and head) to the last block's
output, or, for attention-pooled towers, takes the last step's feature (the pooler on the final tokens *is*
the model's embedding). The call's target turns it into ``(image_features, scores)``
(:meth:`legrad.engine.targets.Target.outputs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch

from .step import LayerStep

__all__ = ["LeGradOutput", "capture_final_embedding", "model_output"]


class LeGradOutput(NamedTuple):
    """What ``compute_legrad(..., return_scores=True)`` returns (unpacks as ``maps, features, scores``).

    Attributes:
        maps: ``[B, P, H, W]`` heatmaps, exactly what ``compute_legrad`` returns without ``return_scores``.
        image_features: ``[B, D]`` the model's own image embedding, L2-normalised (CLIP convention: equal
            to ``encode_image(image, normalize=True)``); for image classifiers, the ``[B, K]`` logits.
        scores: ``[B, P]`` image-prompt cosine similarities (``image_features`` against the text
            embeddings as given; multiply by ``logit_scale.exp()`` and add any ``logit_bias`` for the
            model's logits); for image classifiers, the targets' logits.
    """

    maps: torch.Tensor | list[torch.Tensor]
    image_features: torch.Tensor
    scores: torch.Tensor


def capture_final_embedding(adapter: Any, steps: Iterable[LayerStep], sink: list[torch.Tensor]
                            ) -> Iterator[LayerStep]:
    """Passes ``steps`` through, appending the model's own embedding to ``sink`` at the tower's last block.

    Holds no step beyond its turn (each layer's graph is still freed before the next is built).
    """
    last = adapter.depth - 1
    for step in steps:
        if step.layer == last:
            with torch.no_grad():
                sink.append(model_output(adapter, step).detach())
        yield step
        del step


def model_output(adapter: Any, step: LayerStep) -> torch.Tensor:
    """The model's own output from the step of the tower's last block, with no second pass: its image
    embedding ``[B, E]`` (what ``encode_image`` returns, un-normalised), a classifier's logits ``[B, K]``.

    Attention-pooled towers (``adapter.uses_attention_pooler``): the step's feature (the pooler on the final
    tokens). Others: ``adapter.readout`` on ``step.block_output``.

    Raises:
        TypeError: if the family's steps carry no ``block_output``.
    """
    if adapter.uses_attention_pooler:
        return step.feature.detach()
    if step.block_output is None:
        raise TypeError(f"the {adapter.family} adapter has no block_output in its steps, which return_scores needs")
    return adapter.readout(step.block_output)

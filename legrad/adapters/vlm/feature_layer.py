"""The ``vision_feature_layer`` of the LLaVA-like families (LLaVA, LLaVA-NeXT/OneVision, InternVL, Mistral 3):
which block's output the image features read, hence how many blocks feed them."""

from __future__ import annotations

from typing import Any

__all__ = ["checked_feature_layer", "feeding_blocks"]


def checked_feature_layer(config: Any, family: str) -> int:
    """The model's ``vision_feature_layer``, which legrad explains only as one int.

    Args:
        config: the VLM's config.
        family: the family's name for the message (``"LLaVA"``, ``"Mistral 3"``, ...).

    Returns:
        The layer (``hidden_states`` index).

    Raises:
        ValueError: for a list of layers (features of several layers concatenated) or a non-int.
    """
    layer = config.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r} is not supported: legrad explains {family} models whose "
                         "vision_feature_layer is one int (features of several layers concatenated are not)")
    return layer


def feeding_blocks(layer: int, depth: int) -> int:
    """How many blocks feed ``hidden_states[layer]`` of a ``depth``-block tower (``hidden_states[0]`` is the
    embeddings, ``hidden_states[k]`` block ``k - 1``'s output).

    Raises:
        ValueError: if ``layer`` selects no block output.
    """
    k = layer if layer >= 0 else depth + 1 + layer
    if not 1 <= k <= depth:
        raise ValueError(f"vision_feature_layer={layer} selects no block output of a {depth}-block tower")
    return k

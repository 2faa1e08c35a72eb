"""Checks of a LeGrad call's inputs, all made before any work: each raises a ValueError/TypeError naming
the problem and the fix. ``adapter`` arguments are duck-typed tower adapters (``in_chans``,
``patch_size``, ``grid_size``, ``device()``, ``embed_dim``)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_image",
    "check_text",
    "check_targets",
    "check_layer_index",
    "check_output_size",
    "check_prompt_chunk",
    "check_not_meta",
]


def check_not_meta(t: torch.Tensor, name: str) -> None:
    """Raises ValueError if ``t`` is a meta tensor (no values)."""
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor (shape only, no data); pass a tensor with values on a real device")


def check_layer_index(value: Any, depth: int, name: str = "layer_index") -> int:
    """The first explained block (as given, may be negative) after checking it against ``depth`` blocks.

    Raises:
        TypeError: if it is not an int.
        ValueError: if it is outside ``[-depth, depth - 1]``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -depth <= value < depth:
        raise ValueError(
            f"{name}={value} is out of range for an image tower with {depth} blocks; use a value in "
            f"[{-depth}, {depth - 1}] (e.g. -2 for the last two blocks)"
        )
    return value


def check_output_size(output_size: Any) -> str | tuple[int, int] | None:
    """``None``, ``"grid"`` or a ``(height, width)`` tuple of positive ints.

    Raises:
        ValueError: for anything else.
    """
    if output_size is None or output_size == "grid":
        return output_size
    if (isinstance(output_size, (tuple, list)) and len(output_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in output_size)):
        return (int(output_size[0]), int(output_size[1]))
    raise ValueError(f"output_size must be None, 'grid' or a (height, width) of positive ints, got {output_size!r}")


def check_prompt_chunk(prompt_chunk: Any) -> int | None:
    """``None`` or a positive int.

    Raises:
        ValueError: for anything else.
    """
    if prompt_chunk is not None and (isinstance(prompt_chunk, bool) or not isinstance(prompt_chunk, int)
                                     or prompt_chunk < 1):
        raise ValueError(f"prompt_chunk must be a positive int or None, got {prompt_chunk!r}")
    return prompt_chunk


def check_image(image: Any, adapter: Any) -> torch.Tensor:
    """Checks an image batch ``[B, C, H, W]`` against the tower (channels, patch multiple, finite).

    Returns:
        ``image``, unchanged.

    Raises:
        TypeError, ValueError: naming the problem and the fix.
    """
    if image is None:
        raise ValueError(
            "image is required: pass the preprocessed image batch, e.g. "
            "compute_legrad(text_embedding, image=preprocess(pil).unsqueeze(0)). (Reusing a previous "
            "forward's state, as the original LeGrad allowed, is not thread-safe and not supported.)"
        )
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor [B, 3, H, W], got {type(image).__name__}")
    check_not_meta(image, "image")
    if adapter.device().type == "meta":
        raise ValueError("the model's weights are on the meta device (not loaded); load them first, e.g. "
                         "model.to_empty(device='cpu') then model.load_state_dict(state_dict)")
    if image.ndim != 4:
        hint = " (add a batch dimension: image.unsqueeze(0))" if image.ndim == 3 else ""
        raise ValueError(f"image must be 4-D [B, C, H, W], got shape {tuple(image.shape)}{hint}")
    if not image.is_floating_point():
        raise TypeError(
            f"image must be a float tensor (normalised by the model's preprocess), got {image.dtype}"
        )
    if image.shape[1] != adapter.in_chans:
        raise ValueError(
            f"image has {image.shape[1]} channels, the model expects {adapter.in_chans} "
            "(convert the PIL image with .convert('RGB') before preprocessing)"
        )
    if image.shape[0] == 0:
        raise ValueError("image batch is empty")
    if image.shape[-2] == 0 or image.shape[-1] == 0:
        ph, pw = adapter.patch_size
        raise ValueError(f"image has zero height or width ({image.shape[-2]}x{image.shape[-1]}); pass an image of "
                         f"at least one patch ({ph}x{pw} pixels)")
    adapter.grid_size(image.shape[-2], image.shape[-1])
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image contains NaN or infinite values")
    return image


def check_text(text_embedding: Any, embed_dim: int, batch: int) -> torch.Tensor:
    """Checks ``[P, D]`` / ``[B, P, D]`` text embeddings for an image batch of ``batch``.

    Returns:
        ``text_embedding``, unchanged.

    Raises:
        TypeError, ValueError: naming the problem and the fix.
    """
    if not isinstance(text_embedding, torch.Tensor):
        raise TypeError(
            f"text_embedding must be a torch.Tensor [P, D] or [B, P, D], got {type(text_embedding).__name__}"
        )
    check_not_meta(text_embedding, "text_embedding")
    if not text_embedding.is_floating_point():
        raise TypeError(f"text_embedding must be a float tensor, got {text_embedding.dtype}")
    if text_embedding.ndim not in (2, 3):
        hint = " (for one prompt use text_embedding.unsqueeze(0))" if text_embedding.ndim == 1 else ""
        raise ValueError(
            f"text_embedding must be [P, D] or [B, P, D], got shape {tuple(text_embedding.shape)}{hint}"
        )
    if text_embedding.shape[-1] != embed_dim:
        raise ValueError(
            f"text_embedding width {text_embedding.shape[-1]} does not match the image embedding width "
            f"{embed_dim}; encode the prompts with the same model's encode_text"
        )
    if text_embedding.shape[-2] == 0:
        raise ValueError("text_embedding holds zero prompts; pass at least one")
    if text_embedding.ndim == 3 and text_embedding.shape[0] != batch:
        raise ValueError(
            f"per-image text_embedding [B, P, D] has B={text_embedding.shape[0]} but the image batch has "
            f"B={batch}; pass [P, D] to share prompts across images"
        )
    if not bool(torch.isfinite(text_embedding).all()):
        raise ValueError("text_embedding contains NaN or infinite values")
    return text_embedding


def check_targets(target: Any, batch: int, num_classes: int) -> torch.Tensor:
    """Validates class targets and returns them as a CPU LongTensor ``[P]`` or ``[B, P]``.

    Args:
        target: an int, a sequence of ints, or an integer tensor ``[]``, ``[P]`` or ``[B, P]``.
        batch: the image batch size ``B``.
        num_classes: number of classes of the model.

    Raises:
        TypeError: for a non-integer target.
        ValueError: for an empty target, a wrong shape or a class index outside ``[0, num_classes)``.
    """
    if target is None:
        raise ValueError(
            "target is required for an image classifier: the class indices to explain, e.g. target=281, "
            "target=[281, 285] (shared by the batch) or a LongTensor [B, P] (per image)"
        )
    if isinstance(target, bool) or (isinstance(target, torch.Tensor) and target.dtype == torch.bool):
        raise TypeError("target must hold class indices (ints), got a bool")
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype} (use .long())")
        if target.dtype == getattr(torch, "uint64", None):
            # .long() would wrap 2**64 - 1 to -1: the exact values are checked as Python ints first.
            t = _long_tensor(target.detach().cpu().tolist(), num_classes)
        else:
            t = target.detach().to("cpu", torch.long)
    elif hasattr(target, "__array__") and not isinstance(target, (str, bytes)):  # numpy arrays and scalars
        kind = getattr(getattr(target, "dtype", None), "kind", None)
        if kind not in ("i", "u") or not hasattr(target, "tolist"):
            raise TypeError(f"target must hold class indices (ints), got an array of {getattr(target, 'dtype', '?')}")
        t = _long_tensor(target.tolist(), num_classes)  # exact Python ints: a uint64 never wraps to -1
    elif isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        try:
            values = [operator.index(c) for c in target]
        except TypeError:
            raise TypeError(
                "target must be an int, a sequence of ints or an integer tensor [P] / [B, P]; for per-image "
                "targets pass torch.tensor([[...], [...]])"
            ) from None
        t = _long_tensor(values, num_classes)
    else:
        try:
            value = operator.index(target)
        except TypeError:
            raise TypeError(
                f"target must be an int, a sequence of ints or an integer tensor, got {type(target).__name__}"
            ) from None
        t = _long_tensor([value], num_classes)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim not in (1, 2):
        raise ValueError(f"target must be [P] or [B, P], got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError("target holds no class index; pass at least one")
    if t.ndim == 2 and t.shape[0] != batch:
        raise ValueError(
            f"per-image target [B, P] has B={t.shape[0]} but the image batch has B={batch}; pass a 1-D target to "
            "share the classes across images"
        )
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"target class {bad} is out of range: this model has {num_classes} classes (0..{num_classes - 1})")
    return t


def _long_tensor(values: Any, num_classes: int) -> torch.Tensor:
    """A LongTensor of nested lists of Python ints, after checking each lies in ``[0, num_classes)``.

    Checked before the conversion: ``torch.tensor([2**70])`` fails with "Overflow when unpacking long long".
    """
    flat: list[Any] = []
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            flat.append(v)
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"target must hold class indices (ints), got {type(v).__name__}")
        if not 0 <= v < num_classes:
            raise ValueError(f"target class {v} is out of range: this model has {num_classes} classes "
                             f"(0..{num_classes - 1})")
    try:
        return torch.tensor(values, dtype=torch.long)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise ValueError(f"target must be [P] or [B, P] with rows of equal length ({exc})") from None

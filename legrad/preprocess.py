"""``LePreprocess``: an OpenCLIP preprocess at a chosen (higher, non-square) resolution."""

from __future__ import annotations

from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["LePreprocess", "OPENAI_MEAN", "OPENAI_STD", "normalization_of"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Geometric steps of the wrapped preprocess that the new resize replaces.
_GEOMETRIC = (T.Resize, T.CenterCrop, T.RandomResizedCrop, T.RandomCrop, T.Pad)


def _size_pair(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise TypeError("image_size must be an int or an (height, width) tuple")
    if isinstance(image_size, int):
        size = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) for s in image_size
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise TypeError(f"image_size must be an int or an (height, width) tuple of ints, got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


def normalization_of(preprocess: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) of the first ``Normalize`` in a preprocess pipeline (OpenAI's if there is none)."""
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std)
    mean = getattr(preprocess, "mean", None)
    std = getattr(preprocess, "std", None)
    if mean is not None and std is not None:
        return tuple(mean), tuple(std)
    return OPENAI_MEAN, OPENAI_STD


class LePreprocess:
    """Resizes to ``image_size`` (bicubic) and then applies the wrapped preprocess's non-geometric steps.

    The wrapped pipeline's resize/crop steps are replaced by one bicubic resize to exactly
    ``image_size``; its RGB conversion, tensor conversion and normalisation are kept.

    Args:
        preprocess: an OpenCLIP eval preprocess (a ``torchvision.transforms.Compose``).
        image_size: ``int`` for a square output or ``(height, width)``.

    Raises:
        TypeError: if ``preprocess`` is not a ``Compose`` or ``image_size`` is malformed.
    """

    def __init__(self, preprocess: T.Compose, image_size: int | tuple[int, int] = 448):
        if isinstance(preprocess, LePreprocess):
            preprocess = preprocess.preprocess
        if not isinstance(preprocess, T.Compose):
            raise TypeError(
                "preprocess must be the torchvision Compose returned by "
                f"open_clip.create_model_and_transforms, got {type(preprocess).__name__}"
            )
        self.preprocess = preprocess
        self.image_size = _size_pair(image_size)
        kept = [t for t in preprocess.transforms if not isinstance(t, _GEOMETRIC)]
        self.transform = T.Compose(
            [T.Resize(self.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True), *kept]
        )
        self.mean, self.std = normalization_of(preprocess)

    def __call__(self, image: Any) -> torch.Tensor:
        """PIL image -> ``[3, H, W]`` normalised tensor at ``image_size``."""
        return self.transform(image)

    def __repr__(self) -> str:
        return f"LePreprocess(image_size={self.image_size}, transform={self.transform!r})"

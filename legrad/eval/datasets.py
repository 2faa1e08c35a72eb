"""Benchmark data: (image, prompts, masks) samples from the bundled synthetic scenes or a user folder.

A user dataset is a folder of images, one binary mask per object, and a JSON file of prompts::

      DIR/prompts.json
      [
        {"image": "images/0001.jpg",
         "masks": [{"mask": "masks/0001_dog.png", "prompt": "a photo of a dog"},
                   {"mask": "masks/0001_ball.png", "prompt": "a red ball"}]},
        ...
      ]

Paths are relative to ``DIR``. A mask is any image file of the image's size whose non-zero pixels
are the object. For an image classifier the prompt is a class: a class index (``"prompt": 281``, or
``"281"``) or a class name of the model (``"tabby"``); ``"class"`` may be written instead of ``"prompt"``. Images and masks go through the model's own preprocess (masks with the same
resize/crop, re-binarised, see :func:`preprocess_mask`), so the maps are compared at the preprocessed
resolution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SEED", "FolderDataset", "Sample", "ToyScenes", "preprocess_mask"]

#: Seed of the default synthetic scenes (not used to train or tune the demo model).
DEFAULT_SEED = 2025


@dataclass
class Sample:
    """One image with its prompts and their masks, already preprocessed.

    Attributes:
        name: identifier used in messages.
        image: ``[3, H, W]`` preprocessed image.
        prompts: ``P`` prompts.
        masks: ``[P, H, W]`` bool masks aligned with ``image``.
    """

    name: str
    image: Any
    prompts: list[str]
    masks: Any


def preprocess_mask(preprocess: Callable, mask: Any) -> Any:
    """Applies an image preprocess's geometry (resize, crop, pad) to a boolean mask.

    The mask is drawn as a black/white RGB image and passed through ``preprocess`` itself; black and
    white reference images give the per-channel values of "off" and "on", and the mask is the
    interpolated value's side of their midpoint. This needs only a preprocess that is geometric
    plus a per-channel affine normalisation (OpenCLIP's are).

    Args:
        preprocess: PIL image -> ``[3, H, W]`` tensor.
        mask: ``[h, w]`` bool numpy array (or anything ``numpy.asarray`` accepts).

    Returns:
        ``[H, W]`` bool tensor.
    """
    import numpy as np
    from PIL import Image

    arr = np.asarray(mask).astype(bool)
    img = Image.fromarray(np.where(arr, 255, 0).astype(np.uint8), mode="L").convert("RGB")
    on = preprocess(Image.new("RGB", img.size, (255, 255, 255)))[0]
    off = preprocess(Image.new("RGB", img.size, (0, 0, 0)))[0]
    got = preprocess(img)[0]
    # Padding (resize_mode "longest") fills with black: outside the mask, as it should be.
    mid = 0.5 * (on.max() + off.min())
    return got > mid if on.max() > off.min() else got < mid


def _prompt_of(entry: Any) -> str | None:
    """A mask entry's prompt as text: ``prompt`` or ``class``, a string or a class index; None if invalid."""
    if not isinstance(entry, dict) or ("prompt" in entry) == ("class" in entry):
        return None
    value = entry.get("prompt", entry.get("class"))
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


class ToyScenes:
    """Fresh synthetic scenes (:mod:`legrad.toy`) as benchmark samples, drawn at the model's input size.

    Args:
        n: number of scenes.
        seed: scene seed.
        preprocess: the model's image preprocess.
        size: scene side in pixels (the model's input size).
    """

    def __init__(self, n: int, seed: int, preprocess: Callable, size: int):
        from legrad.toy import make_scenes

        self._scenes = make_scenes(n, seed=seed, size=size)
        self._preprocess = preprocess
        self.seed = seed

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, i: int) -> Sample:
        import torch

        scene = self._scenes[i]
        masks = torch.stack([preprocess_mask(self._preprocess, o.mask) for o in scene.objects])
        return Sample(f"scene {i}", self._preprocess(scene.image), [o.phrase for o in scene.objects], masks)

    def describe(self) -> str:
        return f"{len(self)} synthetic scenes (legrad.toy.make_scenes, seed {self.seed})"


class FolderDataset:
    """A user dataset: a folder of images and masks with a JSON file of prompts (format in the module doc).

    The JSON is read and checked up front; images and masks are read when a sample is requested.

    Args:
        root: dataset folder.
        preprocess: the model's image preprocess.
        annotations: JSON file (relative to ``root`` unless absolute).

    Raises:
        FileNotFoundError: if the folder or the JSON file is missing.
        ValueError: naming the entry and the problem for a malformed JSON file or a missing file.
    """

    def __init__(self, root: str | os.PathLike, preprocess: Callable, annotations: str = "prompts.json"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} not found")
        path = Path(annotations)
        path = path if path.is_absolute() else self.root / path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the dataset needs a JSON file of prompts (see `legrad bench --help`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "images" in data:
            data = data["images"]
        if not isinstance(data, list) or not data:
            raise ValueError(f"{path} must hold a non-empty list of {{'image': ..., 'masks': [...]}} entries")
        self.entries: list[tuple[Path, list[tuple[Path, str]]]] = []
        for i, entry in enumerate(data):
            where = f"{path.name} entry {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise ValueError(f"{where}: expected an object with an 'image' path")
            masks = entry.get("masks")
            if not isinstance(masks, list) or not masks:
                raise ValueError(f"{where}: 'masks' must be a non-empty list of {{'mask': path, 'prompt': text}}")
            image = self.root / entry["image"]
            if not image.is_file():
                raise ValueError(f"{where}: image {image} not found")
            pairs = []
            for j, m in enumerate(masks):
                prompt = _prompt_of(m)
                if not isinstance(m, dict) or not isinstance(m.get("mask"), str) or prompt is None:
                    raise ValueError(f"{where}, mask {j}: expected {{'mask': path, 'prompt': text}} (for a classifier "
                                     "'prompt' or 'class': a class index or name)")
                if not prompt.strip():
                    raise ValueError(f"{where}, mask {j}: empty prompt")
                mask = self.root / m["mask"]
                if not mask.is_file():
                    raise ValueError(f"{where}, mask {j}: {mask} not found")
                pairs.append((mask, prompt))
            self.entries.append((image, pairs))
        self._preprocess = preprocess

    def __len__(self) -> int:
        return len(self.entries)

    def prompt_lists(self) -> list[tuple[str, list[str]]]:
        """``(sample name, prompts)`` of every entry, without reading any image (for up-front checks)."""
        return [(str(image.relative_to(self.root)), [p for _, p in pairs]) for image, pairs in self.entries]

    def __getitem__(self, i: int) -> Sample:
        import numpy as np
        import torch
        from PIL import Image

        from legrad.io.images import load_image

        image_path, pairs = self.entries[i]
        image = load_image(image_path)
        masks = []
        for mask_path, _ in pairs:
            with Image.open(mask_path) as im:
                arr = np.asarray(im.convert("L")) > 0
            if arr.shape != (image.height, image.width):
                raise ValueError(
                    f"mask {mask_path} is {arr.shape[1]}x{arr.shape[0]} but image {image_path} is "
                    f"{image.width}x{image.height}; masks must have their image's size"
                )
            masks.append(preprocess_mask(self._preprocess, arr))
        name = str(image_path.relative_to(self.root))
        return Sample(name, self._preprocess(image), [p for _, p in pairs], torch.stack(masks))

    def describe(self) -> str:
        return f"{len(self)} images from {self.root}"

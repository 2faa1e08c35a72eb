"""Image decoding for ``legrad extract``: a DataLoader dataset whose failures are data, not exceptions."""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from ..io.errors import one_line
from ..io.images import decode_image, load_image
from .inputs import ImageTask
from .store import read_source

__all__ = ["ImageDataset", "collate", "default_workers"]


class ImageDataset(Dataset):
    """Decodes and preprocesses images in DataLoader workers; a failure becomes an error entry, never an exception.

    Args:
        tasks: the images, in loader order.
        heat_transform: PIL image -> ``[3, H, W]`` at the explained size (the heatmap input).
        clip_transform: PIL image -> ``[3, h, w]``, the model's own preprocess (the similarity input).
    """

    def __init__(self, tasks: list[ImageTask], heat_transform: Any, clip_transform: Any):
        self.tasks = tasks
        self.heat_transform = heat_transform
        self.clip_transform = clip_transform

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        task = self.tasks[i]
        try:
            # Recorded from the very bytes decoded: the file is read once, and a later change is seen on resume.
            source, data = read_source(task.path)
            image = load_image(task.path) if data is None else decode_image(io.BytesIO(data), task.path)
            return {"pos": i, "heat": self.heat_transform(image), "clip": self.clip_transform(image),
                    "size": (image.height, image.width), "source": source, "error": None}
        except Exception as exc:  # one bad image must not kill the batch: report it instead
            return {"pos": i, "heat": None, "clip": None, "size": None, "source": None, "error": one_line(exc, 300)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the decoded items of a batch; the failed ones go to ``errors`` as ``(pos, message)``.

    Returns:
        ``pos`` (list of B), ``heat`` ``[B, 3, H, W]`` and ``clip`` ``[B, 3, h, w]`` (None if B = 0),
        ``sizes``, ``sources`` (lists of B) and ``errors``.
    """
    ok = [it for it in items if it["error"] is None]
    return {
        "pos": [it["pos"] for it in ok],
        "heat": torch.stack([it["heat"] for it in ok]) if ok else None,
        "clip": torch.stack([it["clip"] for it in ok]) if ok else None,
        "sizes": [it["size"] for it in ok],
        "sources": [it["source"] for it in ok],
        "errors": [(it["pos"], it["error"]) for it in items if it["error"] is not None],
    }


def default_workers() -> int:
    """DataLoader workers per process when none are asked for: from the cores this process may use.

    The cores (``os.sched_getaffinity`` where available, so CPU sets and container limits count) are
    shared by the ``LOCAL_WORLD_SIZE`` processes of a torchrun node. One core stays with the process
    that runs the model; with 2 cores or fewer per process, images are decoded in the main process
    (PyTorch warns about more workers than cores). At most 4: decoding rarely needs more.

    Returns:
        An int in [0, 4].
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        local_world = 1
    per_process = cores // local_world
    return 0 if per_process <= 2 else min(4, per_process - 1)

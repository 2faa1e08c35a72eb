"""The demo scenes shipped inside the package (``legrad/assets/scenes/``), and contrast prompts for them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io.errors import one_line
from ..toy.scenes import VOCABULARY

__all__ = ["SCENES_DIR", "SampleScene", "sample_scenes", "absent_phrase"]

#: The bundled demo scenes (PNGs and ``scenes.json``), installed with the package (wheel included).
SCENES_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "scenes"


@dataclass(frozen=True)
class SampleScene:
    """A demo scene image shipped with the package (:data:`SCENES_DIR`).

    Attributes:
        path: the PNG file.
        phrases: the phrases naming its objects (what the demo model knows).
    """

    path: Path
    phrases: tuple[str, ...]


def sample_scenes(folder: str | os.PathLike | None = None) -> list[SampleScene]:
    """The scenes listed in ``folder/scenes.json`` whose image files exist (empty if there is no list).

    Args:
        folder: a folder with ``scenes.json``; None for the bundled scenes (:data:`SCENES_DIR`).

    Raises:
        ValueError: if ``scenes.json`` exists but is malformed.
    """

    folder = SCENES_DIR if folder is None else Path(folder)
    index = folder / "scenes.json"
    if not index.is_file():
        return []
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))["scenes"]
        scenes = [SampleScene(folder / e["file"], tuple(str(p) for p in e["phrases"])) for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index} is malformed: {one_line(exc)}") from exc
    return [s for s in scenes if s.path.is_file()]


def absent_phrase(phrases: Sequence[str]) -> str:
    """A demo-vocabulary phrase sharing neither colour nor shape with ``phrases`` (a contrast prompt)."""

    words = {w for p in phrases for w in p.split()[1:]}
    for v in VOCABULARY:
        if not words & set(v.split()[1:]):
            return v
    return next(v for v in VOCABULARY if v not in phrases)

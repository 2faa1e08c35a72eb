"""Parsing what users type into the front ends (command line, playground, app) that is not a model name."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["parse_size"]


def parse_size(value: Any) -> tuple[int, int] | None:
    """Parses an image size: ``None``/``''``/``0``/``'native'`` -> None, ``448`` or ``'448'`` -> (448, 448),
    ``'448x640'`` -> (448, 640) (height x width).

    Raises:
        ValueError: for anything else or non-positive sizes.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid image size {value!r}")
    if isinstance(value, (int, float)):
        if value != int(value):
            raise ValueError(f"image size must be a whole number of pixels, got {value!r}")
        value = str(int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = f"{value[0]}x{value[1]}"
    text = str(value).strip().lower()
    if text in ("", "0", "native", "none", "auto"):
        return None
    m = re.fullmatch(r"(\d{1,9})(?:\s*[x,*]\s*(\d{1,9}))?", text) if len(text) <= 32 else None
    if not m:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"invalid image size {shown}; use N (square) or HxW, e.g. 448 or 448x672")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {value!r}")
    return (h, w)

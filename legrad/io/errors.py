"""The errors front ends print as one line instead of a traceback, and the helper that makes them one line."""

from __future__ import annotations

__all__ = ["ModelLoadError", "ImageLoadError", "ImageTooLargeError", "one_line"]


class ModelLoadError(RuntimeError):
    """A model could not be created or its weights could not be loaded; the message says why and what to do."""


class ImageLoadError(ValueError):
    """An image could not be read (missing, not an image, unreachable URL); the message names it."""


class ImageTooLargeError(ImageLoadError):
    """An image (or its download) is larger than the configured limit."""


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one line (whitespace collapsed), cut to ``limit`` characters.

    Args:
        exc: the exception.
        limit: longest result, ``...`` included.

    Returns:
        The message, or the exception's type name when it has none.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

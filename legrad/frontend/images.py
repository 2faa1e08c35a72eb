"""Reading image files and URLs as RGB, with bounded work and decoding by what the image is.

:func:`load_image` is the one place every front end (``legrad explain``, ``legrad extract``, the
playground and the app) reads an image through. It

* opens regular files only (a FIFO, device or directory is refused before opening, without blocking);
* refuses images above a pixel limit from their header, before decoding (Pillow's
  ``DecompressionBombWarning``/``Error`` become :class:`ImageTooLargeError`);
* scales 16-bit (``I;16``, ``I;16B``, ``I``) and float (``F``) images to 8 bits by their range
  instead of clipping, composites transparency over white, converts palette/CMYK/... to RGB;
* applies the EXIF orientation, so a phone photo is explained upright.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from . import fetch
from .errors import ImageLoadError, ImageTooLargeError, one_line
from .files import open_regular_file

__all__ = ["MAX_IMAGE_PIXELS", "IMAGE_EXTENSIONS", "ALLOW_PRIVATE_ENV", "ImageLoadError", "ImageTooLargeError",
           "load_image", "decode_image", "to_rgb"]

logger = logging.getLogger(__name__)

#: File suffixes treated as images when walking folders.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

#: Default largest image (width x height) that :func:`load_image` decodes.
MAX_IMAGE_PIXELS = 50_000_000

#: Environment variable that lets :func:`load_image` fetch URLs on private addresses by default.
ALLOW_PRIVATE_ENV = "LEGRAD_ALLOW_PRIVATE_URLS"

_U16_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def load_image(
    source: str | os.PathLike | Image.Image,
    *,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    name: str | None = None,
    allow_private_urls: bool | None = None,
    url_deadline_s: float | None = None,
    max_url_bytes: int | None = None,
) -> Image.Image:
    """Reads an image from a file path or an ``http(s)`` URL (or converts a PIL image) as upright RGB.

    URLs are fetched with :func:`legrad.frontend.fetch.fetch_url`: a total deadline, a byte cap, and no
    connection to loopback/private/link-local/... addresses unless ``allow_private_urls``.

    Args:
        source: a path, an ``http(s)://`` URL, or a PIL image (converted, not size-checked).
        max_pixels: largest ``width * height`` decoded; None for no limit.
        name: how messages name the image (default: the source itself); front ends serving visitors
            pass a neutral name so that no server path appears in an error.
        allow_private_urls: allow URLs on non-public addresses (e.g. an intranet server); None reads
            the environment variable ``LEGRAD_ALLOW_PRIVATE_URLS`` (``1``/``true``/``yes`` allow), so a
            command-line operator can opt in; servers pass False.
        url_deadline_s: total seconds for a URL download (default ``legrad.frontend.fetch.URL_DEADLINE_S``).
        max_url_bytes: largest URL body (default ``legrad.frontend.fetch.MAX_URL_BYTES``).

    Returns:
        An RGB PIL image with the EXIF orientation applied.

    Raises:
        ImageTooLargeError: above ``max_pixels`` or the URL byte cap.
        ImageLoadError: missing or non-regular file, refused or failed URL, or data that is not an
            image (a ``ValueError``).
    """
    if isinstance(source, Image.Image):
        return _upright_rgb(source, name or "image")
    src = os.fspath(source)
    label = name or src
    if fetch.is_url(src):
        if allow_private_urls is None:
            allow_private_urls = os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes")
        try:
            data = fetch.fetch_url(
                src,
                allow_private=allow_private_urls,
                deadline_s=fetch.URL_DEADLINE_S if url_deadline_s is None else url_deadline_s,
                max_bytes=fetch.MAX_URL_BYTES if max_url_bytes is None else max_url_bytes,
            )
        except ImageLoadError as exc:
            raise type(exc)(f"could not fetch {label}: {exc}") from exc
        return decode_image(io.BytesIO(data), label, max_pixels)
    with open_regular_file(src, label, ImageLoadError) as fh:
        return decode_image(fh, label, max_pixels)


def decode_image(fp: Any, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decodes an image file object to upright RGB after checking its pixel count from the header.

    Args:
        fp: a binary file object (or path).
        name: how messages name the image.
        max_pixels: largest ``width * height``; None for no limit.

    Returns:
        An RGB PIL image.

    Raises:
        ImageTooLargeError: above ``max_pixels`` (or Pillow's own bomb limit).
        ImageLoadError: not an image, truncated, or a zero-sized image.
    """
    limit = f"{max_pixels / 1e6:g} Mpx" if max_pixels else "Pillow's limit"
    try:
        with warnings.catch_warnings():
            # The limit is checked below from the header; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: image is too large to decode ({w}x{h} = {w * h / 1e6:.1f} Mpx, limit {limit}); "
                        "downscale it first"
                    )
                if w == 0 or h == 0:
                    raise ImageLoadError(f"{name}: image has zero width or height ({w}x{h})")
                im.load()
                return _upright_rgb(im, name)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: image is too large to decode (limit {limit}): {one_line(exc, 160)}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a readable image (unknown or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # UnidentifiedImageError (an OSError) for non-images; OSError/SyntaxError/EOFError for truncated ones.
        raise ImageLoadError(f"{name}: not a readable image ({one_line(exc, 120)})") from None


def _upright_rgb(im: Image.Image, name: str) -> Image.Image:
    if im.width == 0 or im.height == 0:
        raise ImageLoadError(f"{name}: image has zero width or height ({im.width}x{im.height})")
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as exc:  # malformed EXIF must not make a readable image unreadable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, one_line(exc, 80))
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB by what the pixels mean.

    ``I;16*`` are scaled by 255/65535; ``I`` (32-bit int) by 255/65535 when its values fit 16 bits
    (how 16-bit PNG/TIFF data arrives), else min-max; ``F`` (float) by 255 when in [0, 1], else
    min-max (a constant image becomes mid-grey if outside [0, 1]). Alpha (``RGBA``, ``LA``, ``PA``,
    palette transparency) is composited over white; other modes use Pillow's conversion.

    Raises:
        ImageLoadError: a float image holding NaN or infinity, or a mode Pillow cannot convert.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _U16_MODES or mode in ("I", "F"):
        arr = np.asarray(im)
        return Image.fromarray(_scale_to_u8(arr, mode)).convert("RGB")
    if mode == "P" and "transparency" in im.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"images of mode {mode!r} cannot be converted to RGB ({one_line(exc, 80)})") from None


def _scale_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    a = arr.astype(np.float64)
    if mode == "F" and not np.all(np.isfinite(a)):
        raise ImageLoadError("float image holds NaN or infinite values")
    if mode in _U16_MODES:
        lo, hi = 0.0, 65535.0
    elif mode == "I" and a.min() >= 0 and a.max() <= 65535:
        lo, hi = 0.0, 65535.0
    elif mode == "F" and a.min() >= 0 and a.max() <= 1:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(a.min()), float(a.max())
        if hi == lo:
            return np.full(a.shape, 128, dtype=np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)

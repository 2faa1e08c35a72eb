"""Reading image files and URLs as RGB, with bounded work and decoding by what the image is.

:func:`load_image` is the one place every front end (``legrad explain``, ``legrad extract``, the
playground and the app) reads an image through. It

* opens regular files only (a FIFO, device or directory is refused before opening, without blocking);
* decodes only the raster formats of :data:`IMAGE_FORMATS`, whatever the file is called: PostScript/EPS,
  PDF and the rest are refused (Pillow would run Ghostscript on them, with no time limit);
* refuses images above a pixel limit or an aspect ratio (:data:`MAX_ASPECT_RATIO`) from their header,
  before decoding (Pillow's ``DecompressionBombWarning``/``Error`` become :class:`ImageTooLargeError`);
* turns any other decoding failure (``OverflowError``, ``MemoryError``, ...) into :class:`ImageLoadError`;
* scales 16-bit (``I;16``, ``I;16B``, ``I``) and float (``F``) images to 8 bits by their range
  instead of clipping, composites transparency over white, converts palette/CMYK/... to RGB;
* applies the EXIF orientation, so a phone photo is explained upright.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from . import fetch
from .errors import ImageLoadError, ImageTooLargeError, one_line
from .files import open_regular_file

__all__ = ["MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO", "IMAGE_EXTENSIONS", "IMAGE_FORMATS", "ALLOW_PRIVATE_ENV",
           "ImageLoadError", "ImageTooLargeError", "load_image", "find_images", "decode_image", "check_image_shape", "to_rgb"]

logger = logging.getLogger(__name__)

#: File suffixes treated as images when walking folders.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

#: Raster formats (Pillow's names) :func:`decode_image` decodes, by content and whatever the file's suffix:
#: those of :data:`IMAGE_EXTENSIONS` (``PPM`` covers PBM/PGM/PPM; ``JPEG`` covers phones' MPO files).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")

#: Default largest image (width x height) that :func:`load_image` decodes.
MAX_IMAGE_PIXELS = 50_000_000

#: Default largest ratio of an image's longer side to its shorter side. A model's own preprocess scales
#: the *short* side up to its input size S before cropping, so a ``W x 1`` strip becomes ``W*S x S``
#: pixels (a 955-byte 300000x1 PNG: gigabytes; 34000000x1: an ``OverflowError`` inside Pillow). At 50:1
#: that intermediate stays below ``50 * S**2`` pixels (7.5 MB at S = 224), and panoramas still pass.
MAX_ASPECT_RATIO = 50

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
    max_aspect_ratio: float | None = MAX_ASPECT_RATIO,
) -> Image.Image:
    """Reads an image from a file path or an ``http(s)`` URL (or converts a PIL image) as upright RGB.

    URLs are fetched with :func:`legrad.io.fetch.fetch_url`: a total deadline, a byte cap, and no
    connection to loopback/private/link-local/... addresses unless ``allow_private_urls``.

    Args:
        source: a path, an ``http(s)://`` URL, or a PIL image (its size checked as a file's would be).
        max_pixels: largest ``width * height`` decoded; None for no limit.
        name: how messages name the image (default: the source itself); front ends serving visitors
            pass a neutral name so that no server path appears in an error.
        allow_private_urls: allow URLs on non-public addresses (e.g. an intranet server); None reads
            the environment variable ``LEGRAD_ALLOW_PRIVATE_URLS`` (``1``/``true``/``yes`` allow), so a
            command-line operator can opt in; servers pass False.
        url_deadline_s: total seconds for a URL download (default ``legrad.io.fetch.URL_DEADLINE_S``).
        max_url_bytes: largest URL body (default ``legrad.io.fetch.MAX_URL_BYTES``).
        max_aspect_ratio: largest longer-side / shorter-side ratio (see :data:`MAX_ASPECT_RATIO`); None
            for no limit.

    Returns:
        An RGB PIL image with the EXIF orientation applied.

    Raises:
        ImageTooLargeError: above ``max_pixels``, ``max_aspect_ratio`` or the URL byte cap.
        ImageLoadError: missing or non-regular file, refused or failed URL, or data that is not an
            image of :data:`IMAGE_FORMATS` (a ``ValueError``).
    """
    if isinstance(source, Image.Image):
        label = name or "image"
        check_image_shape(source.width, source.height, label, max_pixels, max_aspect_ratio)
        return _upright_rgb(source, label)
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
        return decode_image(io.BytesIO(data), label, max_pixels, max_aspect_ratio)
    with open_regular_file(src, label, ImageLoadError) as fh:
        return decode_image(fh, label, max_pixels, max_aspect_ratio)


def find_images(root: str | os.PathLike) -> list[str]:
    """The images of a folder, walked recursively: regular files with an :data:`IMAGE_EXTENSIONS` suffix,
    hidden files and folders skipped, sorted by relative path (the same order on every run and every rank).

    Args:
        root: the folder.

    Returns:
        Paths relative to ``root``, with ``/`` separators (e.g. ``['a.png', 'cats/b.jpg']``).
    """
    base = Path(root)
    return sorted(
        f.relative_to(base).as_posix()
        for f in base.rglob("*")
        if f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(base).parts)
        and f.is_file()
    )


def check_image_shape(width: int, height: int, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS,
                      max_aspect_ratio: float | None = MAX_ASPECT_RATIO) -> None:
    """Refuses an image size before any decoding or resizing: empty, too many pixels, or too elongated.

    Args:
        width, height: the image's size in pixels (from its header).
        name: how messages name the image.
        max_pixels: largest ``width * height``; None for no limit.
        max_aspect_ratio: largest ``max(width, height) / min(width, height)``; None for no limit.

    Raises:
        ImageLoadError: a zero width or height.
        ImageTooLargeError: above ``max_pixels`` or ``max_aspect_ratio`` (the message says how to fix it).
    """
    w, h = int(width), int(height)
    if w <= 0 or h <= 0:
        raise ImageLoadError(f"{name}: image has zero width or height ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name}: image is too large to decode ({w}x{h} = {w * h / 1e6:.1f} Mpx, limit "
            f"{max_pixels / 1e6:g} Mpx); downscale it first"
        )
    if max_aspect_ratio is not None and max(w, h) > max_aspect_ratio * min(w, h):
        raise ImageTooLargeError(
            f"{name}: image is too elongated ({w}x{h}, aspect ratio {max(w, h) / min(w, h):,.0f}:1, limit "
            f"{max_aspect_ratio:g}:1; models scale the short side up to their input size); crop or pad it "
            "to a less elongated shape first"
        )


def decode_image(fp: Any, name: str, max_pixels: int | None = MAX_IMAGE_PIXELS,
                 max_aspect_ratio: float | None = MAX_ASPECT_RATIO) -> Image.Image:
    """Decodes an image file object to upright RGB after checking its size from the header.

    Only the formats of :data:`IMAGE_FORMATS` are decoded, recognised by content (a PostScript file
    named ``.png`` is refused, never handed to Ghostscript).

    Args:
        fp: a binary file object (or path).
        name: how messages name the image.
        max_pixels: largest ``width * height``; None for no limit.
        max_aspect_ratio: largest longer-side / shorter-side ratio; None for no limit.

    Returns:
        An RGB PIL image.

    Raises:
        ImageTooLargeError: above ``max_pixels``, ``max_aspect_ratio`` (or Pillow's own bomb limit), or
            out of memory while decoding.
        ImageLoadError: not an image of :data:`IMAGE_FORMATS`, truncated, a zero-sized image, or any other
            decoding failure.
    """
    limit = f"{max_pixels / 1e6:g} Mpx" if max_pixels else "Pillow's limit"
    try:
        with warnings.catch_warnings():
            # The limit is checked below from the header; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=_formats()) as im:
                check_image_shape(im.width, im.height, name, max_pixels, max_aspect_ratio)
                im.load()
                return _upright_rgb(im, name)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{name}: image is too large to decode (limit {limit}): {one_line(exc, 160)}") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(
            f"{name}: not a readable image (unknown or unsupported format; accepted: {', '.join(IMAGE_FORMATS)}); "
            "convert it to PNG or JPEG"
        ) from None
    except MemoryError:
        raise ImageTooLargeError(f"{name}: out of memory while decoding the image; downscale it first") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # OSError/SyntaxError/EOFError for truncated or corrupt files.
        raise ImageLoadError(f"{name}: not a readable image ({one_line(exc, 120)})") from None
    except Exception as exc:  # OverflowError, struct.error, ... from a decoder: still this image's fault
        raise ImageLoadError(f"{name}: could not decode the image ({type(exc).__name__}: {one_line(exc, 120)})") from None


def _formats() -> tuple[str, ...]:
    # Only the plugins Pillow has (e.g. a build without WebP): an unknown name would be a KeyError in Image.open.
    if not all(f in Image.OPEN for f in IMAGE_FORMATS):
        Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


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

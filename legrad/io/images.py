"""Reading image files and URLs as RGB, with bounded work and decoding by what the image is.

:func:`load_image` is the one place every front end (``legrad explain``, ``legrad extract``, the
playground and the app) reads an image through. It

* opens regular files only (a FIFO, device or directory is refused before opening, without blocking);
* decodes only the raster formats of :data:`IMAGE_FORMATS`, whatever the file is called: PostScript/EPS,
  PDF and the rest are refused (Pillow would run Ghostscript on them, with no time limit);
* refuses images above a pixel limit or an aspect ratio (:data:`MAX_ASPECT_RATIO`) from their header,
  before decoding (Pillow's ``DecompressionBombWarning``/``Error`` become :class:`ImageTooLargeError`);
* refuses JPEGs with more than :data:`MAX_JPEG_SCANS` scans before decoding: each scan of a progressive
  JPEG walks the whole image again, so a 1 MB file of 15,000 tiny scans would hold a worker for a minute;
* checks the memory decoding needs, from the header (:func:`decode_bytes`), against the memory the
  system has available, and calls an optional ``interrupt`` before every chunk of input the decoder
  reads (the app passes its ``--time-limit`` check);
* turns any other decoding failure (``OverflowError``, ``MemoryError``, ...) into :class:`ImageLoadError`;
* scales 16-bit (``I;16``, ``I;16B``, ``I``) and float (``F``) images to 8 bits by their range
  instead of clipping, in bands of rows (a few MB of temporaries whatever the image's size),
  composites transparency over white, converts palette/CMYK/... to RGB;
* applies the EXIF orientation, so a phone photo is explained upright.

Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF, MPO) are read as their first frame only:
the other frames are never decoded, so their number costs nothing but the file's bytes.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import fetch
from .decode_limits import (
    MAX_JPEG_SCANS,
    Interrupted,
    InterruptibleReader,
    check_decode_memory,
    check_jpeg_scans,
    count_jpeg_scans,
    decode_bytes,
)
from .errors import ImageLoadError, ImageTooLargeError, one_line
from .files import open_regular_file

__all__ = ["MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO", "MAX_JPEG_SCANS", "IMAGE_EXTENSIONS", "IMAGE_FORMATS",
           "ALLOW_PRIVATE_ENV", "ImageLoadError", "ImageTooLargeError", "load_image", "find_images", "decode_image",
           "check_image_shape", "count_jpeg_scans", "decode_bytes", "to_rgb"]

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
    max_jpeg_scans: int | None = MAX_JPEG_SCANS,
    interrupt: Callable[[], None] | None = None,
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
        max_jpeg_scans: largest number of scans of a JPEG (see :data:`MAX_JPEG_SCANS`); None for no limit.
        interrupt: called before every chunk of the file the decoder reads (e.g.
            ``legrad.engine.deadline.check_deadline``); what it raises ends the decoding and is raised as is.

    Returns:
        An RGB PIL image with the EXIF orientation applied.

    Raises:
        ImageTooLargeError: above ``max_pixels``, ``max_aspect_ratio``, ``max_jpeg_scans``, the memory
            available for decoding, or the URL byte cap.
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
        return decode_image(io.BytesIO(data), label, max_pixels, max_aspect_ratio, max_jpeg_scans=max_jpeg_scans,
                            interrupt=interrupt)
    with open_regular_file(src, label, ImageLoadError) as fh:
        return decode_image(fh, label, max_pixels, max_aspect_ratio, max_jpeg_scans=max_jpeg_scans,
                            interrupt=interrupt)


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
                 max_aspect_ratio: float | None = MAX_ASPECT_RATIO, *,
                 max_jpeg_scans: int | None = MAX_JPEG_SCANS,
                 interrupt: Callable[[], None] | None = None) -> Image.Image:
    """Decodes an image file object to upright RGB after checking its size and decode work from the header.

    Only the formats of :data:`IMAGE_FORMATS` are decoded, recognised by content (a PostScript file
    named ``.png`` is refused, never handed to Ghostscript). Before decoding: the size limits, the
    scans of a JPEG (:func:`count_jpeg_scans`), and the memory decoding needs (:func:`decode_bytes`)
    against what the system has available. While decoding, ``interrupt`` is called before every chunk of
    input (Pillow reads 64 KiB at a time; a libtiff-decoded TIFF reads its file by itself, unchecked).

    Args:
        fp: a binary file object (or path).
        name: how messages name the image.
        max_pixels: largest ``width * height``; None for no limit.
        max_aspect_ratio: largest longer-side / shorter-side ratio; None for no limit.
        max_jpeg_scans: largest number of scans of a JPEG (see :data:`MAX_JPEG_SCANS`); None for no limit.
        interrupt: called before every chunk of input the decoder reads; what it raises (e.g. the app's
            ``RequestTimeoutError``) ends the decoding and is raised as is.

    Returns:
        An RGB PIL image.

    Raises:
        ImageTooLargeError: above ``max_pixels``, ``max_aspect_ratio``, ``max_jpeg_scans`` (or Pillow's own
            bomb limit), more than the available memory, or out of memory while decoding.
        ImageLoadError: not an image of :data:`IMAGE_FORMATS`, truncated, a zero-sized image, or any other
            decoding failure.
        Exception: what ``interrupt`` raised, as is.
    """
    limit = f"{max_pixels / 1e6:g} Mpx" if max_pixels else "Pillow's limit"
    try:
        with warnings.catch_warnings():
            # The limit is checked below from the header; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # A path (no read) is opened by Pillow and read unchecked; load_image always hands a file object.
            reader = InterruptibleReader(fp, interrupt) if interrupt is not None and hasattr(fp, "read") else fp
            with Image.open(reader, formats=_formats()) as im:
                check_image_shape(im.width, im.height, name, max_pixels, max_aspect_ratio)
                if im.format in ("JPEG", "MPO") and max_jpeg_scans is not None:
                    check_jpeg_scans(im, name, max_jpeg_scans)
                check_decode_memory(im, name)
                im.load()
                return _upright_rgb(im, name)
    except Interrupted as stop:
        raise stop.cause from None
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


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _upright_rgb(im: Image.Image, name: str) -> Image.Image:
    # A new RGB image (never ``im`` itself: the caller closes it), rotated after the conversion: rotating first
    # would copy the source in its own mode (float: 4 bytes a pixel) and the result is an RGB copy anyway.
    if im.width == 0 or im.height == 0:
        raise ImageLoadError(f"{name}: image has zero width or height ({im.width}x{im.height})")
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:  # malformed EXIF must not make a readable image unreadable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, one_line(exc, 80))
        orientation = 1
    rgb = to_rgb(im, name)
    if orientation in _ORIENTATION:
        return rgb.transpose(_ORIENTATION[orientation])
    return rgb.copy() if rgb is im else rgb


def to_rgb(im: Image.Image, name: str | None = None) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB by what the pixels mean.

    ``I;16*`` are scaled by 255/65535; ``I`` (32-bit int) by 255/65535 when its values fit 16 bits
    (how 16-bit PNG/TIFF data arrives), else min-max; ``F`` (float) by 255 when in [0, 1], else
    min-max (a constant image becomes mid-grey if outside [0, 1]). These are converted in bands of
    rows, so the temporaries stay a few MB whatever the image's size. Alpha (``RGBA``, ``LA``, ``PA``,
    palette transparency) is composited over white; other modes use Pillow's conversion.

    Args:
        im: the image.
        name: how messages name the image (default: "the image").

    Raises:
        ImageLoadError: a float image holding NaN or infinity, or a mode Pillow cannot convert.
    """
    mode = im.mode
    label = name or "the image"
    if mode == "RGB":
        return im
    if mode in _U16_MODES or mode in ("I", "F"):
        return _scaled_rgb(im, label)
    if mode == "P" and "transparency" in im.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"{label}: images of mode {mode!r} cannot be converted to RGB "
                             f"({one_line(exc, 80)})") from None


# Pixels per band of :func:`_scaled_rgb`: its float64 temporaries are 8 bytes each (a few of them at once).
_BAND_PIXELS = 1 << 20


def _bands(im: Image.Image) -> Iterator[tuple[int, int, np.ndarray]]:
    # (first row, end row, the rows' values): Pillow copies only the band (crop), numpy only that copy.
    w, h = im.size
    rows = max(1, _BAND_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        end = min(h, y + rows)
        yield y, end, np.asarray(im.crop((0, y, w, end)))


def _scaled_rgb(im: Image.Image, name: str) -> Image.Image:
    """A 16-bit, 32-bit int or float image scaled to 8-bit grey, as RGB; the range is found in a first pass
    over bands of rows, and the scaling done band by band into the 8-bit result (the full image is never
    held in float64: a 50 Mpx float32 TIFF would need 400 MB per copy)."""
    mode = im.mode
    if mode in _U16_MODES:
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = np.inf, -np.inf
        for _, _, band in _bands(im):
            if mode == "F" and not np.isfinite(band).all():
                raise ImageLoadError(f"{name}: float image holds NaN or infinite values; replace them (e.g. "
                                     "with numpy.nan_to_num) and save it again")
            lo, hi = min(lo, float(band.min())), max(hi, float(band.max()))
        if (mode == "I" and lo >= 0 and hi <= 65535) or (mode == "F" and lo >= 0 and hi <= 1):
            lo, hi = 0.0, 65535.0 if mode == "I" else 1.0
        elif hi == lo:
            return Image.new("RGB", im.size, (128, 128, 128))
    grey = np.empty((im.height, im.width), dtype=np.uint8)
    for y, end, band in _bands(im):
        grey[y:end] = _scale_to_u8(band, lo, hi)
    return Image.fromarray(grey).convert("RGB")


def _scale_to_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    a = values.astype(np.float64)
    a -= lo
    a *= 255.0 / (hi - lo)
    np.rint(a, out=a)
    np.clip(a, 0, 255, out=a)
    return a.astype(np.uint8)

"""What decoding an image costs, checked before it starts: a JPEG's scans, the memory, and a reader that
lets a caller interrupt the decoder between chunks of input. Used by :func:`legrad.io.images.decode_image`.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import re
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image

from .errors import ImageTooLargeError

__all__ = ["MAX_JPEG_SCANS", "DECODE_MEMORY_FRACTION", "Interrupted", "InterruptibleReader", "count_jpeg_scans",
           "check_jpeg_scans", "decode_bytes", "available_ram", "check_decode_memory"]

#: Default largest number of scans (SOS segments) of a JPEG that :func:`legrad.io.images.load_image`
#: decodes. Every scan of a progressive JPEG is a pass over all of the image's blocks, so the decoding
#: time is scans x pixels, and a scan can be a handful of bytes: a 1 MB file of 15,000 scans takes about a minute (a 25 MB upload,
#: hours), and nothing can stop Pillow's decoder once it runs. Encoders write 1 (baseline) to about a
#: dozen (libjpeg's progressive default is 10, mozjpeg's optimised scripts a few more); libjpeg-turbo's
#: own tools offer a similar scan limit (``djpeg -maxscans``) for the same reason.
MAX_JPEG_SCANS = 100


class Interrupted(BaseException):
    """Carries what an ``interrupt`` callback raised through Pillow (which turns an ``OSError``, such as a
    ``TimeoutError``, into a decoding failure) back to :func:`legrad.io.images.decode_image`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


class InterruptibleReader:
    """A file object that calls ``interrupt`` before every read, so that a decoder fed chunk by chunk stops
    within one chunk's work of it raising. Everything else is the wrapped file's (``fileno``, ``getvalue``,
    ...: Pillow's plugins look for them)."""

    def __init__(self, raw: Any, interrupt: Callable[[], None]) -> None:
        self._raw = raw
        self._interrupt = interrupt

    def read(self, *args: Any) -> bytes:
        try:
            self._interrupt()
        except Exception as exc:
            raise Interrupted(exc) from None
        return self._raw.read(*args)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._raw, attr)


# A JPEG marker: 0xFF then a code that is not a stuffed byte (0x00), a restart (0xD0-0xD7) or fill (0xFF).
# Inside entropy-coded data nothing else can follow 0xFF, so the next match ends the scan's data.
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_SOS, _EOI, _SOI, _TEM = 0xDA, 0xD9, 0xD8, 0x01
# Markers looked at per JPEG: real files have a few dozen (tables, scans); the walk is a Python loop, so
# a file of millions of tiny segments must not make it long.
_MAX_JPEG_MARKERS = 20_000


def count_jpeg_scans(data: Any, start: int = 0, stop_after: int | None = None) -> int:
    """The scans (SOS segments) of the JPEG that starts at ``data[start]``, up to its end (EOI).

    Walks the markers: segments are skipped by their length, and scan data by a search for the next
    marker (C speed), so the work is bounded by the file's bytes and at most ``_MAX_JPEG_MARKERS``
    steps. Whatever follows the image's EOI (an MPO's other frames, a phone's appended video) is not
    looked at. A malformed stream ends the count where it stops making sense (the decoder reports it).

    Args:
        data: the bytes (anything the ``re`` module reads: ``bytes``, ``memoryview``, ``mmap``).
        start: where the JPEG's SOI marker is.
        stop_after: stop counting once the count exceeds this (the caller's limit).

    Returns:
        The number of scans seen (at most ``stop_after + 1``).

    Raises:
        ImageTooLargeError: more than ``_MAX_JPEG_MARKERS`` markers before the end of the count.
    """
    size = len(data)
    if data[start:start + 2] != b"\xff\xd8":
        return 0
    pos, scans, markers = start + 2, 0, 0
    while stop_after is None or scans <= stop_after:
        m = _JPEG_MARKER.search(data, pos)
        if m is None:
            break
        markers += 1
        if markers > _MAX_JPEG_MARKERS:
            raise ImageTooLargeError(f"more than {_MAX_JPEG_MARKERS} JPEG markers")
        code, pos = data[m.end() - 1], m.end()
        if code in (_EOI, _SOI):
            break
        if code == _TEM:  # no length
            continue
        if pos + 2 > size:
            break
        if code == _SOS:
            scans += 1
        # A segment's length counts its two length bytes; scan data follows an SOS header and is searched.
        pos += max((data[pos] << 8) | data[pos + 1], 2)
    return scans


@contextlib.contextmanager
def _file_bytes(fp: Any) -> Iterator[tuple[Any, int]]:
    """``(bytes-like, base)`` of a file object without copying it where possible: a ``BytesIO``'s buffer, a
    real file's memory map; else its bytes from the current position (``base``: the file position of
    index 0)."""
    raw = fp._raw if isinstance(fp, InterruptibleReader) else fp
    if isinstance(raw, io.BytesIO):
        view = raw.getbuffer()
        try:
            yield view, 0
        finally:
            view.release()
        return
    try:
        mapped = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
    except (AttributeError, OSError, ValueError):
        mapped = None
    if mapped is not None:
        with mapped:
            yield mapped, 0
        return
    where = raw.tell()
    yield raw.read(), where
    raw.seek(where)


#: Share of the system's available memory one image's decoding may need (as ``legrad.engine.budget``'s
#: ``AVAILABLE_FRACTION`` for a model call).
DECODE_MEMORY_FRACTION = 0.8
# Bytes per pixel Pillow stores for a mode: 3 bands are stored in 4 bytes, like 4.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Allocator slack and the conversions' band temporaries (a few float64 bands of rows).
_DECODE_SAFETY_FACTOR = 1.25
_DECODE_SAFETY_BYTES = 32 * 2**20


def decode_bytes(width: int, height: int, mode: str, *, jpeg_progressive: bool = False) -> int:
    """Upper bound of the extra memory :func:`legrad.io.images.decode_image` needs for an image, from its header.

    The decoded image (Pillow's bytes per pixel of ``mode``), the RGB result and its EXIF-rotated copy, the
    conversion's own images (alpha compositing: three RGBA images; 16-bit and float images: one 8-bit
    image, scaled in bands of rows), and a progressive JPEG's coefficient buffer (2 bytes for each of the
    64 coefficients of every 8x8 block of every full-size component), times a safety margin, plus a
    constant.

    Args:
        width, height: the image's size.
        mode: Pillow's mode of the decoded image (e.g. ``"RGB"``, ``"F"``, ``"I;16"``).
        jpeg_progressive: a progressive JPEG (its scans are gathered in a whole-image buffer).

    Returns:
        Bytes.
    """
    px = int(width) * int(height)
    image = px * _MODE_BYTES.get(mode, 4)
    rgb = 4 * px  # the result; an RGB source is copied, any other converted, and either may be rotated once more
    if mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        convert = 3 * 4 * px  # RGBA, the white background, the composite
    elif mode.startswith("I;16") or mode in ("I", "F"):
        convert = px  # the 8-bit grey image, scaled band by band
    else:
        convert = 0
    # 2 bytes x 64 coefficients per 64 pixels: 2 bytes per pixel and component (chroma counted full-size).
    coefficients = 2 * px * _bands_of(mode) if jpeg_progressive else 0
    live = image + rgb + (rgb if mode != "RGB" else 0) + convert + coefficients
    return int(_DECODE_SAFETY_FACTOR * live + _DECODE_SAFETY_BYTES)


def _bands_of(mode: str) -> int:
    try:
        return Image.getmodebands(mode)
    except (KeyError, ValueError):
        return 4


def available_ram() -> int | None:
    """Bytes of memory the system has available (``MemAvailable`` of ``/proc/meminfo``), or None when unknown."""
    # MemAvailable of /proc/meminfo (Linux), as legrad.engine.budget.available_memory reads it for the CPU
    # (the io layer imports nothing above it, and budget imports torch); None elsewhere.
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_decode_memory(im: Image.Image, name: str) -> None:
    """Refuses an opened, not yet decoded image whose decoding would need more than
    :data:`DECODE_MEMORY_FRACTION` of the available memory (no check where that is unknown).

    Raises:
        ImageTooLargeError: naming the image, the memory needed and the memory available.
    """
    need = decode_bytes(im.width, im.height, im.mode,
                        jpeg_progressive=im.format in ("JPEG", "MPO") and bool(im.info.get("progressive")))
    avail = available_ram()
    if avail is not None and need > DECODE_MEMORY_FRACTION * avail:
        raise ImageTooLargeError(
            f"{name}: decoding this {im.width}x{im.height} {im.mode} image needs about {need / 2**20:,.0f} MiB, "
            f"more than {DECODE_MEMORY_FRACTION:.0%} of the {avail / 2**20:,.0f} MiB of memory available; "
            "downscale it first"
        )


def check_jpeg_scans(im: Image.Image, name: str, max_scans: int) -> None:
    """Refuses an opened, not yet decoded JPEG of more than ``max_scans`` scans (its file read in place:
    a memory map or a ``BytesIO``'s buffer; the file position is kept).

    Raises:
        ImageTooLargeError: naming the image and the limit.
    """
    # Before im.load(): Pillow's decoder (libjpeg) cannot be stopped once it runs, whatever the deadline.
    offset = im.tile[0][2] if im.tile else 0
    fp = im.fp
    where = fp.tell()
    try:
        with _file_bytes(fp) as (data, base):
            scans = count_jpeg_scans(data, offset - base, stop_after=max_scans)
    except ImageTooLargeError as exc:
        raise ImageTooLargeError(f"{name}: {exc}; not a JPEG a camera or encoder writes, re-save it first") from None
    finally:
        fp.seek(where)
    if scans > max_scans:
        raise ImageTooLargeError(
            f"{name}: the JPEG has more than {max_scans} scans (decoding walks the whole image once per scan; "
            f"encoders write at most a few dozen); re-save it as a baseline JPEG or PNG first"
        )

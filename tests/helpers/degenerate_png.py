"""A valid PNG of any size written by hand, for degenerate-image tests (no decoder or size check involved)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def write_gray_png(path: Path, width: int, height: int) -> None:
    """An 8-bit grayscale PNG, mid-grey (a 34,000,000x1 one is 33 KB: zlib squeezes the runs)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"".join(b"\x00" + b"\x80" * width for _ in range(height)), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))

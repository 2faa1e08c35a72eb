"""Progressive JPEGs with many scans, built from Pillow's own output (no encoder with custom scan scripts needed).

A progressive JPEG's last scan (libjpeg's default script: the luma AC refinement, ``Ah=1, Al=0``) is, on a flat
image, a few bytes: one end-of-band run over every block. Repeating it makes a valid file (libjpeg only warns
about the redundant progression) whose decoding walks all the image's blocks once per copy: time grows as
scans x pixels while the file grows by ~12 bytes a scan.
"""

from __future__ import annotations

import io
import struct

from PIL import Image


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """``(marker code, start, end)`` of each segment of a JPEG; a scan's segment runs to the end of its data."""
    out = [(0xD8, 0, 2)]
    pos = 2
    while pos < len(data):
        assert data[pos] == 0xFF, pos
        code = data[pos + 1]
        if code == 0xD9:
            out.append((code, pos, pos + 2))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if code == 0xDA:  # entropy-coded data up to the next marker (not a stuffed 0xFF00 or a restart)
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        out.append((code, pos, end))
        pos = end
    return out


def progressive_jpeg(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (128, 128, 128),
                     image: Image.Image | None = None) -> bytes:
    """Pillow's progressive JPEG (libjpeg's default script: 10 scans) of a flat ``color`` (or of ``image``)."""
    buf = io.BytesIO()
    (image if image is not None else Image.new("RGB", size, color)).save(buf, "JPEG", progressive=True, quality=90)
    return buf.getvalue()


def many_scans_jpeg(scans: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A valid progressive JPEG of a flat grey ``size`` image with ``scans`` scans (at least Pillow's 10)."""
    data = progressive_jpeg(size)
    sos = [(start, end) for code, start, end in jpeg_segments(data) if code == 0xDA]
    assert len(sos) <= scans, (len(sos), scans)
    start, end = sos[-1]
    return data[:end] + data[start:end] * (scans - len(sos)) + data[end:]

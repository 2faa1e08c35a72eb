"""Hostile images at the loader (legrad.io.images) and the explainer: extreme aspect ratios (which a
model's preprocess would upscale), decoder failures, PostScript disguised as a raster image (which Pillow
would hand to Ghostscript, with no time limit), and, in the command-line runs, a JPEG of 15,000 scans
(more in tests/test_images_decode_bounds.py)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env
from helpers.jpeg_scans import many_scans_jpeg
from PIL import Image

from legrad.io.images import (
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MAX_ASPECT_RATIO,
    ImageLoadError,
    ImageTooLargeError,
    decode_image,
    load_image,
)

# A valid EPS that draws a red square (Ghostscript renders it), and one that never ends.
EPS_RED = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 32 32
%%EndComments
1 0 0 setrgbcolor
newpath 0 0 moveto 32 0 lineto 32 32 lineto 0 32 lineto closepath fill
showpage
%%EOF
"""
EPS_FOREVER = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 32 32
%%EndComments
{ 1 pop } loop
%%EOF
"""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def strip_png(width: int, height: int = 1) -> bytes:
    """A valid 8-bit greyscale PNG of ``width x height`` zeros, compressed in pieces (no ``width``-sized buffer)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels; only for small widths
    if width <= 1_000_000:
        body = comp.compress(row * height)
    else:
        body, zeros = comp.compress(b"\x00"), width  # height 1: the filter byte, then the pixels in 1 MB pieces
        piece = b"\x00" * 2**20
        while zeros > 0:
            body += comp.compress(piece[: min(zeros, len(piece))])
            zeros -= len(piece)
    body += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


# ---------------------------------------------------------------- aspect ratio


def test_strip_png_is_a_real_image():
    # The fixture itself decodes when the aspect limit is lifted (so the refusals below are the limit's doing).
    im = decode_image(io.BytesIO(strip_png(3000)), "s", max_aspect_ratio=None)
    assert im.size == (3000, 1) and im.getpixel((2999, 0)) == (0, 0, 0)


def test_300000x1_png_is_refused_from_its_header(tmp_path):
    path = tmp_path / "strip.png"
    path.write_bytes(strip_png(300_000))
    assert path.stat().st_size < 2000  # a few hundred bytes that a model's preprocess would make gigabytes of
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="elongated") as info:
        load_image(path)
    assert time.perf_counter() - start < 5
    assert "crop or pad" in str(info.value) and "300000x1" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("size", [(MAX_ASPECT_RATIO, 1), (1, MAX_ASPECT_RATIO), (5 * MAX_ASPECT_RATIO, 5)])
def test_aspect_ratio_at_the_limit_is_accepted(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    assert load_image_bytes(buf.getvalue()).size == size


@pytest.mark.parametrize("size", [(MAX_ASPECT_RATIO + 1, 1), (1, MAX_ASPECT_RATIO + 1), (5 * MAX_ASPECT_RATIO + 1, 5)])
def test_aspect_ratio_above_the_limit_is_refused(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    with pytest.raises(ImageTooLargeError, match="elongated"):
        load_image_bytes(buf.getvalue())
    # Configurable, like the pixel limit.
    assert decode_image(io.BytesIO(buf.getvalue()), "x", max_aspect_ratio=None).size == size


def load_image_bytes(data: bytes) -> Image.Image:
    return decode_image(io.BytesIO(data), "the image")


def test_pil_images_handed_in_are_checked_too():
    with pytest.raises(ImageTooLargeError, match="elongated"):
        load_image(Image.new("RGB", (3000, 2)), name="the uploaded image")
    with pytest.raises(ImageTooLargeError, match="too large"):
        load_image(Image.new("L", (300, 200)), max_pixels=59_999)
    assert load_image(Image.new("L", (300, 200)), max_pixels=60_000).size == (300, 200)


def test_34000000x1_png_is_refused_quickly_and_small(tmp_path):
    # Read in a fresh process: its peak memory then tells whether the 34 MB of pixels were ever decoded.
    path = tmp_path / "strip.png"
    path.write_bytes(strip_png(34_000_000))
    code = f"""
import resource, time
from legrad.io.images import ImageTooLargeError, load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    load_image({str(path)!r})
except ImageTooLargeError as exc:
    print("refused", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, exc)
"""
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env(),
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    word, seconds, grown_kb, message = res.stdout.split(" ", 3)
    assert word == "refused" and "elongated" in message
    assert float(seconds) < 5
    assert int(grown_kb) < 20_000  # decoding would take 34 MB (greyscale) + 102 MB (RGB)


def test_explainer_refuses_elongated_pil_images_before_preprocessing():
    from legrad.frontend.explainer import Explainer

    explainer = Explainer.load("toy")
    strip = Image.new("RGB", (64 * (MAX_ASPECT_RATIO + 1), 64))
    with pytest.raises(ImageTooLargeError, match="elongated"):
        explainer.explain(strip, "a red circle")
    # The lower-level entry points the command line uses check too (the model's preprocess upscales first).
    text = explainer.encode_prompts(["a red circle"])
    with pytest.raises(ImageTooLargeError, match="elongated"):
        explainer.similarity([strip], text)
    with pytest.raises(ImageTooLargeError, match="elongated"):
        explainer.heatmaps([strip], text)
    explainer.max_aspect_ratio = None  # the limit is the explainer's to lift
    assert explainer.explain(strip, "a red circle").maps.shape == (1, 1, 64, 64)


# ---------------------------------------------------------------- decoder failures


@pytest.mark.parametrize("error, kind", [(OverflowError("signed integer is greater than maximum"), ImageLoadError),
                                         (MemoryError(), ImageTooLargeError),
                                         (struct.error("unpack requires a buffer"), ImageLoadError)])
def test_any_decoder_failure_becomes_an_image_error(monkeypatch, error, kind):
    from PIL import PngImagePlugin

    def fail(self):
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", fail)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    with pytest.raises(kind, match="the image") as info:
        load_image_bytes(buf.getvalue())
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- formats


def test_every_image_extension_is_an_accepted_format():
    Image.init()
    registered = Image.registered_extensions()
    for ext in IMAGE_EXTENSIONS:
        assert registered[ext] in IMAGE_FORMATS, ext


@pytest.mark.parametrize("fmt, kwargs", [("PNG", {}), ("JPEG", {}), ("BMP", {}), ("GIF", {}), ("WEBP", {}),
                                         ("TIFF", {}), ("PPM", {}),
                                         ("MPO", {"save_all": True, "append_images": [Image.new("RGB", (8, 6))]})])
def test_accepted_formats_decode(fmt, kwargs):
    if fmt not in Image.SAVE:
        Image.init()
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow cannot write {fmt}")
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (250, 250, 250)).save(buf, fmt, **kwargs)
    im = load_image_bytes(buf.getvalue())
    assert im.size == (8, 6) and im.mode == "RGB"


def test_eps_fixture_is_valid_postscript(tmp_path):
    # Where Ghostscript is installed, Pillow on its own renders the fixture: it is a real EPS.
    if shutil.which("gs") is None:
        pytest.skip("Ghostscript (gs) is not installed")
    with Image.open(io.BytesIO(EPS_RED)) as im:
        im.load()
        assert im.size == (32, 32) and im.convert("RGB").getpixel((16, 16)) == (255, 0, 0)


@pytest.mark.parametrize("data", [EPS_RED, EPS_FOREVER, b"%PDF-1.4\n%%EOF\n"], ids=["eps", "eps-forever", "pdf"])
def test_postscript_named_png_is_refused_without_running_ghostscript(tmp_path, data):
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="accepted: PNG, JPEG") as info:
        load_image(path)
    assert time.perf_counter() - start < 5
    assert "convert it to PNG or JPEG" in str(info.value)


def test_postscript_bytes_are_refused_in_memory_too():
    # Bytes (URL downloads, `legrad extract`) are what Pillow hands to Ghostscript; a valid EPS would render.
    with pytest.raises(ImageLoadError, match="accepted: PNG, JPEG"):
        decode_image(io.BytesIO(EPS_RED), "the URL")


def _run_to_end(args: list[str], timeout: float = 60) -> tuple[int, str, str]:
    # Its own process group: if Ghostscript were run and hung, the test kills it rather than leaving it spinning.
    proc = subprocess.Popen([PYTHON, "-m", "legrad", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"legrad {args[0]} did not finish within {timeout:g} s")
    return proc.returncode, stdout, stderr


def _hostile_folder(root: Path) -> Path:
    src = root / "images"
    src.mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(src / "good.png")
    (src / "ps.png").write_bytes(EPS_FOREVER)  # PostScript that never ends, named like a PNG
    (src / "strip.png").write_bytes(strip_png(34_000_000))
    # 15,000 scans of a 2048x2048 image: 40 s to minutes of decoding if it were not refused from its markers.
    (src / "scans.jpg").write_bytes(many_scans_jpeg(15_000, (2048, 2048)))
    return src


@pytest.mark.subprocess
def test_explain_folder_with_postscript_and_a_strip_keeps_the_good_image(tmp_path):
    src = _hostile_folder(tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = _run_to_end(["explain", str(src), "-p", "a red circle", "--out", str(out)])
    assert code == 1, stderr  # three images failed, and the exit status says so
    assert "Traceback" not in stderr
    assert "ps.png" in stderr and "accepted: PNG" in stderr
    assert "strip.png" in stderr and "elongated" in stderr
    assert "scans.jpg" in stderr and "more than 100 scans" in stderr
    assert "1 of 4 images explained, 3 failed" in stdout
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["image"]).name for r in rows] == ["good.png"]
    overlays = list(out.rglob("*.png"))
    assert [(out / rows[0]["overlay"])] == overlays
    with Image.open(overlays[0]) as im:
        assert im.size == (64, 64)


@pytest.mark.subprocess
def test_extract_folder_with_postscript_and_a_strip_ends_with_the_good_image(tmp_path):
    # extract decodes the bytes it read: without the format list, Pillow would run Ghostscript on the
    # never-ending PostScript and wait for it forever.
    src = _hostile_folder(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = _run_to_end(["extract", str(src), "-p", "a red circle", "--out", str(out), "--workers", "0"])
    assert code == 1, stderr
    assert "Traceback" not in stderr
    with open(out / "manifest.jsonl") as fh:
        records = {r["image"]: r for r in map(json.loads, fh)}
    assert records["good.png"]["status"] == "ok" and (out / "good.png.npz").is_file()
    assert records["ps.png"]["status"] == "error" and "accepted: PNG" in records["ps.png"]["error"]
    assert records["strip.png"]["status"] == "error" and "elongated" in records["strip.png"]["error"]
    assert records["scans.jpg"]["status"] == "error" and "more than 100 scans" in records["scans.jpg"]["error"]

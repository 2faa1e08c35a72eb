"""Bounded decoding in legrad.io.images: JPEG scan bombs refused before decoding, 16-bit and float images
converted in bands of rows, the decode's memory checked from the header, and an ``interrupt`` (the app's
time limit) called between chunks of input."""

from __future__ import annotations

import io
import json
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env
from helpers.jpeg_scans import jpeg_segments, many_scans_jpeg, progressive_jpeg
from PIL import Image

from legrad.engine import deadline as dl
from legrad.io import decode_limits, images
from legrad.io.images import (
    MAX_JPEG_SCANS,
    ImageLoadError,
    ImageTooLargeError,
    count_jpeg_scans,
    decode_bytes,
    decode_image,
    load_image,
    to_rgb,
)

# ---------------------------------------------------------------- JPEG scans


def test_the_many_scans_fixture_is_a_valid_jpeg_that_is_slow_to_decode():
    data = many_scans_jpeg(1000, (512, 512))
    assert count_jpeg_scans(data) == 1000 and len(data) < 20_000
    start = time.perf_counter()
    im = decode_image(io.BytesIO(data), "bomb.jpg", max_jpeg_scans=None)  # the limit lifted: it decodes
    decode_s = time.perf_counter() - start
    assert im.size == (512, 512) and all(abs(c - 128) <= 1 for c in im.getpixel((100, 100)))
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="more than 100 scans"):
        decode_image(io.BytesIO(data), "bomb.jpg")
    refuse_s = time.perf_counter() - start
    # Decoding grows with scans x pixels; the refusal reads markers only (a few ms at any size).
    assert refuse_s * 10 < decode_s, (refuse_s, decode_s)


def test_a_15000_scan_jpeg_is_refused_at_once_naming_the_file_and_the_limit(tmp_path):
    # 2048x2048 and 15,000 scans: about 260 KB, and 40 s (idle) to minutes (busy machine) of decoding (the 1 MB file: a minute).
    path = tmp_path / "bomb.jpg"
    path.write_bytes(many_scans_jpeg(15_000, (2048, 2048)))
    assert path.stat().st_size < 400_000
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert str(path) in message and f"more than {MAX_JPEG_SCANS} scans" in message and "re-save" in message
    assert isinstance(info.value, ImageLoadError) and isinstance(info.value, ValueError)


def test_the_scan_limit_is_inclusive_and_configurable():
    at_limit = many_scans_jpeg(MAX_JPEG_SCANS)
    assert decode_image(io.BytesIO(at_limit), "x").size == (64, 64)
    with pytest.raises(ImageTooLargeError, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(io.BytesIO(many_scans_jpeg(MAX_JPEG_SCANS + 1)), "x")
    assert decode_image(io.BytesIO(many_scans_jpeg(MAX_JPEG_SCANS + 1)), "x", max_jpeg_scans=None).size == (64, 64)
    with pytest.raises(ImageTooLargeError, match="more than 5 scans"):  # Pillow's default progressive has 10
        decode_image(io.BytesIO(progressive_jpeg()), "x", max_jpeg_scans=5)


@pytest.mark.parametrize("progressive, scans", [(True, 10), (False, 1)])
def test_ordinary_jpegs_load_with_the_same_pixels(tmp_path, progressive, scans):
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    path = tmp_path / "photo.jpg"
    noise.save(path, "JPEG", progressive=progressive, quality=85)
    data = path.read_bytes()
    assert count_jpeg_scans(data) == scans == sum(code == 0xDA for code, _, _ in jpeg_segments(data))
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), expected)


def test_the_count_ends_with_the_image():
    # Bytes after the image's end (a phone's appended video, an MPO's other frames) are not scans of it.
    data = progressive_jpeg() + b"\xff\xda\x00\x08" * 500
    assert count_jpeg_scans(data) == 10
    assert decode_image(io.BytesIO(data), "motion.jpg").size == (64, 64)
    buf = io.BytesIO()
    frames = [Image.new("RGB", (64, 64), (200, 0, 0)), *[Image.new("RGB", (64, 64)) for _ in range(150)]]
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    assert count_jpeg_scans(buf.getvalue()) == 1
    assert decode_image(io.BytesIO(buf.getvalue()), "stereo.mpo").getpixel((5, 5))[0] > 190


def test_a_jpeg_of_too_many_markers_is_refused_quickly():
    data = progressive_jpeg()
    end = jpeg_segments(data)[-1][1]  # the EOI
    padded = data[:end] + b"\xff\xfe\x00\x02" * 30_000 + data[end:]  # 30,000 empty comments after the scans
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="markers") as info:
        decode_image(io.BytesIO(padded), "comments.jpg")
    assert time.perf_counter() - start < 1.0 and "comments.jpg" in str(info.value)


# ---------------------------------------------------------------- interrupt (the app's time limit)


class FakeClock:
    """Advances one second at every reading."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _noise_png(tmp_path, side: int = 400):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size > 5 * 65536  # several chunks of Pillow's 64 KiB reads
    return path


def test_interrupt_is_called_between_chunks_and_what_it_raises_passes_through(tmp_path, monkeypatch):
    path = _noise_png(tmp_path)
    calls = []
    im = load_image(path, interrupt=lambda: calls.append(1))
    assert im.size == (400, 400) and len(calls) >= 5
    monkeypatch.setattr(dl, "_clock", FakeClock())
    with dl.deadline(3.5):  # past it at the third reading
        with pytest.raises(dl.RequestTimeoutError):  # a TimeoutError (an OSError), not an ImageLoadError
            load_image(path, interrupt=dl.check_deadline)


def test_the_apps_uploads_are_read_under_its_time_limit(tmp_path, monkeypatch):
    from legrad.app.sources import read_visitor_image

    path = _noise_png(tmp_path)
    policy = SimpleNamespace(upload_dirs=(str(tmp_path.resolve()),), example_files=frozenset(), allowed_dirs=(),
                             allow_urls=False)
    assert read_visitor_image(str(path), None, policy).size == (400, 400)
    monkeypatch.setattr(dl, "_clock", FakeClock())
    with dl.deadline(3.5):
        with pytest.raises(dl.RequestTimeoutError):
            read_visitor_image(str(path), None, policy)


# ---------------------------------------------------------------- 16-bit and float images, in bands


def _expected_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.array([[int(np.clip(round((float(v) - lo) / (hi - lo) * 255.0), 0, 255)) for v in row]
                     for row in values], dtype=np.uint8)


@pytest.mark.parametrize("band_pixels", [7, 11, 1 << 20])  # many bands of fewer rows than the image, or one
def test_band_conversion_matches_the_whole_image_formula(monkeypatch, band_pixels):
    monkeypatch.setattr(images, "_BAND_PIXELS", band_pixels)
    hdr = (np.random.default_rng(1).random((9, 11)) * 1000 - 200).astype(np.float32)
    hdr[0, 0], hdr[8, 10] = 5000.0, -3000.0  # the range's ends in the first and the last band
    got = np.asarray(to_rgb(Image.fromarray(hdr, mode="F")))
    assert np.array_equal(got[..., 1], _expected_u8(hdr, -3000.0, 5000.0))
    unit = hdr.clip(0, 1000) / 1000
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(unit, mode="F")))[..., 0], _expected_u8(unit, 0.0, 1.0))
    u16 = np.random.default_rng(2).integers(0, 65536, (9, 11), dtype=np.uint16)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(u16)))[..., 2], _expected_u8(u16, 0, 65535))
    wide = np.random.default_rng(4).integers(-70000, 70000, (9, 11), dtype=np.int32)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(wide)))[..., 0],
                          _expected_u8(wide, float(wide.min()), float(wide.max())))
    flat = np.full((9, 11), 7.5, dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(flat, mode="F"))).tolist() == [[[128] * 3] * 11] * 9
    late_nan = unit.copy()
    late_nan[8, 10] = np.nan  # only in the last band
    with pytest.raises(ImageLoadError, match="NaN"):
        to_rgb(Image.fromarray(late_nan, mode="F"))


def test_a_nan_tiff_error_names_the_file(tmp_path):
    values = np.zeros((6, 5), dtype=np.float32)
    values[5, 4] = np.inf
    path = tmp_path / "scan-0042.tif"
    Image.fromarray(values, mode="F").save(path)
    with pytest.raises(ImageLoadError, match="NaN or infinite") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageLoadError, match="^the upload: float image"):
        load_image(path, name="the upload")


_MEASURE = r"""
import json, sys
from PIL import Image
from legrad.io import decode_limits, images

def kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

out = {}
for path in sys.argv[1:]:
    base = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    im = images.load_image(path, max_pixels=None)
    peak = (kib("VmHWM") - base) * 1024
    with Image.open(path) as src:
        out[path] = {"peak": peak, "estimate": images.decode_bytes(src.width, src.height, src.mode),
                     "pixels": src.width * src.height, "mode": src.mode, "rgb": im.mode}
    del im
print(json.dumps(out))
"""


@pytest.mark.subprocess
def test_float_and_16bit_images_decode_in_bounded_memory(tmp_path):
    # 16 Mpx: the float64 conversion took ~36 bytes a pixel at its peak (+1.7 GB for a 50 Mpx float TIFF);
    # in bands: the source (4 or 2 bytes), the 8-bit grey (1) and the RGB result (4), plus a few MB.
    side = 4000
    steps = np.floor(np.linspace(0, 16, side, endpoint=False, dtype=np.float32)) / 16
    ramp = np.add.outer(steps, steps)
    paths = {"F": tmp_path / "f.tif", "I;16": tmp_path / "u16.png"}
    Image.fromarray((ramp * 900 - 100).astype(np.float32), mode="F").save(paths["F"], compression="tiff_adobe_deflate")
    Image.fromarray((ramp * 30000).astype(np.uint16)).save(paths["I;16"])
    del ramp
    assert paths["F"].stat().st_size < 1_000_000  # a small file of a large image
    res = subprocess.run([PYTHON, "-c", _MEASURE, *map(str, paths.values())], capture_output=True, text=True,
                         timeout=120, env=subprocess_env(), cwd=REPO)
    assert res.returncode == 0, res.stderr
    measured = json.loads(res.stdout.strip().splitlines()[-1])
    for mode, path in paths.items():
        m = measured[str(path)]
        assert m["mode"] in (mode, "I") and m["rgb"] == "RGB"
        assert m["peak"] < 12 * m["pixels"], (mode, m["peak"] / m["pixels"])
        assert m["estimate"] >= m["peak"], (mode, m)  # the pre-flight estimate is an upper bound


# ---------------------------------------------------------------- the decode's memory, from the header


def test_decoding_more_than_the_available_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 2000), 9).save(path)
    monkeypatch.setattr(decode_limits, "available_ram", lambda: 40 * 2**20)
    need = decode_bytes(3000, 2000, "L")
    assert need > 0.8 * 40 * 2**20

    def never(self):
        raise AssertionError("decoded despite the memory check")

    from PIL import PngImagePlugin

    with monkeypatch.context() as m:
        m.setattr(PngImagePlugin.PngImageFile, "load", never)
        with pytest.raises(ImageTooLargeError, match="MiB of memory available; downscale it first") as info:
            load_image(path)
    assert str(path) in str(info.value) and "3000x2000" in str(info.value)
    monkeypatch.setattr(decode_limits, "available_ram", lambda: None)  # unknown (not Linux): no check
    assert load_image(path).size == (3000, 2000)


def test_decode_estimate_grows_with_what_decoding_holds():
    base = decode_bytes(1000, 1000, "RGB")
    assert decode_bytes(1000, 1000, "F") > decode_bytes(1000, 1000, "L") > 0
    assert decode_bytes(1000, 1000, "RGBA") > base  # compositing over white: three RGBA images
    assert decode_bytes(1000, 1000, "RGB", jpeg_progressive=True) >= base + 6 * 10**6  # coefficient buffer
    assert decode_bytes(2000, 1000, "RGB") > base


# ---------------------------------------------------------------- multi-frame files


def test_only_the_first_frame_of_an_animation_is_decoded(monkeypatch):
    from PIL import GifImagePlugin

    frames = [Image.new("P", (32, 32), i % 200) for i in range(300)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=10)
    seen = []
    original = GifImagePlugin.GifImageFile.seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", lambda self, frame: (seen.append(frame),
                                                                                 original(self, frame))[1])
    im = decode_image(io.BytesIO(buf.getvalue()), "anim.gif")
    assert im.size == (32, 32) and max(seen, default=0) == 0

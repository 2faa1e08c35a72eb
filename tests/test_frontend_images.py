"""Tests of image reading (legrad.io.images) and URL fetching (legrad.io.fetch): bounded work, refused
addresses, decoding by mode, EXIF orientation."""

from __future__ import annotations

import http.server
import io
import os
import socketserver
import threading
import time

import numpy as np
import pytest
from PIL import Image

from legrad.io import fetch
from legrad.io.images import ImageLoadError, ImageTooLargeError, load_image, to_rgb


def _png_bytes(size=(6, 4), colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- a local HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404)
            return
        route(self)

    def log_message(self, *args):
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture()
def server():
    """A loopback HTTP server; ``routes`` maps paths to handler functions."""
    routes: dict = {}
    handler = type("H", (_Handler,), {"routes": routes})
    srv = _Server(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits up to one interval (0.5 s by default) per test.
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield base, routes
    finally:
        srv.shutdown()
        srv.server_close()


def _send(body: bytes, ctype: str = "image/png"):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def _allow_loopback(addr: str) -> bool:
    # Test stand-in for the public-address check: accepts the test server's loopback address only.
    return addr == "127.0.0.1"


def test_loopback_url_is_refused_before_connecting(server):
    base, routes = server
    hits = []
    routes["/img.png"] = lambda h: (hits.append(1), _send(_png_bytes())(h))
    with pytest.raises(fetch.URLRefusedError, match="not a public internet address"):
        load_image(f"{base}/img.png", allow_private_urls=False)
    with pytest.raises(fetch.URLRefusedError):
        load_image(f"http://localhost:{base.rsplit(':', 1)[1]}/img.png", allow_private_urls=False)
    assert hits == []  # nothing reached the server
    # The same image is served when private addresses are allowed (the check is what refused it).
    img = load_image(f"{base}/img.png", allow_private_urls=True)
    assert img.size == (6, 4) and img.getpixel((0, 0)) == (10, 200, 30)
    assert hits == [1]


def test_private_urls_opt_in_by_environment(server, monkeypatch):
    base, routes = server
    routes["/img.png"] = _send(_png_bytes())
    monkeypatch.delenv("LEGRAD_ALLOW_PRIVATE_URLS", raising=False)
    with pytest.raises(fetch.URLRefusedError):
        load_image(f"{base}/img.png")
    monkeypatch.setenv("LEGRAD_ALLOW_PRIVATE_URLS", "1")
    assert load_image(f"{base}/img.png").size == (6, 4)
    with pytest.raises(fetch.URLRefusedError):  # an explicit False wins over the environment
        load_image(f"{base}/img.png", allow_private_urls=False)


def test_redirect_to_loopback_is_refused(server):
    base, routes = server
    hits = []
    routes["/img.png"] = lambda h: (hits.append(1), _send(_png_bytes())(h))

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", f"{base}/img.png")
        h.end_headers()

    routes["/go"] = redirect
    checked = []

    def first_hop_only(addr: str) -> bool:
        # Stands for a public first host: accepted once; the redirect's loopback target must be re-checked.
        checked.append(addr)
        return len(checked) == 1

    with pytest.raises(fetch.URLRefusedError, match="not a public"):
        fetch.fetch_url(f"{base}/go", address_ok=first_hop_only)
    assert checked == ["127.0.0.1", "127.0.0.1"] and hits == []


def test_redirects_are_followed_and_bounded(server):
    base, routes = server
    routes["/img.png"] = _send(_png_bytes())

    def hop(n):
        def route(h):
            h.send_response(301)
            h.send_header("Location", f"/r{n - 1}" if n > 1 else "/img.png")
            h.end_headers()
        return route

    for n in range(1, 5):
        routes[f"/r{n}"] = hop(n)
    assert fetch.fetch_url(f"{base}/r3", address_ok=_allow_loopback) == _png_bytes()
    with pytest.raises(fetch.URLRefusedError, match="redirects"):
        fetch.fetch_url(f"{base}/r4", address_ok=_allow_loopback, max_redirects=2)


def test_total_deadline_stops_a_slow_drip(server):
    base, routes = server

    def drip(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        try:
            for _ in range(1000):
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.2)  # every read returns well within any per-read timeout
        except OSError:
            pass

    routes["/drip"] = drip
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="timed out"):
        fetch.fetch_url(f"{base}/drip", address_ok=_allow_loopback, deadline_s=1.5)
    assert time.monotonic() - start < 8.0  # without the total deadline the drip lasts 200 s


def test_slow_headers_hit_the_deadline_too(server):
    base, routes = server

    def slow_headers(h):
        try:
            for ch in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"y" * 100:
                h.wfile.write(bytes([ch]))
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    routes["/slow"] = slow_headers
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="timed out"):
        fetch.fetch_url(f"{base}/slow", address_ok=_allow_loopback, deadline_s=1.0)
    assert time.monotonic() - start < 7.0  # without the total deadline the headers take 11 s


def test_byte_cap(server):
    base, routes = server
    big = os.urandom(5000)
    routes["/big"] = _send(big)

    def chunked_no_length(h):
        h.send_response(200)
        h.end_headers()
        h.wfile.write(big)

    routes["/nolen"] = chunked_no_length
    with pytest.raises(ImageTooLargeError, match="larger than"):
        fetch.fetch_url(f"{base}/big", address_ok=_allow_loopback, max_bytes=4000)
    with pytest.raises(ImageTooLargeError):
        fetch.fetch_url(f"{base}/nolen", address_ok=_allow_loopback, max_bytes=4000)
    assert fetch.fetch_url(f"{base}/big", address_ok=_allow_loopback, max_bytes=5000) == big


def test_http_errors_and_bad_schemes(server):
    base, _ = server
    with pytest.raises(ImageLoadError, match="HTTP 404"):
        fetch.fetch_url(f"{base}/missing", address_ok=_allow_loopback)
    with pytest.raises(fetch.URLRefusedError, match="http"):
        fetch.fetch_url("file:///etc/passwd")
    with pytest.raises(ImageLoadError, match="not a readable image"):
        routes = server[1]
        routes["/text"] = _send(b"hello", "text/plain")
        load_image(f"{base}/text", allow_private_urls=True)


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata endpoint (link-local)
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("240.0.0.1", False),
        ("192.0.2.1", False),  # documentation
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("ff02::1", False),  # multicast, although is_global says True
        ("fec0::1", False),  # site-local
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::808:808", True),
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2001:db8::1", False),
        ("not an address", False),
    ],
)
def test_address_classifier(address, public):
    assert fetch.is_public_address(address) is public


# ---------------------------------------------------------------- files


def test_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list = []

    def work():
        try:
            load_image(fifo)
        except ImageLoadError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # it blocked on the FIFO: release it before failing
        with open(fifo, "wb"):
            pass
        t.join(5)
        pytest.fail("load_image blocked on a FIFO")
    assert outcome and "not a regular file" in outcome[0]


def test_directories_and_missing_files(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "t.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="not a readable image") as info:
        load_image(tmp_path / "t.png", name="the upload")
    assert str(tmp_path) not in str(info.value)  # a neutral name keeps the server path out of messages


def test_huge_image_is_refused_from_its_header(tmp_path):
    # 12000 x 12000 = 144 Mpx, a few hundred KB on disk; decoding it would need 432 MB of RGB.
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000), 0).save(path, optimize=True)
    assert path.stat().st_size < 2_000_000
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLargeError, match="too large"):
        load_image(path)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 100_000  # refused from the header: nothing near 144 MB was allocated
    # The limit is configurable; just under it the same kind of image decodes.
    small = tmp_path / "small.png"
    Image.new("L", (300, 200), 7).save(small)
    with pytest.raises(ImageTooLargeError):
        load_image(small, max_pixels=59_999)
    assert load_image(small, max_pixels=60_000).size == (300, 200)


def test_pillow_bomb_error_becomes_our_error(tmp_path, monkeypatch):
    path = tmp_path / "b.png"
    Image.new("L", (100, 100), 7).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow itself refuses above 2x this
    with pytest.raises(ImageTooLargeError):
        load_image(path, max_pixels=None)


def test_zero_sized_images_are_value_errors():
    with pytest.raises(ValueError, match="zero"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="zero"):
        load_image(Image.new("RGB", (5, 0)))


# ---------------------------------------------------------------- decoding by mode


def _expected_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # Independent reference: linear map of [lo, hi] onto [0, 255], rounded half to even per value.
    out = np.empty(values.shape, dtype=np.uint8)
    for idx, v in np.ndenumerate(values):
        out[idx] = int(np.clip(round((float(v) - lo) / (hi - lo) * 255.0), 0, 255))
    return out


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65536, size=(12, 17), dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(raw).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # what the file decodes to
    got = np.asarray(load_image(path))
    exp = _expected_u8(raw, 0, 65535)
    assert got.shape == (12, 17, 3)
    for c in range(3):
        assert np.array_equal(got[..., c], exp)
    assert 0 < got.mean() < 255  # the old conversion gave all white


def test_big_endian_16bit_and_int32_modes():
    raw = np.array([[0, 1000, 40000], [65535, 12345, 300]], dtype=np.uint16)
    be = Image.frombytes("I;16B", (3, 2), raw.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(be))[..., 1], _expected_u8(raw, 0, 65535))
    as_int = Image.fromarray(raw.astype(np.int32))
    assert as_int.mode == "I"
    assert np.array_equal(np.asarray(to_rgb(as_int))[..., 0], _expected_u8(raw, 0, 65535))
    wide = np.array([[-5, 0], [100000, 7]], dtype=np.int32)  # beyond 16 bits: min-max
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(wide)))[..., 2], _expected_u8(wide, -5, 100000))


def test_float_tiff_is_scaled(tmp_path):
    raw = np.random.default_rng(1).random((9, 11)).astype(np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(raw, mode="F").save(path)
    got = np.asarray(load_image(path))
    assert np.array_equal(got[..., 0], _expected_u8(raw, 0.0, 1.0))
    assert got.mean() > 50  # the old conversion gave all black
    hdr = (raw * 1000 - 200).astype(np.float32)  # outside [0, 1]: min-max
    got = np.asarray(to_rgb(Image.fromarray(hdr, mode="F")))
    assert np.array_equal(got[..., 0], _expected_u8(hdr, float(hdr.min()), float(hdr.max())))
    bad = raw.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ImageLoadError, match="NaN"):
        to_rgb(Image.fromarray(bad, mode="F"))


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # A 40x20 image whose left half is red, stored with EXIF orientation 6 ("rotate 90 CW to view").
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    im.save(path, exif=exif, quality=95)
    got = np.asarray(load_image(path)).astype(int)
    # Viewed upright (rotated 90 degrees clockwise) it is 20 wide, 40 tall, red on top.
    expected = np.rot90(stored, k=-1).astype(int)
    assert got.shape == (40, 20, 3)
    assert np.abs(got - expected).mean() < 8
    assert got[5, 10, 0] > 200 and got[35, 10, 2] > 200


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "L", "1"])
def test_other_modes_become_rgb(mode):
    base = Image.new("RGB", (8, 6), (40, 120, 200))
    im = base.convert(mode)
    out = load_image(im)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_alpha_is_composited_over_white():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[..., :3] = (200, 0, 0)
    arr[0, 0, 3] = 255
    arr[0, 1, 3] = 0
    arr[1, :, 3] = 128
    out = np.asarray(load_image(Image.fromarray(arr, "RGBA"))).astype(int)
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    a = 128 / 255
    assert np.allclose(out[1, 0], [a * 200 + (1 - a) * 255, (1 - a) * 255, (1 - a) * 255], atol=1)

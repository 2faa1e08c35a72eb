"""The demo app attacked through its HTTP API, as raw requests to a running server (not through the page).

Two servers run for the whole module, both with ``LEGRAD_ALLOW_PRIVATE_URLS=1`` in their environment
(which must not matter) and Gradio's upload folder in a private temporary folder:

* ``python app.py`` with the default flags;
* ``python -m legrad app --allow-urls --allow-downloads --time-limit 0.2 --device cpu`` (the subcommand, URLs
  and downloadable models allowed, a tiny time limit).

Requests go to Gradio's ``/gradio_api/call/explain`` endpoint (POST the inputs, then read the event stream),
uploads to ``/gradio_api/upload``, exactly as any HTTP client could send them.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env
from PIL import Image

pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[app]')")

TOY = "toy: bundled demo model (offline)"
UPLOAD_ONLY = "**Error:** the image field takes only images uploaded to this page (or its examples); upload the image"
STARTUP_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running app: its process, base URL and log."""

    def __init__(self, cmd: list[str], workdir: Path, name: str):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}/gradio_api"
        self.upload_dir = workdir / f"gradio-{name}"
        self.upload_dir.mkdir()
        env = subprocess_env()
        env.update(LEGRAD_ALLOW_PRIVATE_URLS="1", GRADIO_TEMP_DIR=str(self.upload_dir))
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait(self) -> None:
        end = time.monotonic() + STARTUP_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited: {self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.base}/info", timeout=5).read()
                return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"the app did not start in {STARTUP_S} s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def peak_rss(self) -> int:
        """The server's peak resident memory so far (bytes)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def upload(self, data: bytes, name: str = "image.png") -> str:
        """Uploads a file the way the page does; returns the server-side path Gradio gives back."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{self.base}/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)[0]

    def model_choices(self) -> list[str]:
        """The model dropdown's choices, from the page config the server sends every browser."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/config", timeout=60) as resp:
            config = json.load(resp)
        (dropdown,) = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "model"]
        return [c[1] if isinstance(c, list) else c for c in dropdown["props"]["choices"]]

    def explain(self, image, source: str = "", prompts: str = "a red circle", size: str = "",
                model: str = TOY) -> tuple[str, object]:
        """One raw API call of the Explain button: ``(event, data)`` of its final server-sent event."""
        body = json.dumps({"data": [image, source, prompts, model, size, None, 0.6, "legrad"]}).encode()
        req = urllib.request.Request(f"{self.base}/call/explain", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                event_id = json.load(resp)["event_id"]
        except urllib.error.HTTPError as exc:  # refused before queueing (e.g. a malformed value)
            return "http-error", exc.code
        with urllib.request.urlopen(f"{self.base}/call/explain/{event_id}", timeout=600) as resp:
            text = resp.read().decode()
        event = data = None
        for line in text.splitlines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
        return event, data


def test_gradio_downloads_no_url_given_as_the_image_value(monkeypatch):
    """With Gradio's ``meta`` marker, a URL path is downloaded by Gradio itself before any app code runs
    (Gradio refuses private addresses, not public ones); the app's image field switches that off."""
    import asyncio

    import gradio as gr
    from gradio import processing_utils

    from legrad.app.page import build_demo
    from legrad.app.requests import DemoApp

    downloads = []

    async def fake_download(url, *args, **kwargs):
        downloads.append(url)
        raise OSError("no network in this test")

    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", fake_download)
    monkeypatch.setattr(processing_utils, "save_url_to_cache", lambda url, *a, **k: downloads.append(url))
    url = "https://images.example.com/cat.png"
    value = {"path": url, "meta": {"_type": "gradio.FileData"}}
    # The control: a plain Gradio image component downloads it.
    with pytest.raises(OSError):
        asyncio.run(processing_utils.async_move_files_to_cache(value, gr.Image(), check_in_upload_folder=True))
    assert downloads == [url]
    downloads.clear()
    demo = build_demo(DemoApp())
    image = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "image")
    for upper in (url, url.upper()):
        with pytest.raises(gr.Error):
            asyncio.run(processing_utils.async_move_files_to_cache({**value, "path": upper}, image,
                                                                   check_in_upload_folder=True))
        with pytest.raises(gr.Error):
            image.move_resource_to_block_cache(upper)
    assert downloads == []


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    work = tmp_path_factory.mktemp("app_api")
    default = Server([PYTHON, "app.py"], work, "default")
    opted = Server([PYTHON, "-m", "legrad", "app", "--allow-urls", "--allow-downloads", "--time-limit", "0.2",
                    "--device", "cpu"],
                   work, "opted")
    try:
        default.wait()
        opted.wait()
        yield default, opted
    finally:
        default.stop()
        opted.stop()


def _png(size=(64, 64), color=(220, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _file(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


@pytest.mark.subprocess
def test_uploads_are_explained(servers):
    default, _ = servers
    path = default.upload(_png())
    for value in (_file(path), {"path": path}):  # with and without Gradio's meta marker
        event, data = default.explain(value)
        assert event == "complete", data
        gallery, status = data
        assert len(gallery) == 1 and "best match" in status, status


@pytest.fixture()
def secrets(tmp_path):
    """Files a visitor must never see: an image outside Gradio's folders, a FIFO, a folder, a missing file."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(color=(1, 2, 3)))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    return {"png": secret, "fifo": fifo, "dir": tmp_path, "missing": tmp_path / "missing.png",
            "passwd": Path("/etc/passwd")}


@pytest.mark.subprocess
def test_server_files_are_never_read_through_the_image_field(servers, secrets):
    default, _ = servers
    # A link inside Gradio's upload folder pointing out of it, and a `..` escape from it.
    link = default.upload_dir / "link.png"
    link.symlink_to(secrets["png"])
    escape = f"{default.upload_dir}/{os.path.relpath(secrets['png'], default.upload_dir)}"
    assert ".." in escape
    assert os.path.realpath(escape) == str(secrets["png"])
    statuses, errors = set(), set()
    for target in [*secrets.values(), link, escape]:
        for value in ({"path": str(target)}, _file(target), {"path": str(target), "url": "x"},
                      str(target), [{"path": str(target)}], {"path": str(target), "is_stream": True}):
            start = time.monotonic()
            event, data = default.explain(value)
            assert time.monotonic() - start < 60  # the FIFO is never opened (it would block)
            if event == "complete":
                gallery, status = data
                assert gallery == [], (value, status)
                statuses.add(status)
            else:  # Gradio's own refusal of a malformed value: no detail either
                errors.add(json.dumps(data))
    # One message for every path, existing or not, file or not: nothing is revealed about it.
    assert statuses == {UPLOAD_ONLY}, statuses
    assert errors <= {json.dumps({"error": None}), json.dumps(400), json.dumps(422)}, errors
    # Gradio's file route does not serve them either.
    for target in (secrets["png"], secrets["passwd"]):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{default.base}/file={target}", timeout=30).read()


@pytest.fixture()
def loopback_png():
    """An HTTP server on 127.0.0.1 serving a PNG; yields ``(url, hits)`` with the requests it got."""
    hits = []
    body = _png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/scene.png", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.subprocess
def test_no_loopback_fetch_whatever_the_flags_and_environment(servers, loopback_png):
    url, hits = loopback_png
    port = url.split(":")[2].split("/")[0]
    urls = [url, f"http://localhost:{port}/scene.png", f"http://[::ffff:127.0.0.1]:{port}/scene.png"]
    for server in servers:
        for u in urls:
            for value in ({"path": u}, _file(u), {"path": None, "url": u}, {"path": u, "url": u}):
                event, data = server.explain(value)
                assert event != "complete" or data[0] == [], data
        for u in urls:  # the URL box: refused by default; with --allow-urls, loopback still refused
            event, data = server.explain(None, source=u)
            assert event == "complete" and data[0] == [], data
    urllib.request.urlopen(url, timeout=10).read()  # the test server does answer...
    assert hits == ["/scene.png"]  # ...but only to this test, never to the apps


@pytest.mark.subprocess
def test_degenerate_image_is_refused_fast_and_small(servers):
    default, _ = servers
    for size in ((300_000, 1), (1, 300_000)):
        buf = io.BytesIO()
        Image.new("RGB", size, (255, 255, 255)).save(buf, "PNG", optimize=True)
        assert len(buf.getvalue()) < 4096
        path = default.upload(buf.getvalue())
        before = default.peak_rss()
        start = time.monotonic()
        event, data = default.explain(_file(path))
        elapsed = time.monotonic() - start
        assert event == "complete" and data[0] == [], data
        assert f"{size[0]}x{size[1]}" in data[1] and "elongated" in data[1] and "crop" in data[1], data[1]
        assert elapsed < 30, elapsed
        assert default.peak_rss() - before < 2**30


@pytest.mark.subprocess
def test_time_limit_stops_a_maximal_request_with_an_honest_message(servers):
    _, limited = servers
    path = limited.upload(_png((512, 512)))
    prompts = "\n".join(f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square",
                                                                                           "triangle", "star"))
    start = time.monotonic()
    event, data = limited.explain(_file(path), prompts=prompts, size="1024")
    elapsed = time.monotonic() - start
    assert event == "complete" and data[0] == [], data
    assert data[1].startswith("**Stopped:**") and "time limit of 0.2 s" in data[1], data[1]
    # Stopped between units of work, long before the minutes such a request takes on a CPU.
    assert elapsed < 60, elapsed


@pytest.mark.subprocess
def test_downloadable_models_are_offered_only_with_allow_downloads(servers):
    default, opted = servers
    downloadable = "ViT-B-32 · laion2b_s34b_b79k"
    assert default.model_choices() == [TOY]
    assert downloadable in opted.model_choices() and opted.model_choices()[0] == TOY
    # Named anyway through the API: refused (by Gradio's own choice check or the app's), nothing loaded.
    path = default.upload(_png())
    event, data = default.explain(_file(path), model=downloadable)
    assert event != "complete" or (data[0] == [] and "unknown model choice" in data[1]), data
    log = default.log_path.read_text(errors="replace")
    # No download was tried (open_clip's Hub client logs its address and retries when one fails).
    assert "huggingface.co" not in log and "Retrying" not in log and "Could not load" not in log, log[-3000:]

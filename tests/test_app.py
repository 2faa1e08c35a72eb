"""Tests of app.py: the prediction function directly, and the page in a real headless browser."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from helpers.frontend_utils import (
    PYTHON,
    REPO,
    bundled_scenes,
    subprocess_env,
)
from PIL import Image

from legrad.frontend.scenes import absent_phrase

pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[app]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def app():
    sys.path.insert(0, str(REPO))
    try:
        import app as module
    finally:
        sys.path.remove(str(REPO))
    return module


@pytest.fixture(scope="module")
def scenes():
    return bundled_scenes()


def _cosines(explainer, image, prompts):
    # Independent recomputation of CLIP similarities with the plain model.
    model = explainer.wrapper.model
    with torch.no_grad():
        img = model.encode_image(explainer.preprocess(image).unsqueeze(0))
        txt = model.encode_text(explainer.tokenizer(prompts))
    return ((img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T)[0]


def test_predict_gives_one_captioned_overlay_per_prompt(app, scenes):
    path, phrases = scenes[0]
    image = Image.open(path).convert("RGB")
    prompts = [phrases[0], absent_phrase(phrases)]
    gallery, status = app.predict(image, "", "\n".join(prompts), app.TOY_LABEL, "", None, 0.6)
    assert len(gallery) == 2, status
    cos = _cosines(app.get_explainer("toy", None), image, prompts)
    for (overlay_img, caption), prompt, c in zip(gallery, prompts, cos):
        assert isinstance(overlay_img, Image.Image) and overlay_img.size == image.size
        assert caption.startswith(f"{prompt}: similarity {float(c):.3f}")
    assert "64x64" in status  # the demo model's native size


def test_predict_matches_the_library_overlay(app, scenes, monkeypatch):
    from legrad.viz import overlay

    path, phrases = scenes[1]
    monkeypatch.setattr(app.SETTINGS, "allowed_dirs", (os.path.realpath(path.parent),))
    image = Image.open(path).convert("RGB")
    gallery, _ = app.predict(None, str(path), phrases[0], app.TOY_LABEL, "128", 1, 0.3)
    explainer = app.get_explainer("toy", None)
    maps = explainer.explain(image, [phrases[0]], size=(128, 128), layer_index=1).maps
    expected = overlay(image, maps[0, 0], alpha=0.3)
    assert np.array_equal(np.asarray(gallery[0][0]), np.asarray(expected))


def test_prompt_splitting(app):
    assert app.split_prompts("a cat, a dog") == ["a cat", "a dog"]
    assert app.split_prompts("a cat, sitting\n a dog \n\n") == ["a cat, sitting", "a dog"]
    assert app.split_prompts("  ") == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts_text=""), "at least one prompt"),
        (dict(image=None), "upload an image"),
        (dict(image=None, image_source="/no/such/image.png"), "reads no paths or URLs"),
        (dict(image=None, image_source="http://example.com/a.png"), "does not fetch URLs"),
        (dict(prompts_text="x" * 300), "at most 200 characters"),
        (dict(prompts_text="a, " * 5000), "too long"),
        (dict(size_text="9" * 5000), "invalid image size"),
        (dict(model_label="ViT-B-16 · /etc/passwd"), "unknown model choice"),
        (dict(size_text="65"), "patch size"),
        (dict(size_text="big"), "invalid image size"),
        (dict(layer_index=50), "out of range"),
        (dict(alpha=2.0), "opacity"),
    ],
)
def test_bad_input_shows_a_message(app, scenes, kwargs, message):
    args = dict(image=Image.open(scenes[0][0]), image_source="", prompts_text="a red circle",
                model_label=app.TOY_LABEL, size_text="", layer_index=None, alpha=0.6)
    args.update(kwargs)
    gallery, status = app.predict(**args)
    assert gallery == []
    assert status.startswith("**Error:**") and message in status


def test_unloadable_model_shows_a_message(app, scenes, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    label = "ViT-B-32 · laion2b_s34b_b79k"
    assert label not in app.model_labels()  # downloadable models are listed only with --allow-downloads
    downloads = app.DemoApp(app.AppSettings(allow_downloads=True))
    assert label in downloads.model_labels()
    gallery, status = downloads.predict(Image.open(scenes[0][0]), "", "a cat", label, "", None, 0.6)
    assert gallery == []
    assert status.startswith(f"**Could not load the model {label}:**") and "Traceback" not in status


def test_models_are_cached_and_loaded_once(app, monkeypatch):
    from legrad.frontend.explainer import Explainer

    assert app.get_explainer("toy", None) is app.get_explainer("toy", None)
    # Several users asking at once for a model not loaded yet: one load, one shared object. (The loader
    # is replaced by a slow stand-in; the cache and its locking are what is under test.)
    calls = []
    sentinel = object()

    def slow_load(cls, name, pretrained, device, layer_index=None):
        calls.append((name, pretrained))
        time.sleep(0.3)
        return sentinel

    monkeypatch.setattr(Explainer, "load", classmethod(slow_load))
    key = ("ViT-test-only", "tag")
    results = []
    threads = [threading.Thread(target=lambda: results.append(app.get_explainer(*key))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert results == [sentinel] * 4
        assert calls == [key]
    finally:
        app.forget_model(*key)


def test_concurrent_predictions_are_correct(app, scenes):
    image = Image.open(scenes[0][0]).convert("RGB")
    prompt_sets = [["a red circle"], ["a blue square", "a green cross"], ["a pink star"], ["a yellow triangle"]]
    serial = [app.predict(image, "", ", ".join(p), app.TOY_LABEL, "", None, 0.6)[0] for p in prompt_sets]
    parallel: list = [None] * len(prompt_sets)

    def work(i):
        parallel[i] = app.predict(image, "", ", ".join(prompt_sets[i]), app.TOY_LABEL, "", None, 0.6)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompt_sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s, p in zip(serial, parallel):
        assert [c for _, c in s] == [c for _, c in p]
        for (a, _), (b, _) in zip(s, p):
            assert np.array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- what a visitor can make the server do


def _ask(app, scenes, **kwargs):
    args = dict(image=None, image_source="", prompts_text="a red circle", model_label=app.TOY_LABEL,
                size_text="", layer_index=None, alpha=0.6)
    args.update(kwargs)
    return app.predict(**args)


@pytest.mark.parametrize("source", ["/etc/passwd", "/etc/shadow", "/etc", "/no/such/file.png", "../../etc/hosts",
                                    "assets/scene0.png"])
def test_server_paths_are_never_read_by_default(app, scenes, source):
    gallery, status = _ask(app, scenes, image_source=source)
    assert gallery == []
    # One message for every path: nothing tells whether it exists or what it is.
    assert status == f"**Error:** {app.NO_SOURCE_MSG}"


def test_allow_dir_reads_inside_only(app, scenes, monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path, phrases = scenes[0]
    (shared / "scene.png").write_bytes(path.read_bytes())
    (tmp_path / "secret.png").write_bytes(path.read_bytes())
    (shared / "escape.png").symlink_to(tmp_path / "secret.png")
    (shared / "inner").symlink_to(tmp_path)
    monkeypatch.setattr(app.SETTINGS, "allowed_dirs", (app.shared_folder(str(shared)),))
    for source in ("scene.png", str(shared / "scene.png")):
        gallery, status = _ask(app, scenes, image_source=source, prompts_text=phrases[0])
        assert len(gallery) == 1, status
    refused = ["escape.png", "inner/secret.png", "../secret.png", str(tmp_path / "secret.png"), "/etc/passwd",
               "/etc", "/no/such.png", str(shared) + "/../secret.png"]
    for source in refused:
        gallery, status = _ask(app, scenes, image_source=source)
        assert gallery == [] and status == f"**Error:** {app.NO_PATH_MSG}", source
    # Inside the folder, errors name only what the visitor typed.
    (shared / "notes.png").write_text("not an image")
    _, status = _ask(app, scenes, image_source="notes.png")
    assert "not a readable image" in status and str(shared) not in status


def test_urls_refused_by_default_and_loopback_refused_when_allowed(app, scenes, monkeypatch):
    import http.server

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path != "/scene.png":
                self.send_error(404)
                return
            body = scenes[0][0].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/scene.png"
        _, status = _ask(app, scenes, image_source=url)
        assert app.NO_URL_MSG in status
        monkeypatch.setattr(app.SETTINGS, "allow_urls", True)
        for u in (url, url.replace("127.0.0.1", "localhost"), url.replace("127.0.0.1", "[::ffff:127.0.0.1]")):
            gallery, status = _ask(app, scenes, image_source=u)
            assert gallery == [] and "not a public internet address" in status, status
        assert hits == []
        # With the address check standing in for a public host, a closed port, an HTTP error and a
        # non-image all give one message: the app cannot be used to scan ports.
        monkeypatch.setattr("legrad.io.fetch.is_public_address", lambda a: a == "127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        statuses = {_ask(app, scenes, image_source=u)[1] for u in (
            f"http://127.0.0.1:{closed}/x.png", url.replace("/scene.png", "/missing"))}
        assert statuses == {f"**Error:** {app.URL_FAILED_MSG}"}
        gallery, status = _ask(app, scenes, image_source=url, prompts_text=scenes[0][1][0])
        assert len(gallery) == 1, status  # the same URL is served once its address passes the check
    finally:
        srv.shutdown()
        srv.server_close()


def test_huge_size_is_refused_at_once_and_the_next_request_works(app, scenes):
    image = Image.open(scenes[0][0]).convert("RGB")
    explainer = app.get_explainer("toy", None)
    start = time.monotonic()
    gallery, status = app.predict(image, "", "a red circle", app.TOY_LABEL, "4096", None, 0.6)
    assert gallery == [] and "patch tokens" in status and "1024x1024" in status
    assert time.monotonic() - start < 10.0  # milliseconds in practice; the work it refuses took 545 s
    gallery, status = app.predict(image, "", "a red circle", app.TOY_LABEL, "", None, 0.6)
    assert len(gallery) == 1 and "64x64" in status
    assert explainer.max_tokens == 128 * 128


def test_explainer_token_limit(app):
    from legrad.frontend.explainer import MAX_TOKENS, Explainer

    base = app.get_explainer("toy", None)
    assert base.patch_size == (8, 8) and base.max_tokens == MAX_TOKENS
    assert base.check_size((1024, 1024)) == (1024, 1024)  # the demo model stays usable at 1024 px
    with pytest.raises(ValueError, match="patch tokens"):
        base.check_size((1032, 1024))
    small = Explainer(base.wrapper, base.preprocess, base.tokenizer, max_tokens=8 * 9)
    assert small.check_size((64, 72)) == (64, 72)  # 8 x 9 = 72 tokens: at the limit
    with pytest.raises(ValueError, match="73|80"):
        small.check_size((64, 80))
    unlimited = Explainer(base.wrapper, base.preprocess, base.tokenizer, max_tokens=None)
    assert unlimited.check_size((8000, 8000)) == (8000, 8000)  # a check only: no work is done
    with pytest.raises(TypeError):
        base.check_size(("64", 64))
    with pytest.raises(ValueError):
        base.check_size((0, 64))
    with pytest.raises(ValueError, match="max_tokens"):
        Explainer(base.wrapper, base.preprocess, base.tokenizer, max_tokens=0)


def test_uploads_are_read_with_limits_and_never_named(app, scenes, tmp_path, monkeypatch):
    # Gradio hands predict the path of its cached upload (inside its upload folder).
    upload_dir = tmp_path / "gradio" / "0123abcd"
    upload_dir.mkdir(parents=True)
    monkeypatch.setattr(app.SETTINGS, "upload_dirs", (os.path.realpath(tmp_path / "gradio"),))
    bad = upload_dir / "photo.png"
    bad.write_bytes(b"\x89PNG but not really")
    _, status = _ask(app, scenes, image=str(bad))
    assert status.startswith("**Error:** the uploaded image: not a readable image")
    assert str(tmp_path) not in status and "0123abcd" not in status
    huge = upload_dir / "huge.png"
    Image.new("1", (12000, 12000), 1).save(huge, optimize=True)
    _, status = _ask(app, scenes, image=str(huge))
    assert "too large" in status and str(tmp_path) not in status
    # A phone photo stored sideways (EXIF orientation 6) is explained upright: the overlay is portrait.
    im = Image.open(scenes[0][0]).convert("RGB").resize((96, 64))
    exif = im.getexif()
    exif[0x0112] = 6
    phone = upload_dir / "phone.jpg"
    im.save(phone, exif=exif)
    gallery, status = _ask(app, scenes, image=str(phone))
    assert len(gallery) == 1, status
    assert gallery[0][0].size == (64, 96)


def test_overlays_are_drawn_at_a_bounded_size(app, scenes):
    from legrad.viz import DISPLAY_MAX_SIDE

    big = Image.open(scenes[0][0]).convert("RGB").resize((3000, 1500), Image.Resampling.NEAREST)
    gallery, status = _ask(app, scenes, image=big)
    assert len(gallery) == 1, status
    assert gallery[0][0].size == (DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE // 2)


def test_upload_preprocess_hands_over_the_path_without_decoding(app, scenes, tmp_path, monkeypatch):
    from gradio.data_classes import FileData

    monkeypatch.setattr(app.SETTINGS, "upload_dirs", (os.path.realpath(tmp_path),))
    path = tmp_path / "x.png"
    path.write_bytes(b"not an image at all")  # Gradio's own preprocess would fail with a generic error
    assert app.upload_path(FileData(path=str(path)), app.SETTINGS) == os.path.realpath(path)
    assert app.upload_path(None, app.SETTINGS) is None
    # Anything that is not a file in the upload folder is handed over as a refusal, never as a path.
    for value in (FileData(path="", url="data:image/png;base64,AAAA"), FileData(path="/etc/passwd"),
                  {"path": "http://127.0.0.1:1/x.png"}, FileData(path=str(tmp_path / ".." / "x.png"))):
        refused = app.upload_path(value, app.SETTINGS)
        assert not isinstance(refused, str)
        _, status = _ask(app, scenes, image=refused)
        assert status == f"**Error:** {app.UPLOAD_ONLY_MSG}"


def test_main_rejects_bad_flags(app, tmp_path):
    assert app.main(["--allow-dir", str(tmp_path / "missing")]) == 2
    assert app.main(["--max-upload-mb", "0"]) == 2


# ---------------------------------------------------------------- end to end in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app did not answer at {url} within {timeout}s")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright not installed (pip install playwright)")
@pytest.mark.browser
def test_browser_end_to_end(tmp_path, scenes):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [PYTHON, "app.py", "--port", str(port), "--device", "cpu"]
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_http(url, proc, timeout=180)
        path, phrases = scenes[0]
        prompts = [phrases[0], absent_phrase(phrases)]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                      "--disable-background-networking", "--disable-component-update"],
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(url, wait_until="domcontentloaded")
                page.set_input_files("#image input[type=file]", str(path))
                page.wait_for_selector("#image img", timeout=30_000)  # upload finished, preview shown
                page.locator("#prompts textarea").fill("\n".join(prompts))
                page.locator("#explain").click()
                page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2", timeout=120_000)
                page.screenshot(path=str(tmp_path / "app_result.png"), full_page=True)
                assert page.locator("#gallery img").count() == 2
                text = page.locator("#gallery").inner_text()
                for prompt in prompts:
                    assert f"{prompt}: similarity" in text
                assert "best match" in page.locator("#status").inner_text()
                # Captions sit under the overlays, not over their corners.
                page.wait_for_function(
                    "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)")
                for item in page.locator("#gallery .thumbnail-item").all():
                    img = item.locator("img").bounding_box()
                    cap = item.locator(".caption-label").bounding_box()
                    assert cap["y"] >= img["y"] + img["height"] - 1, (img, cap)
                # Every example's prompt list is shown in full (Gradio cuts longer texts with "...").
                cells = page.locator("td.textbox").all_inner_texts()
                assert cells and not any(c.strip().endswith("...") for c in cells), cells
                # A bundled example is explained too (the image field reads only uploads and examples).
                page.locator("tbody tr").first.click()
                # The upload's prompts are one per line; the example's are comma-separated.
                page.wait_for_function("document.querySelector('#prompts textarea').value.includes(',')")
                n = len(page.locator("#prompts textarea").input_value().split(","))
                assert n > len(prompts)  # its overlays cannot be mistaken for the upload's
                page.locator("#explain").click()
                page.wait_for_function(f"document.querySelectorAll('#gallery img').length == {n}", timeout=120_000)
                assert "best match" in page.locator("#status").inner_text()
                # No server path / URL box unless the operator allows one.
                assert page.locator("#image-source").count() == 0 or not page.locator("#image-source").is_visible()
            finally:
                browser.close()
        assert (tmp_path / "app_result.png").stat().st_size > 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)
        log.close()

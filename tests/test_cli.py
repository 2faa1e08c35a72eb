"""Tests of the ``legrad`` command line: subprocess runs on the demo model, file outputs, exit codes."""

from __future__ import annotations

import csv
import shutil
import subprocess

import numpy as np
import pytest
import torch
from frontend_utils import PYTHON, REPO, bundled_scenes, copy_scenes, subprocess_env
from oracles import openclip_vit_oracle
from PIL import Image

from legrad.commands.explain import discover, slugify


def _legrad(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "legrad", *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=REPO)


PROMPTS = ["a red circle", "A blue square?"]
SLUGS = ["a-red-circle", "a-blue-square"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bundled = bundled_scenes()
    scenes = copy_scenes(root / "images", bundled[:3])
    # A nested folder with a file of the same name: outputs must not collide.
    nested = root / "images" / "more" / scenes[0][0].name
    nested.parent.mkdir()
    shutil.copy(bundled[3][0], nested)
    return root, [*scenes, (nested, bundled[3][1])]


@pytest.fixture(scope="module")
def batch_run(workspace):
    """One real `python -m legrad explain` run over a folder with a broken file, plus a missing file."""
    root, scenes = workspace
    (root / "images" / "broken.png").write_bytes(b"this is not a png")
    out = root / "out"
    res = _legrad("explain", str(root / "images"), str(root / "missing.jpg"), "-p", PROMPTS[0], "-p", PROMPTS[1],
                  "--out", str(out), "--save-maps", "--batch-size", "2")
    (root / "images" / "broken.png").unlink()
    return res, out


def test_explain_batch_reports_and_skips_bad_inputs(workspace, batch_run):
    root, scenes = workspace
    res, out = batch_run
    # Failures are reported, the rest is processed, and the exit status says something failed.
    assert res.returncode == 1, res.stderr
    assert "missing.jpg" in res.stderr and "broken.png" in res.stderr
    assert "Traceback" not in res.stderr
    assert f"{len(scenes)} of {len(scenes) + 2} images explained" in res.stdout


def test_explain_writes_overlays_maps_and_scores(workspace, batch_run):
    root, scenes = workspace
    res, out = batch_run
    for path, _ in scenes:
        rel = path.relative_to(root / "images").with_suffix("")
        for slug in SLUGS:
            png = out / rel.parent / f"{slugify(rel.name)}__{slug}.png"
            with Image.open(png) as im, Image.open(path) as src:
                assert im.format == "PNG" and im.size == src.size  # overlays at the image's own resolution
            m = np.load(png.with_suffix(".npy"))
            assert m.shape == (64, 64) and m.dtype == np.float32  # maps at the explained (native) size
            assert m.min() >= 0 and m.max() <= 1 and m.max() == pytest.approx(1.0)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(scenes)
    assert {r["prompt"] for r in rows} == set(PROMPTS)
    for r in rows:
        assert -1.0 <= float(r["similarity"]) <= 1.0


def test_saved_maps_match_the_oracle(workspace, batch_run):
    # The raw maps written by the CLI equal an explicit-autograd LeGrad of the same model on the same input.
    root, scenes = workspace
    _, out = batch_run
    from legrad.loading import default_layer_index, load_model
    from legrad.preprocess import LePreprocess

    model, preprocess, tokenizer = load_model("toy", None, "cpu")
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    path = scenes[1][0]
    image = LePreprocess(preprocess, 64)(Image.open(path).convert("RGB")).unsqueeze(0)
    expected = openclip_vit_oracle(model, image, text, default_layer_index("toy"))[0].numpy()
    for p, slug in enumerate(SLUGS):
        saved = np.load(out / f"{slugify(path.stem)}__{slug}.npy")
        np.testing.assert_allclose(saved, expected[p], atol=2e-4)


def test_models_lists_bundled_and_openclip_pairs(capsys):
    from legrad.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "toy"
    assert any(ln.split()[:2] == ["ViT-B-16", "laion2b_s34b_b88k"] for ln in lines)


def test_usage_and_model_errors_are_one_line(workspace, capsys):
    from legrad.cli import main

    root, scenes = workspace
    img = str(scenes[0][0])
    assert main(["explain", img, "-p", "x", "--size", "60", "--out", str(root / "e")]) == 2
    err = capsys.readouterr().err
    assert "multiple of the model's patch size" in err and "use e.g. 64" in err

    assert main(["explain", img, "-p", "x", "--model", "ViT-Nope-16", "--out", str(root / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'ViT-Nope-16'" in err[0]

    assert main(["explain", img, "-p", "x", "--layer-index", "99", "--out", str(root / "e")]) == 2
    assert "layer_index=99 is out of range" in capsys.readouterr().err

    assert main(["explain", img, "-p", "  ", "--out", str(root / "e")]) == 2
    assert "non-empty prompt" in capsys.readouterr().err

    assert main(["explain", img]) == 2  # argparse: -p is required
    assert main([]) == 2
    assert not (root / "e").exists()


def test_download_failure_is_one_clear_line(workspace, capsys, monkeypatch):
    from legrad.cli import main

    root, scenes = workspace
    # Offline hub: the download fails at once (this machine may or may not have internet).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root / "empty-hf-cache"))
    code = main(["explain", str(scenes[0][0]), "-p", "a cat", "--model", "ViT-B-32", "--pretrained",
                 "laion2b_s34b_b79k", "--out", str(root / "dl")])
    assert code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("legrad explain: error:") and "laion2b_s34b_b79k" in err[0]


def test_slugs_are_filesystem_safe_and_unique(tmp_path):
    assert slugify("A photo of a cat!") == "a-photo-of-a-cat"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("???") == ""
    assert set(slugify("é/ü: x*y|z<>")) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / d / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    items, problems = discover([str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), str(tmp_path / "a"),
                                str(tmp_path / "nothing-here")])
    assert [i.key for i in items] == ["x", "x-2", "x-3"]
    assert len(problems) == 1 and "nothing-here" in problems[0]


def test_help_lists_the_commands(capsys):
    from legrad.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "explain" in out and "models" in out


def test_unreachable_weights_host_fails_fast(tmp_path, monkeypatch):
    # No proxy, no offline flag, empty cache, a host that cannot resolve: ModelLoadError at once
    # instead of the Hub client's minute of retries.
    from legrad.loading import ModelLoadError, load_model

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.unreachable.invalid")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model("ViT-B-32", "laion2b_s34b_b79k", "cpu")


def test_interrupted_run_leaves_only_complete_files(workspace, tmp_path):
    import signal
    import time

    root, scenes = workspace
    src = tmp_path / "many"
    src.mkdir()
    for i in range(40):
        shutil.copy(scenes[i % len(scenes)][0], src / f"img{i:02d}.png")
    out = tmp_path / "out"
    proc = subprocess.Popen([PYTHON, "-m", "legrad", "explain", str(src), "-p", PROMPTS[0], "--out", str(out),
                             "--batch-size", "1", "--save-maps"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    pngs = list(out.glob("*.png"))
    assert 0 < len(pngs) < 40
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for png in pngs:
        with Image.open(png) as im:
            im.load()  # fully decodable: no truncated file under a final name
        assert np.load(png.with_suffix(".npy")).shape == (64, 64) or not png.with_suffix(".npy").exists()

"""Tests of the ``legrad`` command line: subprocess runs on the demo model, file outputs, exit codes."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.frontend_utils import (
    PYTHON,
    REPO,
    bundled_scenes,
    copy_scenes,
    signal_after_first_output,
    subprocess_env,
)
from helpers.oracles import openclip_vit_oracle
from PIL import Image

from legrad.cli.explain import discover, prompt_name, short_hash, slugify


def _legrad(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "legrad", *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=REPO)


PROMPTS = ["a red circle", "A blue square?"]
SLUGS = [prompt_name(p) for p in PROMPTS]  # slug and prompt hash: "a-red-circle-1d332dc4"


def _key(path, stem=None) -> str:
    """Output stem of an image file: its slug and the hash of its real path."""
    import os

    return f"{slugify(stem or Path(path).stem)}-{short_hash(os.path.realpath(path))}"


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


@pytest.mark.subprocess
def test_explain_batch_reports_and_skips_bad_inputs(workspace, batch_run):
    root, scenes = workspace
    res, out = batch_run
    # Failures are reported, the rest is processed, and the exit status says something failed.
    assert res.returncode == 1, res.stderr
    assert "missing.jpg" in res.stderr and "broken.png" in res.stderr
    assert "Traceback" not in res.stderr
    assert f"{len(scenes)} of {len(scenes) + 2} images explained" in res.stdout


@pytest.mark.subprocess
def test_explain_writes_overlays_maps_and_scores(workspace, batch_run):
    root, scenes = workspace
    res, out = batch_run
    for path, _ in scenes:
        rel = path.relative_to(root / "images").with_suffix("")
        for slug in SLUGS:
            png = out / rel.parent / f"{_key(path)}__{slug}.png"
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


@pytest.mark.subprocess
def test_saved_maps_match_the_oracle(workspace, batch_run):
    # The raw maps written by the CLI equal an explicit-autograd LeGrad of the same model on the same input.
    root, scenes = workspace
    _, out = batch_run
    from legrad.frontend.models import default_layer_index, load_model
    from legrad.preprocess import LePreprocess

    model, preprocess, tokenizer = load_model("toy", None, "cpu")
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    path = scenes[1][0]
    image = LePreprocess(preprocess, 64)(Image.open(path).convert("RGB")).unsqueeze(0)
    expected = openclip_vit_oracle(model, image, text, default_layer_index("toy"))[0].numpy()
    for p, slug in enumerate(SLUGS):
        saved = np.load(out / f"{_key(path)}__{slug}.npy")
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
    # Keys hash the real path: two x.png get two names, the same file given twice is explained once.
    assert [i.key for i in items] == [_key(tmp_path / "a" / "x.png"), _key(tmp_path / "b" / "x.png")]
    assert items[0].key != items[1].key and items[0].key.startswith("x-")
    assert len(problems) == 1 and "nothing-here" in problems[0]


def test_help_lists_the_commands(capsys):
    from legrad.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "explain" in out and "models" in out


def test_unreachable_weights_host_fails_fast(tmp_path, monkeypatch):
    # No proxy, no offline flag, empty cache, a host that cannot resolve: ModelLoadError at once
    # instead of the Hub client's minute of retries.
    from legrad.frontend.models import load_model
    from legrad.io.errors import ModelLoadError

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.unreachable.invalid")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(ModelLoadError, match="unreachable"):
        load_model("ViT-B-32", "laion2b_s34b_b79k", "cpu")


@pytest.mark.subprocess
def test_interrupted_run_leaves_only_complete_files(workspace, tmp_path):
    import signal

    root, scenes = workspace
    src = tmp_path / "many"
    src.mkdir()
    for i in range(40):
        shutil.copy(scenes[i % len(scenes)][0], src / f"img{i:02d}.png")
    out = tmp_path / "out"
    code, err = signal_after_first_output(["explain", str(src), "-p", PROMPTS[0], "--out", str(out),
                                           "--batch-size", "1", "--save-maps"], out, "*.png", signal.SIGINT,
                                          step_s=0.05)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    pngs = list(out.glob("*.png"))
    assert 0 < len(pngs) < 40
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for png in pngs:
        with Image.open(png) as im:
            im.load()  # fully decodable: no truncated file under a final name
        # every overlay has its complete map (the map is written first; the overlay marks the pair as done)
        assert np.load(png.with_suffix(".npy")).shape == (64, 64)
    # scores.csv has a row for every overlay the interrupted run wrote, and for nothing else.
    rows = _scores(out)
    assert sorted(r["overlay"] for r in rows) == sorted(p.name for p in pngs)
    assert {r["image"] for r in rows} == {str(src / f"{p.name.split('__')[0].rsplit('-', 1)[0]}.png") for p in pngs}


def _scores(out) -> list[dict]:
    with open(out / "scores.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.subprocess
def test_failing_image_costs_only_itself(workspace, batch_run, tmp_path, monkeypatch, capsys):
    # One image of a batch runs out of memory: the others of its batch are explained all the same.
    from legrad.cli import main
    from legrad.frontend.explainer import Explainer

    root, scenes = workspace
    _, ref = batch_run
    src = tmp_path / "imgs"
    src.mkdir()
    names = ["a", "b", "c", "d", "e"]
    for i, name in enumerate(names):
        shutil.copy(scenes[i % 3][0], src / f"{name}.png")
    with Image.open(scenes[0][0]) as im:
        im.convert("RGB").resize((72, 72)).save(src / "c.png")  # the marked image: 72 px wide
    original = Explainer.heatmaps

    def heatmaps(self, images, *args, **kwargs):
        if any(im.width == 72 for im in images):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Explainer, "heatmaps", heatmaps)
    out = tmp_path / "out"
    code = main(["explain", str(src), "-p", PROMPTS[0], "-p", PROMPTS[1], "--out", str(out), "--save-maps",
                 "--batch-size", "4", "-q"])
    captured = capsys.readouterr()
    assert code == 1
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and "c.png" in err[0] and "out of memory" in err[0]
    assert "4 of 5 images explained, 1 failed" in captured.out
    assert not list(out.glob("c-*__*"))
    for i, name in enumerate(names):
        if name == "c":
            continue
        ref_stem = _key(scenes[i % 3][0])
        for slug in SLUGS:
            # Same maps as the unbroken run of these scenes (a batch of 3 after the retry, or of 1).
            np.testing.assert_allclose(np.load(out / f"{_key(src / f'{name}.png')}__{slug}.npy"),
                                       np.load(ref / f"{ref_stem}__{slug}.npy"), atol=1e-5)
    rows = _scores(out)
    assert sorted(r["overlay"] for r in rows) == sorted(f"{_key(src / f'{n}.png')}__{s}.png" for n in names if n != "c"
                                                        for s in SLUGS)
    ref_rows = {(r["image"], r["prompt"]): float(r["similarity"]) for r in _scores(ref)}
    for r in rows:
        stem = r["overlay"].split("__")[0].rsplit("-", 1)[0]
        expected = ref_rows[(str(scenes[names.index(stem) % 3][0]), r["prompt"])]
        assert float(r["similarity"]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.subprocess
def test_second_run_keeps_the_first_runs_scores(workspace, batch_run, tmp_path, capsys):
    from legrad.cli import main

    root, scenes = workspace
    _, first = batch_run
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = _scores(out)
    assert len(before) == 2 * len(scenes)
    again = scenes[1][0]
    assert main(["explain", str(again), "-p", PROMPTS[0], "-p", "a green star", "--out", str(out), "-q"]) == 0
    after = _scores(out)
    # The first run's rows stay, but for the pair explained again; the new pairs are added.
    assert len(after) == 2 * len(scenes) + 1
    redone = {(r["image"], r["prompt"]) for r in after[-2:]}
    assert redone == {(str(again), PROMPTS[0]), (str(again), "a green star")}
    assert [r for r in before if (r["image"], r["prompt"]) not in redone] == after[:-2]
    overlays = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert sorted(r["overlay"] for r in after) == overlays  # one row per overlay in the folder
    # A scores.csv that is not ours is never overwritten: a clear error before any work.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scores.csv").write_text("name,value\nx,1\n")
    assert main(["explain", str(again), "-p", "x", "--out", str(tmp_path / "other"), "-q"]) == 2
    assert "not a legrad scores file" in capsys.readouterr().err
    assert (tmp_path / "other" / "scores.csv").read_text() == "name,value\nx,1\n"


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
def test_fifo_input_is_skipped_not_opened(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    items, problems = discover([str(tmp_path / "pipe.png")])
    assert items == [] and problems == [f"{tmp_path / 'pipe.png'}: not a regular file"]

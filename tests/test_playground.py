"""Tests of playground.py: the offline default run (subprocess) and its error handling."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers.frontend_utils import PYTHON, REPO, bundled_scenes, subprocess_env
from PIL import Image

from legrad.frontend.scenes import absent_phrase


@pytest.fixture(scope="module")
def playground():
    sys.path.insert(0, str(REPO))
    try:
        import playground as module
    finally:
        sys.path.remove(str(REPO))
    return module


@pytest.mark.subprocess
def test_default_run_prints_similarities_and_writes_the_figure(tmp_path, playground):
    out = tmp_path / "pg.png"
    res = subprocess.run([PYTHON, "playground.py", "--out", str(out)], capture_output=True, text=True,
                         timeout=240, env=subprocess_env(), cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr

    image, phrases, absent, _ = playground.default_scene()
    prompts = [*phrases, absent]
    printed = {}
    for line in res.stdout.splitlines():
        m = re.match(r"^\s+(.+?)\s+(-?\d+\.\d+)\s+(\d+\.\d+)$", line)
        if m:
            printed[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert list(printed) == prompts

    # The printed similarities are the model's cosine similarities, recomputed here from scratch.
    from legrad.frontend.models import load_model

    model, preprocess, tokenizer = load_model("toy", None, "cpu")
    with torch.no_grad():
        img = model.encode_image(preprocess(image).unsqueeze(0))
        txt = model.encode_text(tokenizer(prompts))
    cos = (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
    for p, prompt in enumerate(prompts):
        assert printed[prompt][0] == pytest.approx(float(cos[0, p]), abs=1.5e-3)
    assert sum(v[1] for v in printed.values()) == pytest.approx(1.0, abs=5e-3)

    with Image.open(out) as fig:
        assert fig.format == "PNG"
        # One row: the image and one panel per prompt.
        assert fig.width > (len(prompts) + 1) * 0.8 * fig.height
    assert f"wrote {out}" in res.stdout


def test_bad_inputs_give_one_line(tmp_path, playground, capsys):
    out = tmp_path / "never.png"
    assert playground.main(["--image", str(tmp_path / "missing.jpg"), "-p", "x", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]

    scene, _ = bundled_scenes()[0]
    assert playground.main(["--image", str(scene), "--out", str(out)]) == 2
    assert "--prompt" in capsys.readouterr().err

    assert playground.main(["--image", str(scene), "-p", "x", "--size", "70", "--out", str(out)]) == 2
    assert "patch size" in capsys.readouterr().err

    assert playground.main(["--model", "ViT-B-16", "--pretrained", str(tmp_path / "nope.pt"), "--out",
                            str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    assert not out.exists()


def test_custom_image_and_prompts(tmp_path, playground, capsys):
    scene, phrases = bundled_scenes()[2]
    out = tmp_path / "custom.png"
    other = absent_phrase(phrases)
    assert playground.main(["--image", str(scene), "-p", phrases[0], "-p", other, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert phrases[0] in stdout and other in stdout and str(scene) in stdout
    assert out.is_file()


@pytest.mark.parametrize("scene", ["9", "-1", "6"])
def test_out_of_range_scene_is_an_error(tmp_path, playground, capsys, scene):
    out = tmp_path / "never.png"
    assert playground.main(["--scene", scene, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scene must be between 0 and 5" in err[0]
    assert not out.exists()


def test_size_rejected_by_the_explainer_stops_before_any_work(tmp_path, playground, capsys, monkeypatch):
    # The explainer's own size check (patch multiple, upper bound) is what decides; playground must
    # turn its ValueError into one line and exit before explaining anything.
    from legrad.frontend.explainer import Explainer

    def refuse(self, size):
        raise ValueError(f"image size {size[0]}x{size[1]} is too large")

    def never(*args, **kwargs):
        raise AssertionError("explain ran")

    monkeypatch.setattr(Explainer, "check_size", refuse)
    monkeypatch.setattr(Explainer, "explain", never)
    out = tmp_path / "never.png"
    assert playground.main(["--size", "40000", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "40000x40000 is too large" in err[0]
    assert not out.exists()

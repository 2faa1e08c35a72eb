"""Image classifiers in the front ends: ``legrad explain --target``, the app, the playground and the
baselines/bench (random-init tiny timm ViT, in-process)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("timm")

MODEL = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "cat photo.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def explainer():
    from legrad.frontend.explainer import Explainer

    return Explainer.load(MODEL, "none")


def test_cli_explain_targets(image_path, tmp_path, explainer, capsys):
    from legrad.cli import main

    out = tmp_path / "out"
    code = main(["explain", str(image_path), "--model", MODEL, "--pretrained", "none", "--target", "281",
                 "--target", "tiger cat", "--target", "tabby", "--size", "64x96", "--out", str(out),
                 "--save-maps", "-q"])
    assert code == 0, capsys.readouterr().err
    from legrad.cli.explain import discover, prompt_name

    names = sorted(p.name for p in out.iterdir())
    key = discover([str(image_path)])[0][0].key  # cat-photo-<hash of the path>
    assert f"{key}__{prompt_name('tabby (281)')}.png" in names  # 281 and "tabby" are one class: one overlay
    tiger = out / f"{key}__{prompt_name('tiger cat (282)')}.npy"
    assert tiger.name in names and len([n for n in names if n.endswith(".png")]) == 2
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["prompt"] for r in rows] == ["tabby (281)", "tiger cat (282)"]
    # The scores are the model's own logits / softmax probabilities; the maps LeGrad's at 64x96.
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        logits = explainer.wrapper.model(explainer.preprocess(image)[None])[0]
    assert float(rows[1]["similarity"]) == pytest.approx(float(logits[282]), abs=1e-4)
    assert float(rows[1]["probability"]) == pytest.approx(float(logits.softmax(-1)[282]), abs=1e-6)
    want = explainer.explain(image, [282], size=(64, 96)).maps[0, 0].numpy()
    assert np.allclose(np.load(tiger), want, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--model", MODEL, "-p", "a cat"], "image classifier: give class targets with --target"),
    (["--target", "281"], "--target is for image classifiers"),
    (["--model", MODEL], "give class targets with --target"),
    ([], "give text prompts with -p"),
])
def test_cli_mixed_up_prompts_and_targets(image_path, tmp_path, capsys, args, message):
    from legrad.cli import main

    assert main(["explain", str(image_path), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_unknown_class_name(image_path, tmp_path, capsys):
    from legrad.cli import main

    code = main(["explain", str(image_path), "--model", MODEL, "--pretrained", "none", "--target", "tabbby",
                 "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "unknown class name 'tabbby'" in err[0] and "'tabby' (281)" in err[0]


# ------------------------------------------------------------------------------------------- app
@pytest.fixture()
def app(monkeypatch):
    pytest.importorskip("gradio")
    from helpers.frontend_utils import REPO

    monkeypatch.syspath_prepend(str(REPO))
    import app as module

    label = module.model_label(MODEL, "none")
    monkeypatch.setattr(module.SETTINGS, "extra_labels", (label,))
    return module, label


def test_app_classifier_targets(app, image_path, explainer):
    module, label = app
    assert module.model_labels()[:2] == [module.TOY_LABEL, label] and module.is_classifier_label(label)
    assert "Class targets" in module.prompts_box_for(label)["label"]
    assert "Prompts" in module.prompts_box_for(module.TOY_LABEL)["label"]
    image = np.asarray(Image.open(image_path).convert("RGB"))
    # One target per line; a class name may hold a comma.
    gallery, status = module.predict(image, "", "tabby, tabby cat\n285", label, "64", None, 0.6)
    assert [c for _, c in gallery][0].startswith("tabby (281): logit "), status
    assert gallery[1][1].startswith("Egyptian cat (285): logit ")
    want = explainer.explain(Image.fromarray(image), [281, 285], size=(64, 64))
    assert f"logit {float(want.similarity[0, 1]):.3f}" in gallery[1][1]
    assert "best class" in status
    gallery, status = module.predict(image, "", "tabbby", label, "64", None, 0.6)
    assert gallery == [] and "unknown class name 'tabbby'" in status and "'tabby' (281)" in status
    gallery, status = module.predict(image, "", "281", "timm:vit_large_patch16_224 · none", "", None, 0.6)
    assert gallery == [] and "unknown model choice" in status


def test_app_flags(app):
    module, _ = app
    assert module.initial_text([MODEL], ["281", " tiger  cat "], []) == "281\ntiger cat"
    with pytest.raises(ValueError, match="--target is for image classifiers"):
        module.initial_text([], ["281"], [])
    with pytest.raises(ValueError, match="image classifier"):
        module.initial_text([MODEL], [], ["a cat"])
    assert module.main(["--model", MODEL, "-p", "a cat"]) == 2


# ------------------------------------------------------------------------------------ playground
def test_playground_classifier(tmp_path, image_path, monkeypatch, capsys, explainer):
    from helpers.frontend_utils import REPO

    monkeypatch.syspath_prepend(str(REPO))
    import playground

    out = tmp_path / "fig.png"
    code = playground.main(["--model", MODEL, "--pretrained", "none", "--image", str(image_path), "--target",
                            "tabby", "--target", "7", "--size", "64", "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert out.is_file() and "target" in text.out and "logit" in text.out
    want = explainer.explain(Image.open(image_path).convert("RGB"), [281], size=(64, 64))
    line = next(ln for ln in text.out.splitlines() if "tabby (281)" in ln)
    assert float(line.split()[-2]) == pytest.approx(float(want.similarity[0, 0]), abs=1e-3)
    for args, message in ((["--model", MODEL, "-p", "a cat"], "--target, not --prompt"),
                          (["--target", "281"], "--target is for image classifiers"),
                          (["--model", MODEL], "give at least one --target")):
        assert playground.main([*args, "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err

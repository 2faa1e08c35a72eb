"""``legrad explain IMG --model hf:DIR --prompt Q --answer A --answer B`` on a tiny random LLaVA saved with its
processor (offline): overlays, scores.csv (log-probs equal to the model's own), maps equal to the library's."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402
from PIL import Image  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.cli import main  # noqa: E402
from legrad.cli.explain import prompt_name  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    model = V.llava()
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=V.tokenizer(), patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    img.save(root / "img.png")
    return root, model, processor, img


@pytest.mark.slow
def test_cli_explains_answers_of_a_local_vlm(saved):
    root, model, processor, img = saved
    out = root / "out"
    code = main(["explain", str(root / "img.png"), "--model", f"hf:{root / 'llava'}", "--prompt",
                 "what is in the picture ?", "--answer", "a cat", "--answer", "a dog", "--out", str(out),
                 "--save-maps", "--device", "cpu", "-q"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["prompt"] for r in rows] == ["a cat", "a dog"]
    inputs = processor(images=img, text="<image>\nwhat is in the picture ?", return_tensors="pt")
    w = LeWrapper(model, tokenizer=processor)
    logp = w.adapter.score(inputs, ["a cat", "a dog"], tokenizer=processor)[0]
    maps = w.compute_legrad(image=inputs, answers=["a cat", "a dog"], output_size=(40, 48))[0]
    for p, row in enumerate(rows):
        assert abs(float(row["similarity"]) - float(logp[p])) < 1e-4
        assert abs(float(row["probability"]) - math.exp(float(logp[p]))) < 1e-5
        png = out / row["overlay"]
        assert png.name.startswith("img-") and prompt_name(row["prompt"]) in png.name
        saved_map = np.load(png.with_suffix(".npy"))
        assert saved_map.shape == (40, 48)
        np.testing.assert_allclose(saved_map, maps[p].numpy(), atol=1e-5)
        assert Image.open(png).size == (48, 40)


@pytest.mark.parametrize("argv, code, msg", [
    (["--answer", "a cat"], 2, "exactly one question"),
    (["--prompt", "q", "--prompt", "r", "--answer", "a cat"], 2, "exactly one question"),
    (["--prompt", "q", "--answer", " "], 2, "must not be empty"),
    (["--prompt", "q", "--answer", "a", "--target", "3"], 2, "--target"),
    (["--prompt", "q", "--answer", "a", "--size", "64"], 2, "--size"),
    (["--prompt", "q", "--answer", "a", "--colormap", "no-such-map"], 2, "no-such-map"),
])
def test_cli_refuses_bad_answer_arguments(saved, capsys, argv, code, msg):
    root = saved[0]
    assert main(["explain", str(root / "img.png"), "--model", f"hf:{root / 'llava'}", "--out", str(root / "bad"),
                 *argv]) == code
    assert msg in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_not_a_supported_vlm(saved, capsys, tmp_path):
    root = saved[0]
    assert main(["explain", str(root / "img.png"), "--model", f"hf:{tmp_path}", "--prompt", "q", "--answer", "a",
                 "--out", str(tmp_path / "o")]) == 1
    assert "supported VLMs" in capsys.readouterr().err
    torch.manual_seed(0)  # no state leaks between the cases


def test_playground_explains_answers_of_a_local_vlm(saved, capsys, tmp_path):
    import sys
    from pathlib import Path

    root, model, processor, img = saved
    repo = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, repo)
    try:
        import playground
    finally:
        sys.path.remove(repo)
    out = tmp_path / "pg.png"
    code = playground.main(["--model", f"hf:{root / 'llava'}", "--image", str(root / "img.png"), "--prompt",
                            "what is in the picture ?", "--answer", "a cat", "--answer", "a dog", "--out", str(out),
                            "--device", "cpu"])
    assert code == 0 and out.is_file()
    text = capsys.readouterr().out
    inputs = processor(images=img, text="<image>\nwhat is in the picture ?", return_tensors="pt")
    logp = LeWrapper(model, tokenizer=processor).adapter.score(inputs, ["a cat", "a dog"], tokenizer=processor)[0]
    assert f"a cat   {float(logp[0]):>8.3f}" in text and f"a dog   {float(logp[1]):>8.3f}" in text
    assert playground.main(["--model", f"hf:{root / 'llava'}", "--answer", "a cat", "--out", str(out)]) == 2


@pytest.mark.slow
def test_app_request_for_a_local_vlm_the_operator_passed(saved):
    import dataclasses

    from legrad.app import requests as A

    app = A.DemoApp()

    root = saved[0]
    label = f"hf:{root / 'llava'}"
    text = "what is in the picture ?\na cat\na dog"
    # Not passed by the operator: a visitor's path is never looked at, the choice is refused.
    gallery, status = app.predict(str(root / "img.png"), None, text, label, alpha=0.5)
    assert gallery == [] and "unknown model choice" in status
    # The operator's --model entry; the app reads only Gradio's uploads: the test's folder stands for them.
    app = A.DemoApp(A.AppSettings(extra_labels=(label,), upload_dirs=(os.path.realpath(root),)))
    assert "Question" in app.prompts_box_for(label)["label"]
    assert A.initial_text([label], [], ["what is in the picture ?", "a cat"]) == "what is in the picture ?\na cat"
    gallery, status = app.predict(str(root / "img.png"), None, text, label, alpha=0.5)
    assert [c for _, c in gallery][0].startswith("a cat: log-prob") and len(gallery) == 2, status
    assert gallery[0][0].size == (48, 40)
    gallery, status = app.predict(str(root / "img.png"), None, " \n ", label, alpha=0.5)
    assert gallery == [] and "candidate answer" in status  # a question alone: tests/test_vlm_answer_frontends.py
    gallery, status = app.predict(str(root / "img.png"), None, text, label, size_text="64", alpha=0.5)
    assert gallery == [] and "size does not apply" in status
    gallery, status = app.predict(str(root / "img.png"), None, text, label, layer_index=7, alpha=0.5)
    assert gallery == [] and "layer_index=7 is out of range" in status
    # The operator's --time-limit stops a VLM request too, with the app's message.
    app.settings = dataclasses.replace(app.settings, time_limit=1e-9)
    gallery, status = app.predict(str(root / "img.png"), None, text, label, alpha=0.5)
    assert gallery == [] and "Stopped" in status


# ---------------------------------------------------------------------------------------------- issue 26 item 8
def _no_load(*args, **kwargs):
    raise AssertionError("the model must not load")


@pytest.mark.parametrize("answer", ["<image>", "a <image> cat"])
def test_an_answer_holding_the_image_token_is_refused_before_the_model_loads(saved, capsys, monkeypatch, tmp_path,
                                                                            answer):
    from legrad.frontend.vlm import VLMExplainer, image_token_texts

    root = saved[0]
    assert image_token_texts(f"hf:{root / 'llava'}") == {"<image>"}
    monkeypatch.setattr(VLMExplainer, "load", _no_load)
    out = tmp_path / "out"
    assert main(["explain", str(root / "img.png"), "--model", f"hf:{root / 'llava'}", "--prompt", "q", "--answer",
                 "a cat", "--answer", answer, "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--answer {answer!r}" in err[0] and "image token" in err[0]
    assert not out.exists()
    assert main(["playground", "--model", f"hf:{root / 'llava'}", "--prompt", "q", "--answer", answer, "--out",
                 str(tmp_path / "pg.png")]) == 2
    assert "image token" in capsys.readouterr().err


def test_an_image_token_the_files_do_not_name_is_refused_before_any_compute(saved, capsys, monkeypatch, tmp_path):
    import legrad.cli.vlm as cli_vlm
    from legrad.frontend.vlm import VLMExplainer

    root = saved[0]
    # A folder whose files do not say which token is the image's: the loaded tokenizer tells.
    monkeypatch.setattr(cli_vlm, "image_token_texts", lambda name: set())

    def no_compute(*args, **kwargs):
        raise AssertionError("nothing may be computed")

    monkeypatch.setattr(VLMExplainer, "explain", no_compute)
    out = tmp_path / "out"
    assert main(["explain", str(root / "img.png"), "--model", f"hf:{root / 'llava'}", "--prompt", "q", "--answer",
                 "<image>", "--out", str(out), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--answer '<image>'" in err[0] and "image token" in err[0]
    assert not list(out.rglob("*.png"))

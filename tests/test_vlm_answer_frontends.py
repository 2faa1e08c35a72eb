"""The model's own answer in the front ends, on a tiny random LLaVA saved with its real processor (``hf:DIR``):
``legrad explain --generate`` and ``legrad playground --generate`` (subprocesses: a figure of the answer's token
maps, scores.csv rows per token) and the app's mode for a question alone (in-process, like tests/test_app.py)."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from helpers import vlm_answer as A  # noqa: E402
from helpers.frontend_utils import PYTHON, REPO, subprocess_env  # noqa: E402
from PIL import Image  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.cli import main  # noqa: E402

QUESTION = "what is in the picture ?"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_answer")
    model, processor = A.V.llava(), A.llava_processor()
    model.generation_config.repetition_penalty = 5.0  # the folder's own generation config applies: varied tokens
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    A.image().save(root / "img.png")
    return root, model, processor


def _reference(saved, max_new_tokens: int):
    """The library's answer for the saved image and question, at the image's size (40 x 48)."""
    root, model, processor = saved
    inputs = processor(images=Image.open(root / "img.png").convert("RGB"), text=f"<image>\n{QUESTION}",
                       return_tensors="pt")
    return LeWrapper(model, tokenizer=processor).explain_answer(inputs, max_new_tokens, output_size=(40, 48))


def _legrad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "legrad", *args], capture_output=True, text=True, env=subprocess_env(),
                          cwd=REPO, timeout=600)


@pytest.mark.subprocess
def test_cli_generate_writes_the_answers_figure_and_a_row_per_token(saved):
    root = saved[0]
    out = root / "out"
    done = _legrad("explain", str(root / "img.png"), "--model", f"hf:{root / 'llava'}", "--prompt", QUESTION,
                   "--generate", "--max-new-tokens", "4", "--out", str(out), "--save-maps", "--device", "cpu", "-q")
    assert done.returncode == 0, done.stderr
    ref = _reference(saved, 4)
    ids, tokens = ref.token_ids[0], ref.tokens[0]
    assert len(set(ids.tolist())) > 1  # the saved generation config (repetition penalty) was used
    figures = list(out.glob("img-*__answer-tokens.png"))
    assert len(figures) == 1 and Image.open(figures[0]).size[0] > 48 * 3
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["prompt"] for r in rows] == [ref.text[0], *tokens]
    expected = [float(ref.answer_logprob[0]), *ref.logprobs[0].tolist()]
    maps = [ref.answer_map[0], *ref.maps[0]]
    for row, logp, ref_map in zip(rows, expected, maps):
        assert abs(float(row["similarity"]) - logp) < 1e-4
        assert abs(float(row["probability"]) - math.exp(logp)) < 1e-5
        saved_map = np.load((out / row["overlay"]).with_suffix(".npy"))
        np.testing.assert_allclose(saved_map, ref_map.numpy(), atol=1e-5)
    assert [r["overlay"].split("__")[1] for r in rows] == ["answer.png", *(f"answer-token{t:03d}.png" for t in range(4))]


@pytest.mark.parametrize("argv, msg", [
    (["--prompt", "q", "--generate", "--answer", "a cat"], "not both"),
    (["--prompt", "q", "--generate", "--max-new-tokens", "513"], "at most 512"),
    (["--prompt", "q", "--answer", "a cat", "--max-new-tokens", "4"], "applies to --generate"),
    (["--generate"], "exactly one question"),
])
def test_cli_generate_usage_errors_before_any_work(saved, capsys, argv, msg):
    root = saved[0]
    assert main(["explain", str(root / "img.png"), "--model", f"hf:{root / 'llava'}", "--out", str(root / "bad"),
                 *argv]) == 2
    assert msg in capsys.readouterr().err
    assert not (root / "bad").exists()
    assert main(["explain", str(root / "img.png"), "--model", f"hf:{root / 'llava'}", "--prompt", "q", "--generate",
                 "--max-new-tokens", "0"]) == 2
    assert "expected a positive integer" in capsys.readouterr().err


@pytest.mark.subprocess
def test_playground_generate_prints_the_tokens_and_writes_the_figure(saved, tmp_path):
    root = saved[0]
    out = tmp_path / "pg.png"
    done = _legrad("playground", "--model", f"hf:{root / 'llava'}", "--image", str(root / "img.png"), "--prompt",
                   QUESTION, "--generate", "--max-new-tokens", "3", "--out", str(out), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and Image.open(out).size[0] > 48 * 3
    ref = _reference(saved, 3)
    assert f"answer: {ref.text[0]!r}  log-prob {float(ref.answer_logprob[0]):.3f}" in done.stdout
    for tok, lp in zip(ref.tokens[0], ref.logprobs[0].tolist()):
        assert f"{tok!r}" in done.stdout and f"{lp:>8.3f}" in done.stdout
    bad = _legrad("playground", "--model", f"hf:{root / 'llava'}", "--prompt", QUESTION, "--generate", "--answer",
                  "a cat", "--out", str(out))
    assert bad.returncode == 2 and "not both" in bad.stderr


def test_app_explains_the_models_own_answer_to_a_question_alone(saved, monkeypatch):
    from legrad.app import requests as R
    from legrad.app import vlm as app_vlm

    root = saved[0]
    label = f"hf:{root / 'llava'}"
    app = R.DemoApp(R.AppSettings(extra_labels=(label,), upload_dirs=(os.path.realpath(root),)))
    assert "own answer" in app.prompts_box_for(label)["label"]
    monkeypatch.setattr(app_vlm, "MAX_NEW_TOKENS", 3)  # the app's bound (16) reached faster
    gallery, status = app.predict(str(root / "img.png"), None, QUESTION, label, alpha=0.5)
    ref = _reference(saved, 3)
    assert len(gallery) == 1 + 3, status
    captions = [c for _, c in gallery]
    assert captions[0] == f"whole answer: log-prob {float(ref.answer_logprob[0]):.3f}"
    assert captions[1:] == [f"{t + 1}. {tok!r}: log-prob {lp:.3f}"
                            for t, (tok, lp) in enumerate(zip(ref.tokens[0], ref.logprobs[0].tolist()))]
    assert gallery[0][0].size == (48, 40) and f"*{ref.text[0]}*" in status
    # Each overlay is the library's map drawn on the image.
    from legrad.viz import overlay

    picture = Image.open(root / "img.png").convert("RGB")
    np.testing.assert_array_equal(np.asarray(gallery[2][0]), np.asarray(overlay(picture, ref.maps[0][1].numpy(),
                                                                                alpha=0.5)))
    # The operator's --time-limit stops it too, with the app's message.
    app.settings = dataclasses.replace(app.settings, time_limit=1e-9)
    gallery, status = app.predict(str(root / "img.png"), None, QUESTION, label, alpha=0.5)
    assert gallery == [] and "Stopped" in status
    torch.manual_seed(0)


def test_answer_figure_lays_out_the_answer_then_its_tokens(tmp_path):
    from legrad.viz import answer_figure

    img = A.image()
    maps = np.random.default_rng(0).random((5, 40, 48)).astype(np.float32)
    fig = answer_figure(img, maps[0], "answer", maps, [f"t{i}" for i in range(5)], tmp_path / "f.png", columns=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "answer", "t0", "t1", "t2", "t3", "t4"] and len(fig.axes) == 9  # 3 rows of 3
    assert (tmp_path / "f.png").is_file()
    with pytest.raises(ValueError, match="2 token titles for 5 token maps"):
        answer_figure(img, maps[0], "answer", maps, ["a", "b"])

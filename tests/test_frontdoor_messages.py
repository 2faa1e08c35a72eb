"""Front-door messages say what the tools really accept (issue 21): Hugging Face download errors, the token
limit, ``legrad --help``, ``-q`` silencing the model libraries' progress bars, and random-weight
classifiers giving a visible (if meaningless) map."""

from __future__ import annotations

import socket
import subprocess

import pytest
import torch
from helpers.frontend_utils import PYTHON, REPO, subprocess_env

from legrad.frontend.downloads import offline_or_proxied

SCENE = REPO / "legrad" / "assets" / "scenes" / "scene_0.png"


def test_help_names_every_family():
    from legrad.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    for word in ("CLIP", "SigLIP", "OpenCLIP", "Hugging Face", "classifiers", "timm", "torchvision", "playground"):
        assert word in text, word


def test_token_limit_message_gives_the_front_ends_way_out():
    """The CLI, playground and app cannot raise the limit: the message only says what they can do."""
    from legrad.frontend.explainer import Explainer

    ex = Explainer.load("toy", None, "cpu")
    with pytest.raises(ValueError) as info:
        ex.check_size((2048, 2048))
    msg = str(info.value)
    assert "max_tokens" not in msg and "use a smaller size" in msg and "1024x1024" in msg


def test_unreachable_hub_for_an_hf_model_advises_a_local_directory(monkeypatch):
    """For ``hf:`` models --pretrained only takes 'none', so the message must not advise --pretrained PATH."""
    pytest.importorskip("transformers")
    from legrad.frontend.classifier_models import load_classifier
    from legrad.io.errors import ModelLoadError

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    if offline_or_proxied():
        pytest.skip("the environment sets an offline mode or a proxy: the reachability check is off")

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable (simulated)")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ModelLoadError) as info:
        load_classifier("hf:legrad-tests/no-such-vit", None, "cpu")
    msg = str(info.value)
    assert "--pretrained PATH" not in msg and "--model hf:DIR" in msg and "--pretrained none" in msg
    # ...and what it advises is what the loader accepts: a local directory as hf:DIR, 'none' as pretrained.
    with pytest.raises(ModelLoadError, match="only takes 'none'"):
        load_classifier("hf:legrad-tests/no-such-vit", "/tmp/weights.bin", "cpu")


@pytest.mark.slow
def test_random_torchvision_classifier_has_a_visible_map():
    """torchvision starts the head at zero; with --pretrained none the logits must not all be 0 nor the maps flat."""
    from legrad.frontend.explainer import Explainer
    from legrad.io.images import load_image

    ex = Explainer.load("torchvision:vit_b_16", "none", "cpu")
    assert bool(ex.wrapper.model.heads.head.weight.any())
    out = ex.explain(load_image(SCENE), [1, 5], size=(64, 64))
    assert float(out.similarity.abs().min()) > 1e-4
    assert float(out.maps.std()) > 0.05
    # Still the same random model every time (fixed seed), and the caller's RNG untouched.
    state = torch.random.get_rng_state()
    again = Explainer.load("torchvision:vit_b_16", "none", "cpu")
    assert torch.equal(again.wrapper.model.heads.head.weight, ex.wrapper.model.heads.head.weight)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.subprocess
def test_quiet_silences_transformers_loading_bars(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_classifiers import make_hf

    make_hf("ViTForImageClassification").save_pretrained(tmp_path / "vit")
    env = subprocess_env()
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env.pop("TQDM_DISABLE", None)

    def run(*extra):
        cmd = [PYTHON, "-m", "legrad", "explain", str(SCENE), "--model", f"hf:{tmp_path / 'vit'}", "--target", "1",
               "--out", str(tmp_path / "out"), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        return res.stderr

    quiet = run("-q")
    assert "it/s]" not in quiet and "%|" not in quiet, quiet
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 5 draws a bar while loading weights
        assert "Loading weights" in run(), "the control run shows no bar: this test would prove nothing"

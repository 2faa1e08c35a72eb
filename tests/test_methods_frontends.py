"""The registry behind the front ends: ``Explainer.explain(method=...)`` and ``legrad explain --method``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from legrad.methods import GradCAM, LeGrad

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def explainer():
    from legrad.frontend.explainer import Explainer

    return Explainer.load("toy")


def _picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_explainer_runs_a_registered_method(explainer):
    from legrad.preprocess import LePreprocess

    picture = _picture()
    got = explainer.explain(picture, ["a red circle", "a blue square"], method="gradcam")
    text = explainer.encode_prompts(["a red circle", "a blue square"])
    batch = LePreprocess(explainer.preprocess, explainer.native_size)(picture)[None]
    torch.testing.assert_close(got.maps, GradCAM(explainer.wrapper).attribute(batch, target=text))
    legrad = explainer.explain(picture, ["a red circle"])  # the default is LeGrad, as before
    torch.testing.assert_close(legrad.maps, LeGrad(explainer.wrapper).attribute(batch, target=text[:1]))
    assert explainer.method("gradcam") is explainer.method("gradcam")  # built once
    with pytest.raises(ValueError, match="unknown method"):
        explainer.explain(picture, ["a red circle"], method="nope")


def test_cli_explain_refuses_an_unknown_method(tmp_path, capsys):
    from legrad.cli import main

    path = tmp_path / "a.png"
    _picture().save(path)
    assert main(["explain", str(path), "-p", "a cat", "--method", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'; choose from legrad" in capsys.readouterr().err


def test_cli_explain_with_a_method_writes_its_maps(tmp_path, explainer):
    from legrad.cli import main

    path = tmp_path / "a.png"
    _picture().save(path)
    out = tmp_path / "o"
    assert main(["explain", str(path), "-p", "a cat", "--method", "rollout", "--save-maps", "--out", str(out)]) == 0
    saved = [np.load(p) for p in out.rglob("*.npy")]
    assert len(saved) == 1 and saved[0].shape == (64, 64)
    text = explainer.encode_prompts(["a cat"])
    want = explainer.heatmaps([Image.open(path).convert("RGB")], text, method="rollout")[0, 0].numpy()
    np.testing.assert_allclose(saved[0], want, atol=1e-6)
    assert float(np.ptp(want)) > 0

"""Parity with the original package, legrad-torch 1.1 (open_clip 2.23), on full-size random-weight towers.

Collected only when ``LEGRAD_TORCH_1_1`` names a folder holding legrad-torch 1.1, open_clip 2.23 and
einops (``pip install --no-deps --target DIR legrad_torch==1.1 open_clip_torch==2.23.0 einops``): the
original imports as ``legrad``, like this library, so it runs in a child process with ``PYTHONPATH=DIR``
(``tests/helpers/legrad_torch_run.py``), on the same weights (the image tower's ``state_dict``, loaded
strictly by open_clip 2.23) and the same inputs. ``.ci/run`` has a step that builds that folder and
runs this file (docs/development.md); the normal suite does not collect it (tests/conftest.py).

Checked: default mode equals the original on a plain CLIP ViT; ``reference="1.1"`` equals it on SigLIP
(with the empty-prompt correction, the same empty embedding) and CoCa; the default mode differs there.
2 images x 3 prompts at 224 px; the original is called per image and/or prompt as its contract allows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from legrad import LeWrapper

ORIGINAL = os.environ.get("LEGRAD_TORCH_1_1", "")
RUNNER = Path(__file__).parent / "helpers" / "legrad_torch_run.py"
# 1e-4 is the bar; the measured differences are below 1e-6 (float32 round-off).
TOL = 1e-5

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def _case(config: str, tmp_path: Path, correction: bool = False):
    """Same random weights and inputs for both packages: ``(model, image, text, empty, original maps)``."""
    assert ORIGINAL, "set LEGRAD_TORCH_1_1 to the side folder holding legrad-torch 1.1 (see the module docstring)"
    torch.manual_seed(0)
    model = open_clip.create_model(config, pretrained=None).eval()
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        dim = model.encode_image(image[:1]).shape[-1]
    text = F.normalize(torch.randn(3, dim, generator=g), dim=-1)
    empty = F.normalize(torch.randn(dim, generator=g), dim=-1)
    weights, inputs, out = tmp_path / "visual.pt", tmp_path / "inputs.npz", tmp_path / "original.npz"
    torch.save(model.visual.state_dict(), weights)
    arrays = dict(image=image.numpy(), text=text.numpy(), layer_index=np.array(-2))
    if correction:
        arrays["empty"] = empty.numpy()
    np.savez(inputs, **arrays)
    env = dict(os.environ, PYTHONPATH=ORIGINAL, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", str(RUNNER), config, str(weights), str(inputs), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the original package failed (is LEGRAD_TORCH_1_1={ORIGINAL!r} complete?):\n" \
                                 f"{proc.stderr[-4000:]}"
    return model, image, text, empty, torch.from_numpy(np.load(out)["maps"])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (2, 3, 224, 224)
    return float((a - b).abs().max())


def test_plain_vit_default_mode_equals_original(tmp_path):
    model, image, text, _, original = _case("ViT-B-32", tmp_path)
    assert _max_diff(LeWrapper(model).compute_legrad_clip(text, image), original) < TOL


def test_siglip_reference_mode_equals_original(tmp_path):
    model, image, text, empty, original = _case("ViT-B-16-SigLIP", tmp_path, correction=True)
    ours = LeWrapper(model, empty_text_embedding=empty, reference="1.1").compute_legrad_siglip(text, image)
    assert _max_diff(ours, original) < TOL
    # docs/differences.md: legrad's default differs by far more (0.61 max on these weights)
    default = LeWrapper(model, empty_text_embedding=empty).compute_legrad_siglip(text, image)
    assert _max_diff(default, original) > 0.05


def test_coca_reference_mode_equals_original(tmp_path):
    model, image, text, _, original = _case("coca_ViT-B-32", tmp_path)
    ours = LeWrapper(model, reference="1.1").compute_legrad_coca(text, image)
    assert _max_diff(ours, original) < TOL
    assert _max_diff(LeWrapper(model).compute_legrad_coca(text, image), original) > 0.05  # 0.11 measured

"""Shared fixtures and checks of the ``legrad extract`` tests: the demo model (bundled or a random
checkpoint of the same architecture), generated scenes, a reference run, and output comparisons.

Test modules import the fixtures by their function names (``toy_fixture``...); pytest knows them by
their ``name`` (``toy``...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from legrad.extract import MANIFEST_NAME, load_output, run
from legrad.frontend.explainer import Explainer
from legrad.preprocess import LePreprocess

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
N_SCENES = 20
REPO = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module", name="toy")
def toy_fixture(tmp_path_factory) -> tuple[str, str | None]:
    """``(model, pretrained)`` for the demo model: the bundled checkpoint, else a random one."""
    from legrad.toy import CHECKPOINT_PATH

    if Path(CHECKPOINT_PATH).is_file():
        return "toy", None
    from legrad.toy.model import ToyConfig, build_model, known_token_ids, make_tokenizer, save_checkpoint

    cfg = ToyConfig()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "toy_random.pt"
    save_checkpoint(build_model(cfg), cfg, path, known_token_ids(make_tokenizer(cfg)))
    return "toy", str(path)


@pytest.fixture(scope="module", name="explainer")
def explainer_fixture(toy) -> Explainer:
    return Explainer.load(*toy, device="cpu")


@pytest.fixture(scope="module", name="scenes")
def scenes_fixture(tmp_path_factory) -> Path:
    """20 generated 64x64 scenes (a third in a sub-folder) and one corrupt PNG."""
    from legrad.toy import make_scenes

    root = tmp_path_factory.mktemp("scenes")
    (root / "sub").mkdir()
    for i, scene in enumerate(make_scenes(N_SCENES, seed=3)):
        scene.image.save(root / ("sub" if i % 3 == 0 else ".") / f"scene{i:02d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


@pytest.fixture(scope="module", name="reference")
def reference_fixture(tmp_path_factory, toy, scenes) -> Path:
    """A complete single-process run (grid maps, float32)."""
    out = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's one-thread fixture
    try:
        result = run(scenes, out, PROMPTS, model=toy[0], pretrained=toy[1], workers=1, batch_size=4,
                     dtype="float32", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert (result.total, result.computed, result.skipped, result.failed) == (N_SCENES + 1, N_SCENES, 0, 1)
    return out


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def npz_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz"))


def assert_same_outputs(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same files, same manifest; floats equal up to rounding noise from batch composition/threads."""
    assert npz_files(a) == npz_files(b)
    for name in npz_files(a):
        x, y = load_output(a / name), load_output(b / name)
        assert x.keys() == y.keys()
        for k in x:
            if k in ("maps", "similarity"):
                assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype, (name, k)
                np.testing.assert_allclose(x[k].astype(np.float64), y[k], atol=atol, err_msg=f"{name} {k}")
            else:
                assert x[k] == y[k], (name, k)
    ma, mb = manifest(a), manifest(b)
    assert len(ma) == len(mb)
    for ra, rb in zip(ma, mb):
        assert {k: v for k, v in ra.items() if k != "similarity"} == {k: v for k, v in rb.items() if k != "similarity"}
        if ra["similarity"] is None:
            assert rb["similarity"] is None
        else:
            np.testing.assert_allclose(ra["similarity"], rb["similarity"], atol=max(atol, 2e-6))


def expected_maps(explainer: Explainer, image_path: Path, prompts: list[str], size=(64, 64)):
    """compute_legrad at the explained size, and the cosine similarities of the model's own preprocess."""
    image = Image.open(image_path).convert("RGB")
    text = explainer.encode_prompts(prompts)
    x = LePreprocess(explainer.preprocess, size)(image)[None]
    maps = explainer.wrapper.compute_legrad(text, image=x)[0]
    with torch.no_grad():
        emb = F.normalize(explainer.wrapper.model.encode_image(explainer.preprocess(image)[None]), dim=-1)
    return maps, (emb @ text.T)[0]


def renormalised(grid: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A stored map brought to ``size`` the documented way: bilinear upsampling, then min-max per prompt."""
    up = F.interpolate(torch.from_numpy(grid.astype(np.float32))[None], size=size, mode="bilinear",
                       align_corners=False)[0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return (up - lo) / (hi - lo)


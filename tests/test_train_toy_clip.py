"""Tests of scripts/train_toy_clip.py on a tiny configuration (a few steps, a handful of scenes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from legrad.toy.model import ToyConfig, build_model

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_toy_clip.py"
_spec = importlib.util.spec_from_file_location("train_toy_clip", _SCRIPT)
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TINY = ["--batch-size", "4", "--eval-scenes", "4", "--warmup", "1", "--threads", "1",
        "--vision-layers", "1", "--vision-width", "32", "--vision-head-width", "16"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return {**payload["state_dict"], "token_rows": payload["token_rows"]}


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_training_embedding_is_the_models_own(pool_type):
    torch.manual_seed(0)
    model = build_model(ToyConfig(vision_layers=2, vision_width=32, vision_head_width=16, pool_type=pool_type)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        own, mean_f, deep = train.encode_image_all(model, x, deep_layers=(0,))
        expected = model.encode_image(x)
    torch.testing.assert_close(own, expected, rtol=0, atol=1e-6)
    assert mean_f.shape == own.shape and len(deep) == 1


@pytest.mark.slow
def test_training_is_deterministic_and_stop_after_reproduces_a_snapshot(tmp_path):
    full = [*TINY, "--steps", "3", "--eval-every", "1"]
    train.main([*full, "--out", str(tmp_path / "a.pt"), "--snapshots", str(tmp_path / "snaps")])
    train.main([*full, "--out", str(tmp_path / "b.pt")])
    _assert_same(tmp_path / "a.pt", tmp_path / "b.pt")
    train.main([*full, "--stop-after", "2", "--out", str(tmp_path / "c.pt")])
    _assert_same(tmp_path / "snaps" / "step00002.pt", tmp_path / "c.pt")
    with pytest.raises(AssertionError):  # the comparison can fail: step 2 is not step 3
        _assert_same(tmp_path / "a.pt", tmp_path / "c.pt")


@pytest.mark.slow
def test_init_keeps_the_checkpoint_weights(tmp_path):
    train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "a.pt")])
    # lr 0: the continued run must write back exactly the weights it started from (learned positions too).
    frozen = ["--lr", "0", "--min-lr", "0", "--steps", "1"]
    train.main([*TINY, *frozen, "--init", str(tmp_path / "a.pt"), "--out", str(tmp_path / "b.pt")])
    _assert_same(tmp_path / "a.pt", tmp_path / "b.pt")
    # Pooling may change; the architecture may not.
    train.main([*TINY, *frozen, "--pool-type", "avg", "--init", str(tmp_path / "a.pt"), "--out", str(tmp_path / "c.pt")])
    _assert_same(tmp_path / "a.pt", tmp_path / "c.pt")
    wider = [a if a != "32" else "64" for a in TINY]
    with pytest.raises(SystemExit, match="--init checkpoint has config"):
        train.main([*wider, *frozen, "--init", str(tmp_path / "a.pt"), "--out", str(tmp_path / "d.pt")])
    # Learned positions are tied to the grid: another image size is refused, sin-cos ones are rebuilt.
    with pytest.raises(SystemExit, match="--init checkpoint has config"):
        train.main([*TINY, *frozen, "--image-size", "80", "--init", str(tmp_path / "a.pt"),
                    "--out", str(tmp_path / "e.pt")])

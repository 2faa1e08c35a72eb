"""Tests of scripts/train_toy_clip.py on a tiny configuration (a few steps, a handful of scenes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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


def test_hard_scenes_share_a_colour_or_a_shape():
    import numpy as np

    rng = np.random.default_rng(0)
    scenes = [train.render(rng, 64, 0.0, hard_prob=1.0, grid=8) for _ in range(40)]
    assert all(train._is_hard(phrases) for _, phrases, _ in scenes)
    assert all(cover.shape == (len(phrases), 8, 8) for _, phrases, cover in scenes)
    plain = [train.render(rng, 64, 0.0)[1] for _ in range(40)]
    assert not all(train._is_hard(p) for p in plain)  # the check can fail: most plain scenes are not hard


@pytest.mark.slow
def test_training_is_deterministic_and_stop_after_reproduces_a_snapshot(tmp_path):
    full = [*TINY, "--steps", "3", "--eval-every", "1", "--hard-prob", "0.5", "--dense-layers", "0",
            "--dense-weight", "1"]
    train.main([*full, "--out", str(tmp_path / "a.pt"), "--snapshots", str(tmp_path / "snaps")])
    train.main([*full, "--out", str(tmp_path / "b.pt")])
    _assert_same(tmp_path / "a.pt", tmp_path / "b.pt")
    train.main([*full, "--stop-after", "2", "--out", str(tmp_path / "c.pt")])
    _assert_same(tmp_path / "snaps" / "step00002.pt", tmp_path / "c.pt")
    with pytest.raises(AssertionError):  # the comparison can fail: step 2 is not step 3
        _assert_same(tmp_path / "a.pt", tmp_path / "c.pt")


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    full = [*TINY, "--steps", "4", "--eval-every", "2", "--hard-prob", "0.5", "--dense-layers", "0",
            "--dense-weight", "1", "--hires-prob", "0.5", "--map-layers", "0", "--map-weight", "1"]
    train.main([*full, "--out", str(tmp_path / "a.pt")])
    # Stopped after step 2 (its state written there), then continued from that state to the end.
    train.main([*full, "--stop-after", "2", "--state", str(tmp_path / "run.state"), "--out", str(tmp_path / "b.pt")])
    with pytest.raises(AssertionError):  # the comparison can fail: step 2 is not step 4
        _assert_same(tmp_path / "a.pt", tmp_path / "b.pt")
    train.main([*full, "--resume", str(tmp_path / "run.state"), "--out", str(tmp_path / "b.pt")])
    _assert_same(tmp_path / "a.pt", tmp_path / "b.pt")


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

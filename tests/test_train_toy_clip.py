"""Tests of scripts/train_toy_clip.py on a tiny configuration (a few steps, a handful of scenes)."""

from __future__ import annotations

import importlib.util
import math
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
        own, mean_f, deep, dense = train.encode_image_all(model, x, deep_layers=(0,), dense_layers=(1,))
        expected = model.encode_image(x)
        # The dense embeddings are the last block's patch tokens through ln_post and proj.
        tokens = model.visual._embeds(x)
        for blk in model.visual.transformer.resblocks:
            tokens = blk(tokens)
        patches = torch.stack([model.visual.ln_post(tokens[:, 1 + n]) @ model.visual.proj for n in range(64)], dim=1)
    torch.testing.assert_close(own, expected, rtol=0, atol=1e-6)
    assert mean_f.shape == own.shape and len(deep) == 1
    assert len(dense) == 1 and dense[0].shape == (3, 64, own.shape[-1])
    torch.testing.assert_close(dense[0], patches, rtol=0, atol=1e-5)


def _legrad_oracle(model, x, txt, layers):
    """LeGrad written out slowly: per layer and image, the attention probabilities as a leaf of a fresh
    graph, the cosine of the layer's token-mean embedding with the text, its gradient's positive part
    averaged over heads and query rows, the class column dropped; summed over layers."""
    vis = model.visual
    rel = torch.zeros(x.shape[0], 64)
    for b in range(x.shape[0]):
        for layer in layers:
            tokens = vis._embeds(x[b:b + 1])
            for blk in vis.transformer.resblocks[:layer]:
                tokens = blk(tokens)
            blk = vis.transformer.resblocks[layer]
            attn = blk.attn
            y = blk.ln_1(tokens)
            q, k, v = torch.nn.functional.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            heads = attn.num_heads
            split = [t.reshape(65, heads, -1).transpose(0, 1) for t in (q[0], k[0], v[0])]
            scale = split[0].shape[-1] ** -0.5
            probs = torch.softmax(split[0] @ split[1].transpose(1, 2) * scale, dim=-1).detach().requires_grad_(True)
            o = (probs @ split[2]).transpose(0, 1).reshape(1, 65, -1)
            out = tokens + attn.out_proj(o)
            out = out + blk.mlp(blk.ln_2(out))
            feat = vis.ln_post(out.mean(dim=1)) @ vis.proj
            score = torch.nn.functional.cosine_similarity(feat[0], txt[b], dim=0)
            (grad,) = torch.autograd.grad(score, probs)
            rel[b] += grad.clamp(min=0).mean(dim=(0, 1))[1:]
    return rel


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_trained_map_is_legrads_map(pool_type):
    torch.manual_seed(1)
    model = build_model(ToyConfig(vision_layers=3, vision_width=32, vision_head_width=16, pool_type=pool_type)).eval()
    x = torch.randn(2, 3, 64, 64)
    txt = torch.nn.functional.normalize(torch.randn(2, model.visual.proj.shape[1]), dim=-1)
    traced = []
    own, *_ = train.encode_image_all(model, x, map_layers=(1, 2), traced=traced)
    with torch.no_grad():
        torch.testing.assert_close(own, model.encode_image(x), rtol=0, atol=1e-5)  # the re-implemented blocks
    rel = train.legrad_patch_map(model.visual, traced, txt)
    torch.testing.assert_close(rel, _legrad_oracle(model, x, txt, (1, 2)), rtol=1e-4, atol=1e-7)
    # ... which is legrad's own LeGrad map before upsampling and min-max normalisation.
    from legrad import LeWrapper

    up = torch.nn.functional.interpolate(rel.detach().view(2, 1, 8, 8), size=64, mode="bilinear")[:, 0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    maps = LeWrapper(model, layer_index=1).compute_legrad(txt[:, None], image=x)
    torch.testing.assert_close((up - lo) / (hi - lo), maps[:, 0], rtol=0, atol=1e-4)
    # The map is trainable: its loss reaches the weights of the blocks it reads (second-order gradient).
    cover = torch.zeros(2, 64)
    cover[:, :5] = 1.0
    train.map_loss(rel, cover, 0.1).backward()
    grad = model.visual.transformer.resblocks[1].attn.in_proj_weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_map_loss_is_the_target_patches_softmax_mass():
    rel = torch.tensor([[0.0, 1.0, 2.0, 4.0], [3.0, 0.0, 0.0, 1.0]])
    cover = torch.tensor([[0.0, 0.2, 0.4, 0.9], [0.1, 0.6, 0.5, 0.0]])
    got = train.map_loss(rel, cover, 0.5)
    expected = 0.0
    for r, c in zip(rel.tolist(), cover.tolist()):
        z = [v / max(r) / 0.5 for v in r]
        p = [math.exp(v) / sum(math.exp(w) for w in z) for v in z]
        expected -= math.log(sum(pi for pi, ci in zip(p, c) if ci >= 0.5 * max(c))) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_map_objects_prefer_a_shared_colour():
    import numpy as np

    red_circle, red_star, blue_cross = (train.VOCABULARY.index(p) for p in ("a red circle", "a red star", "a blue cross"))
    scenes = [[blue_cross, red_circle, red_star]] * 50 + [[blue_cross]]
    picks = train.pick_map_objects(scenes, np.random.default_rng(0), shared_prob=1.0)
    assert set(picks[:50]) == {1, 2} and picks[50] == 0
    picks = train.pick_map_objects(scenes, np.random.default_rng(0), shared_prob=0.0)
    assert set(picks[:50]) == {0, 1, 2}  # can fail: any object, the blue cross included


def test_dense_targets_follow_the_masks():
    # Two objects on a 4x4 patch grid, coverages written by hand.
    a = torch.zeros(4, 4)
    a[0, 0], a[0, 1], a[1, 1] = 1.0, 0.5, 0.25
    b = torch.zeros(4, 4)
    b[3, 3], b[1, 1] = 0.4, 0.2
    target = train.dense_targets([torch.stack([a, b])], [[7, 11]], background=40)[0].view(4, 4)
    expected = torch.full((4, 4), 40)
    expected[0, 0], expected[0, 1], expected[3, 3] = 7, 7, 11
    expected[1, 1] = -100  # covered (45 %) but by no object for >= 30 %: ignored
    assert torch.equal(target, expected)


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

"""Tests of legrad.toy.training, the demo model's training losses: each against a slow, written-out computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from legrad import LeWrapper
from legrad.toy import VOCABULARY
from legrad.toy.model import ToyConfig, build_model
from legrad.toy.training import (
    dense_targets,
    encode_image_all,
    legrad_patch_map,
    map_loss,
    multi_positive_loss,
    pick_map_objects,
)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_training_embedding_is_the_models_own(pool_type):
    torch.manual_seed(0)
    model = build_model(ToyConfig(vision_layers=2, vision_width=32, vision_head_width=16, pool_type=pool_type)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        own, mean_f, deep, dense = encode_image_all(model, x, deep_layers=(0,), dense_layers=(1,))
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
    own, *_ = encode_image_all(model, x, map_layers=(1, 2), traced=traced)
    with torch.no_grad():
        torch.testing.assert_close(own, model.encode_image(x), rtol=0, atol=1e-5)  # the re-implemented blocks
    rel = legrad_patch_map(model.visual, traced, txt)
    with pytest.raises(ValueError, match="traced"):
        encode_image_all(model, x, map_layers=(1,))
    torch.testing.assert_close(rel, _legrad_oracle(model, x, txt, (1, 2)), rtol=1e-4, atol=1e-7)
    # ... which is legrad's own LeGrad map before upsampling and min-max normalisation.
    up = torch.nn.functional.interpolate(rel.detach().view(2, 1, 8, 8), size=64, mode="bilinear")[:, 0]
    lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
    maps = LeWrapper(model, layer_index=1).compute_legrad(txt[:, None], image=x)
    torch.testing.assert_close((up - lo) / (hi - lo), maps[:, 0], rtol=0, atol=1e-4)
    # The map is trainable: its loss reaches the weights of the blocks it reads (second-order gradient).
    cover = torch.zeros(2, 64)
    cover[:, :5] = 1.0
    map_loss(rel, cover, 0.1).backward()
    grad = model.visual.transformer.resblocks[1].attn.in_proj_weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_map_loss_is_the_target_patches_softmax_mass():
    rel = torch.tensor([[0.0, 1.0, 2.0, 4.0], [3.0, 0.0, 0.0, 1.0]])
    cover = torch.tensor([[0.0, 0.2, 0.4, 0.9], [0.1, 0.6, 0.5, 0.0]])
    got = map_loss(rel, cover, 0.5)
    expected = 0.0
    for r, c in zip(rel.tolist(), cover.tolist()):
        z = [v / max(r) / 0.5 for v in r]
        p = [math.exp(v) / sum(math.exp(w) for w in z) for v in z]
        expected -= math.log(sum(pi for pi, ci in zip(p, c) if ci >= 0.5 * max(c))) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_map_objects_prefer_a_shared_colour():
    red_circle, red_star, blue_cross = (VOCABULARY.index(p) for p in ("a red circle", "a red star", "a blue cross"))
    scenes = [[blue_cross, red_circle, red_star]] * 50 + [[blue_cross]]
    picks = pick_map_objects(scenes, np.random.default_rng(0), shared_prob=1.0)
    assert set(picks[:50]) == {1, 2} and picks[50] == 0
    picks = pick_map_objects(scenes, np.random.default_rng(0), shared_prob=0.0)
    assert set(picks[:50]) == {0, 1, 2}  # can fail: any object, the blue cross included


def test_dense_targets_follow_the_masks():
    # Two objects on a 4x4 patch grid, coverages written by hand.
    a = torch.zeros(4, 4)
    a[0, 0], a[0, 1], a[1, 1] = 1.0, 0.5, 0.25
    b = torch.zeros(4, 4)
    b[3, 3], b[1, 1] = 0.4, 0.2
    target = dense_targets([torch.stack([a, b])], [[7, 11]], background=40)[0].view(4, 4)
    expected = torch.full((4, 4), 40)
    expected[0, 0], expected[0, 1], expected[3, 3] = 7, 7, 11
    expected[1, 1] = -100  # covered (45 %) but by no object for >= 30 %: ignored
    assert torch.equal(target, expected)


def test_multi_positive_loss_against_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(4, 6) * 3
    pos = torch.zeros(4, 6, dtype=torch.bool)
    pos[0, 1] = pos[1, 1] = pos[1, 4] = pos[2, 0] = pos[3, 5] = pos[3, 2] = True
    i2t, t2i = multi_positive_loss(logits, pos)
    rows, cols = [], []
    for b, v in pos.nonzero().tolist():
        # Each positive pair against the phrases absent from its image / the images without its phrase.
        row_neg = sum(math.exp(logits[b, w]) for w in range(6) if not pos[b, w])
        col_neg = sum(math.exp(logits[c, v]) for c in range(4) if not pos[c, v])
        e = math.exp(logits[b, v])
        rows.append(-math.log(e / (e + row_neg)))
        cols.append(-math.log(e / (e + col_neg)))
    assert i2t.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    assert t2i.item() == pytest.approx(sum(cols) / len(cols), rel=1e-5)

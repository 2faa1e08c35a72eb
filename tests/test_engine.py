"""The engine's relevance, budget and map helpers (legrad.engine) against direct computations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import legrad.engine.budget as engine_budget
from legrad.engine.budget import plan_blocks
from legrad.engine.maps import min_max, upsample
from legrad.engine.relevance import layer_relevance
from legrad.engine.step import LayerStep


def test_min_max_per_map_and_constant_maps():
    maps = torch.stack([torch.arange(12.0).reshape(1, 3, 4), torch.full((1, 3, 4), 5.0)], dim=1)  # [1, 2, 3, 4]
    out = min_max(maps)
    torch.testing.assert_close(out[0, 0], torch.arange(12.0).reshape(3, 4) / 11)
    assert torch.equal(out[0, 1], torch.zeros(3, 4))


def test_upsample_is_bilinear_by_patch_size():
    m = torch.rand(2, 3, 2, 5)
    out = upsample(m, (16, 40))
    torch.testing.assert_close(out, F.interpolate(m, scale_factor=8, mode="bilinear", align_corners=False))


def test_layer_relevance_equals_explicit_attention_gradient(monkeypatch):
    monkeypatch.setattr(engine_budget, "_MIN_EFFICIENT_BLOCK", 1)  # let small budgets force blocks of one row
    # A toy "layer": feature = W @ mean over rows of (A V) for explicit A; compare with the dO V^T route.
    torch.manual_seed(0)
    b, h, n, d, e, p = 2, 3, 5, 4, 6, 4
    attn = torch.softmax(torch.randn(b, h, n, n), -1)
    v = torch.randn(b, h, n, d)
    w = torch.randn(e, h * d)
    text = F.normalize(torch.randn(p, e), dim=-1)

    def feature_of(o):
        return (o.transpose(1, 2).reshape(b, n, h * d).mean(1)) @ w.t()

    expected = torch.zeros(b, p, n - 1)
    for i in range(p):
        a = attn.clone().requires_grad_(True)
        s = (F.normalize(feature_of(a @ v), dim=-1) @ text[i]).sum()
        (g,) = torch.autograd.grad(s, a)
        expected[:, i] = g.clamp(min=0).mean(dim=(1, 2))[:, 1:]
    for chunk, work in ((None, None), (1, None), (3, None), (None, 1), (2, 1), (None, 3000)):
        out = (attn @ v).requires_grad_(True)
        with torch.enable_grad():
            feature = feature_of(out)
        step = LayerStep(layer=0, feature=feature, out=out, value=v, num_prefix_tokens=1)
        torch.testing.assert_close(layer_relevance(step, text, chunk, work), expected, atol=1e-6, rtol=0)


def test_plan_blocks_fits_the_budget(monkeypatch):
    monkeypatch.setattr(engine_budget, "_MIN_EFFICIENT_BLOCK", 1)
    # Everything fits: all prompts, all rows.
    assert plan_blocks(8, 100, fixed=10, per_row=1, budget=10_000) == (8, 100)
    for p, nq, fixed, row, budget in [(8, 4097, 1000, 100, 200_000), (80, 197, 500, 50, 64_000), (3, 50, 10, 7, 200)]:
        chunk, block = plan_blocks(p, nq, fixed, row, budget)
        assert 1 <= chunk <= p and 1 <= block <= nq
        assert chunk * (fixed + block * row) <= budget
        # ...and uses it: one more row (or the whole thing) would not fit.
        assert block == nq or chunk * (fixed + (block + 1) * row) > budget
    # Nothing fits: one prompt, one row (the least the engine can do).
    assert plan_blocks(5, 10, fixed=100, per_row=10, budget=1) == (1, 1)
    # A fixed prompt chunk keeps its size; the block shrinks instead.
    assert plan_blocks(8, 100, fixed=0, per_row=1, budget=40, prompt_chunk=4) == (4, 10)
    # ...but never below an efficient block, even when one prompt's fixed part exceeds the budget.
    monkeypatch.setattr(engine_budget, "_MIN_EFFICIENT_BLOCK", 64)
    assert plan_blocks(5, 1000, fixed=100, per_row=10, budget=1) == (1, 64)
    assert plan_blocks(5, 10, fixed=100, per_row=10, budget=1) == (1, 10)

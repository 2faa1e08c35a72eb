"""The worked example of docs/architecture.md ("Adding a model family"): the toy ViT family declared there
for the block runner (its code block is run here as written), registered with ``legrad.register_tower``,
explained, and checked against a slow oracle written here with explicit attention probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import explicit_mha, min_max
from torch import nn

import legrad
from legrad.adapters.registry import unregister_tower


# ---------------------------------------------------------------------------------------------- the toy model
class ToyBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1, self.act, self.fc2 = nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ToyViT(nn.Module):
    """Patches of 8 pixels, a class token, learned positions for a 3x3 grid, pre-norm blocks, CLS readout."""

    def __init__(self, width: int = 32, depth: int = 3, heads: int = 2, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 10, width))
        self.blocks = nn.ModuleList(ToyBlock(width, heads) for _ in range(depth))
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, dim)

    def tokens(self, image):
        x = self.patch(image).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos

    def forward(self, image):
        x = self.tokens(image)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, 0]))


# ---------------------------------------------------------------------------------------------- the family
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def doc_example() -> str:
    """The python block of docs/architecture.md's "Adding a model family" section: the family under test."""
    section = DOC.read_text(encoding="utf-8").split("## Adding a model family", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


# ---------------------------------------------------------------------------------------------- oracle
def oracle(model: ToyViT, image: torch.Tensor, text: torch.Tensor, start: int) -> torch.Tensor:
    """LeGrad by its definition: explicit attention probabilities A (leaf), one image, prompt and layer at a
    time; map = min-max(sum over layers of upsampled mean over heads and rows of relu(ds/dA))."""
    out = []
    for b in range(len(image)):
        x0 = model.tokens(image[b:b + 1]).detach()
        maps = torch.zeros(len(text), 24, 24, dtype=torch.float64)
        for p in range(len(text)):
            x = x0
            for i, blk in enumerate(model.blocks):
                if i >= start:
                    h = blk.norm1(x)
                    attn, out_fn = explicit_mha(blk.attn, h, h)
                    x1 = x + out_fn(attn)
                    z = x1 + blk.fc2(blk.act(blk.fc1(blk.norm2(x1))))
                    s = F.normalize(model.proj(model.norm(z.mean(1))), dim=-1)[0] @ text[p]
                    (g,) = torch.autograd.grad(s, attn)
                    grid = g.clamp(min=0).mean(dim=(1, 2))[0, 1:].reshape(1, 1, 3, 3).double()
                    maps[p] += F.interpolate(grid, size=(24, 24), mode="bilinear", align_corners=False)[0, 0]
                x = blk(x).detach()
        out.append(torch.stack([min_max(m) for m in maps]))
    return torch.stack(out).float()


@pytest.fixture
def toy_adapter():
    namespace = {"ToyViT": ToyViT}
    exec(compile(doc_example(), str(DOC), "exec"), namespace)  # registers the family (@legrad.register_tower)
    yield namespace["ToyAdapter"]
    unregister_tower(namespace["ToyAdapter"])


def test_the_example_is_short():
    lines = [line for line in doc_example().splitlines() if line.strip()]
    assert len(lines) <= 40, len(lines)


def test_toy_family_matches_the_oracle(toy_adapter):
    torch.manual_seed(0)
    model = ToyViT().eval()
    image = torch.randn(2, 3, 24, 24)
    text = F.normalize(torch.randn(3, 16), dim=-1)
    wrapper = legrad.LeWrapper(model)  # the drift guard runs here: the re-run equals model(image)
    assert isinstance(wrapper.adapter, toy_adapter)
    for layer_index in (0, -1):
        got = wrapper.compute_legrad(text, image=image, layer_index=layer_index)
        want = oracle(model, image, text, layer_index % 3)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_toy_family_gets_the_baselines_and_return_scores(toy_adapter):
    from legrad.eval.baselines import gradcam

    torch.manual_seed(1)
    model = ToyViT().eval()
    image = torch.randn(1, 3, 24, 24)
    text = F.normalize(torch.randn(2, 16), dim=-1)
    wrapper = legrad.LeWrapper(model)
    out = wrapper.compute_legrad(text, image=image, return_scores=True)
    with torch.no_grad():
        features = F.normalize(model(image), dim=-1)
    torch.testing.assert_close(out.image_features, features, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.scores, features @ text.t(), atol=1e-5, rtol=0)
    assert gradcam(wrapper, text, image).shape == (1, 2, 24, 24)


def test_toy_family_drift_is_refused(toy_adapter):
    torch.manual_seed(2)
    model = ToyViT().eval()
    model.blocks[1].forward = lambda x: x  # the model no longer computes what the family declares
    with pytest.raises(legrad.DriftError, match="toy ViT"):
        legrad.LeWrapper(model)

"""The block runner (legrad.adapters.runner) and the adapter protocol: the pooled-gradient step against the
plain block, missing capabilities, no base-method re-assignment, no class state written by from_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from legrad.adapters.base import MissingCapability, TowerAdapter
from legrad.adapters.classifiers.base import ClassifierAdapter
from legrad.adapters.registry import adapter_classes
from legrad.adapters.runner import Block, Run, chain, explained_block, plain_block, traced_block
from legrad.ops.attention import attention_ops_for


def _block(post_norm: bool, seed: int = 0) -> tuple[Block, nn.Module]:
    torch.manual_seed(seed)
    width = 16
    parts = nn.ModuleDict(dict(n1=nn.LayerNorm(width), n2=nn.LayerNorm(width), fc1=nn.Linear(width, 32),
                               act=nn.GELU(), fc2=nn.Linear(32, width),
                               attn=nn.MultiheadAttention(width, 2, batch_first=True))).double().eval()
    gamma = torch.rand(width, dtype=torch.float64) + 0.5
    with torch.no_grad():
        for n in (parts.n1, parts.n2):
            n.weight.add_(torch.randn(width, dtype=torch.float64) * 0.2)
    if post_norm:
        block = Block(attn=attention_ops_for(parts.attn), scale1=chain(parts.n1), mlp_in=chain(parts.fc1, parts.act),
                      mlp_out=chain(parts.fc2), scale2=chain(parts.n2), post_norm=True)
    else:
        block = Block(attn=attention_ops_for(parts.attn), norm1=chain(parts.n1), norm2=chain(parts.n2),
                      mlp_in=chain(parts.fc1, parts.act), mlp_out=chain(parts.fc2), scale2=lambda y: y * gamma)
    return block, parts, gamma


def _obvious(parts, gamma, x, post_norm):
    """The block written out with the modules' own forwards."""
    if post_norm:
        x = x + parts.n1(parts.attn(x, x, x, need_weights=False)[0])
        return x + parts.n2(parts.fc2(parts.act(parts.fc1(x))))
    h = parts.n1(x)
    x = x + parts.attn(h, h, h, need_weights=False)[0]
    return x + gamma * parts.fc2(parts.act(parts.fc1(parts.n2(x))))


@pytest.mark.parametrize("post_norm", [False, True])
def test_the_three_modes_agree_with_the_modules_forward(post_norm):
    block, parts, gamma = _block(post_norm)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    run = Run(x, [block], prefix=1)
    head = nn.Linear(16, 4).double()
    with torch.no_grad():
        want = _obvious(parts, gamma, x, post_norm)
        plain = plain_block(block, x, run)
        step, x_next = explained_block(0, block, x, run, lambda p: head(p))
        traced, tstep = traced_block(0, block, x, run)
    torch.testing.assert_close(plain, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(x_next, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(traced, want, atol=1e-12, rtol=0)
    # the pooled-gradient step: the feature is head(token mean of the block output), as a function of O
    torch.testing.assert_close(step.feature.detach(), head(want.mean(1)).detach(), atol=1e-12, rtol=0)
    assert step.out.requires_grad and step.out.is_leaf and step.num_prefix_tokens == 1
    (g,) = torch.autograd.grad(step.feature.sum(), step.out)
    o = step.out.detach().clone().requires_grad_(True)
    h = block.norm1(x)
    x1 = x + block.scale1(block.attn.out(o, h))
    y = x1 + block.scale2(block.mlp_out(block.mlp_in(block.norm2(x1))))
    (g_want,) = torch.autograd.grad(head(y.mean(1)).sum(), o)
    torch.testing.assert_close(g, g_want, atol=1e-12, rtol=0)
    assert tstep.tokens is not None and tstep.feature is traced


class _Bare(TowerAdapter):
    family = "bare test family"

    @classmethod
    def from_model(cls, model):
        return None


def test_missing_capabilities_are_type_errors_naming_family_and_method():
    adapter = _Bare(nn.Identity())
    for call, method in [(lambda: adapter.trace(torch.zeros(1), torch.float32), "traced forward"),
                         (lambda: adapter.own_output(None, None), "own_output"),
                         (lambda: adapter.readout(torch.zeros(1, 2, 3)), "readout"),
                         (lambda: adapter.depth, "depth"),
                         (lambda: adapter.readout_space, "embed_dim")]:
        with pytest.raises(TypeError, match=rf"bare test family adapter has no {method}") as info:
            call()
        assert isinstance(info.value, (MissingCapability, NotImplementedError))


def _owner(value) -> str | None:
    fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    qual = getattr(fn, "__qualname__", None)
    return None if qual is None or "<lambda>" in qual else qual.split(".")[0]


def test_no_adapter_class_reassigns_another_class_method():
    for cls in adapter_classes():
        for klass in cls.__mro__:
            if not klass.__module__.startswith("legrad."):
                continue
            for name, value in vars(klass).items():
                owner = _owner(value)
                if callable(value) or isinstance(value, property):
                    assert owner in (None, klass.__name__), f"{klass.__name__}.{name} is {owner}'s method"


def test_from_model_leaves_class_entry_points_alone():
    from helpers.tiny_towers import build_tiny

    from legrad import LeWrapper
    from legrad.adapters.openclip import OpenClipViTAdapter

    before = OpenClipViTAdapter.entry_points
    adapter = LeWrapper(build_tiny("coca_base")).adapter
    assert type(adapter) is OpenClipViTAdapter and "compute_legrad_coca" in adapter.entry_points
    assert OpenClipViTAdapter.entry_points == before and "compute_legrad_coca" not in before


def test_each_open_clip_config_is_claimed_by_one_family_and_never_by_a_classifier():
    import open_clip

    for name in ("ViT-B-16", "coca_ViT-B-32", "ViT-B-16-SigLIP", "EVA02-B-16", "EVA01-g-14-plus", "PE-Core-B-16"):
        cfg = open_clip.get_model_config(name)
        claimed = [cls for cls in adapter_classes() if cls.supports_config(cfg)]
        assert len(claimed) == 1 and not issubclass(claimed[0], ClassifierAdapter), (name, claimed)

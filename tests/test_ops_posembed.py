"""Positional-embedding resampling and its cache."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from legrad.ops.posembed import resample_grid_embedding, resampled_embedding


@pytest.mark.parametrize("old,new", [((4, 4), (8, 8)), ((7, 7), (5, 9)), ((3, 5), (3, 5)), ((6, 6), (2, 3))])
def test_matches_timm_resample(old, new):
    pos = torch.randn(1 + old[0] * old[1], 16)
    ours = resample_grid_embedding(pos, old, new, num_prefix_tokens=1)
    ref = resample_abs_pos_embed(pos[None], new_size=list(new), old_size=list(old), num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True)[0]
    assert ours.shape == (1 + new[0] * new[1], 16)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[0], pos[0])  # the CLS position is unchanged


def test_resampled_embedding_reads_current_values_and_never_writes():
    pos = torch.nn.Parameter(torch.randn(17, 8))
    original = pos.detach().clone()
    a = resampled_embedding(pos, (4, 4), (6, 6), 1, torch.float32)
    assert not a.requires_grad and torch.equal(pos.detach(), original)
    torch.testing.assert_close(a, resample_grid_embedding(original, (4, 4), (6, 6)), atol=0, rtol=0)
    with torch.no_grad():
        pos.mul_(2)
    torch.testing.assert_close(resampled_embedding(pos, (4, 4), (6, 6), 1, torch.float32),
                               resample_grid_embedding(pos.detach(), (4, 4), (6, 6)), atol=0, rtol=0)


def _swap_assign(model, sd):
    model.load_state_dict(sd, assign=True)


def _swap_data(model, sd):
    for name, p in model.named_parameters():
        p.data = sd[name].clone()


@pytest.mark.parametrize("swap", [_swap_assign, _swap_data])
@pytest.mark.parametrize("kind", ["open_clip", "timm"])
def test_weight_swaps_are_seen_at_non_native_sizes(swap, kind):
    """Maps after replacing the weights (new tensors, possibly at a freed address) equal a fresh wrapper's."""
    from helpers.models import make_tiny_vit, rand_image, unit_text
    from helpers.tiny_towers import build_tiny, random_image, random_text

    from legrad import LeWrapper

    if kind == "open_clip":
        models = [make_tiny_vit(seed=s) for s in (0, 5, 6)]
        image, text = rand_image(1, 48, 40), unit_text(2)  # 6x5 grid; the model's own is 4x4
    else:
        models = [build_tiny("EVA02-B-16", seed=s) for s in (0, 5, 6)]
        image, text = random_image(1, 64, 48), random_text(2, 32)
    refs = [LeWrapper(m, apply_correction=False).compute_legrad(text, image=image) for m in models]
    assert min((refs[i] - refs[i - 1]).abs().max() for i in range(3)) > 1e-3  # three different weight sets
    sds = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    model = models[0]
    wrapper = LeWrapper(model, apply_correction=False)
    wrapper.compute_legrad(text, image=image)  # a first call at the non-native size
    for i in range(1, 10):  # new tensors each time; freed addresses get reused by the next swap's tensors
        swap(model, {k: v.clone() for k, v in sds[i % 3].items()})
        torch.testing.assert_close(wrapper.compute_legrad(text, image=image), refs[i % 3], atol=1e-6, rtol=0)

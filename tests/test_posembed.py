"""Positional-embedding resampling and its cache."""

from __future__ import annotations

import threading

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from legrad.posembed import PosEmbedCache, resample_grid_embedding


@pytest.mark.parametrize("old,new", [((4, 4), (8, 8)), ((7, 7), (5, 9)), ((3, 5), (3, 5)), ((6, 6), (2, 3))])
def test_matches_timm_resample(old, new):
    pos = torch.randn(1 + old[0] * old[1], 16)
    ours = resample_grid_embedding(pos, old, new, num_prefix_tokens=1)
    ref = resample_abs_pos_embed(pos[None], new_size=list(new), old_size=list(old), num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True)[0]
    assert ours.shape == (1 + new[0] * new[1], 16)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[0], pos[0])  # the CLS position is unchanged


def test_cache_hits_never_write_and_invalidate_on_inplace_change():
    pos = torch.nn.Parameter(torch.randn(17, 8))
    original = pos.detach().clone()
    cache = PosEmbedCache(max_entries=2)
    a = cache.get(pos, (4, 4), (6, 6), 1, torch.float32)
    assert cache.get(pos, (4, 4), (6, 6), 1, torch.float32) is a
    assert not a.requires_grad
    assert torch.equal(pos.detach(), original)
    with torch.no_grad():
        pos.mul_(2)
    b = cache.get(pos, (4, 4), (6, 6), 1, torch.float32)
    assert b is not a
    torch.testing.assert_close(b, resample_grid_embedding(pos.detach(), (4, 4), (6, 6)))
    for g in [(2, 2), (3, 3), (5, 5)]:  # LRU bound
        cache.get(pos, (4, 4), g, 1, torch.float32)
    assert len(cache._entries) == 2


def test_cache_threads():
    pos = torch.randn(17, 8)
    cache = PosEmbedCache()
    out = {}

    def run(k):
        out[k] = cache.get(pos, (4, 4), (2 + k % 3, 3), 1, torch.float32)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(9)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for k, v in out.items():
        torch.testing.assert_close(v, resample_grid_embedding(pos, (4, 4), (2 + k % 3, 3)))

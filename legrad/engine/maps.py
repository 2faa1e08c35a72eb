"""From patch-grid relevance to heatmaps: per-image grids, bilinear upsampling, min-max normalisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["upsample", "min_max", "grid_maps"]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) upsampling of ``[B, P, gh, gw]`` to ``[B, P, H, W]``."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalises ``[B, P, ...]`` per (image, prompt); a constant map becomes all zeros.

    Args:
        maps: ``[B, P, H, W]`` maps (or ``[B, P, N]`` patch relevance).

    Returns:
        A tensor of ``maps``' shape and dtype, each ``[b, p]`` slice in [0, 1].
    """
    flat = maps.flatten(2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    rng = hi - lo
    ok = rng > torch.finfo(flat.dtype).tiny
    out = torch.where(ok, (flat - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(flat))
    return out.reshape(maps.shape)


def _finish(rel: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], output_size: str | tuple[int, int] | None,
            work: torch.dtype, correct: Callable[[torch.Tensor], torch.Tensor] | None,
            normalize_on_grid: bool, normalize: bool = True) -> torch.Tensor:
    gh, gw = grid
    rel = rel[..., : gh * gw]  # the image's own patches; padding (NaFlex) is dropped
    if correct is not None:
        rel = correct(rel)
    maps = rel.reshape(rel.shape[0], rel.shape[1], gh, gw).to(work)
    if not normalize:  # raw relevance: comparable across prompts and images
        return maps if output_size == "grid" else upsample(maps, size if output_size is None else output_size)
    if normalize_on_grid:
        maps = min_max(maps)
    if output_size != "grid":
        maps = upsample(maps, size if output_size is None else output_size)
    # Bilinear upsampling keeps a normalised grid in [0, 1] but rarely reaches 0 and 1 (interior grid
    # values are never sampled exactly): normalising on the grid is a different map, not a shortcut.
    return maps if normalize_on_grid else min_max(maps)


def grid_maps(rel: torch.Tensor, grids: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]],
              output_size: str | tuple[int, int] | None = None, *, work_dtype: torch.dtype | None = torch.float32,
              correct: Callable[[torch.Tensor], torch.Tensor] | None = None,
              normalize_on_grid: bool = False, normalize: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Heatmaps from relevance on the patch grids of a batch.

    Args:
        rel: ``[B, P, N]`` relevance; image ``b``'s map is its first ``gh_b * gw_b`` columns.
        grids: ``(gh, gw)`` per image.
        sizes: ``(H, W)`` per image (its maps' size when ``output_size`` is None).
        output_size: None, ``"grid"`` (no upsampling) or ``(h, w)``.
        work_dtype: dtype of upsampling and normalisation (None: ``rel``'s dtype promoted to float32).
        correct: optional ``[b, P, n] -> [b, P', n]`` applied on each image's patch columns before
            upsampling (the empty-prompt correction).
        normalize_on_grid: min-max normalise the patch grid and upsample that, without normalising
            again (legrad-torch 1.1's order on SigLIP towers); default: upsample, then normalise.
        normalize: False: no min-max at all, the raw relevance (upsampled unless ``"grid"``).

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1] (raw relevance when not ``normalize``) when every image
        has the same grid and size, otherwise
        a list of ``[P, H_b, W_b]``.
    """
    work = torch.promote_types(rel.dtype, torch.float32) if work_dtype is None else work_dtype
    if len(set(grids)) == 1 and len(set(sizes)) == 1:
        return _finish(rel, grids[0], sizes[0], output_size, work, correct, normalize_on_grid, normalize).float()
    maps = [_finish(rel[b : b + 1], grids[b], sizes[b], output_size, work, correct, normalize_on_grid,
                    normalize)[0].float()
            for b in range(rel.shape[0])]
    if len({tuple(m.shape) for m in maps}) == 1:
        return torch.stack(maps)
    return maps

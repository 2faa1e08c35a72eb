"""Absolute positional embeddings for a new patch grid, computed on the fly from the current weights.

The model's own embedding is never written to: a resampled copy is built per call. There is no cache:
one keyed on the parameter's storage and version counter served stale values after
``load_state_dict(..., assign=True)`` or ``p.data = ...`` (new tensors can reuse a freed address), and
what it saved is small: resampling ViT-B-16's embedding takes ~3 ms for a 28x28 grid (0.2% of that
tower's 448 px forward, one CPU thread) and ~24 ms for 64x64 (1024 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resample_grid_embedding", "resampled_embedding"]


def resample_grid_embedding(
    pos: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resamples the grid part of an absolute positional embedding.

    The prefix rows (CLS, registers) are kept unchanged; the grid rows are resampled bicubically
    with antialiasing (``align_corners=False``), the same rule as
    ``timm.layers.resample_abs_pos_embed(..., interpolation='bicubic', antialias=True)``.

    Args:
        pos: ``[num_prefix + gh0 * gw0, C]`` (or with a leading batch dim of 1).
        old_grid: ``(gh0, gw0)``, the grid ``pos`` was trained for.
        new_grid: ``(gh, gw)``.
        num_prefix_tokens: rows at the start that are not grid positions.

    Returns:
        ``[num_prefix + gh * gw, C]`` (leading dim preserved), float32 or wider.
    """
    squeeze = pos.ndim == 2
    p = pos.unsqueeze(0) if squeeze else pos
    if tuple(new_grid) == tuple(old_grid):
        return p[0] if squeeze else p
    prefix, grid = p[:, :num_prefix_tokens], p[:, num_prefix_tokens:]
    c = grid.shape[-1]
    work = torch.promote_types(grid.dtype, torch.float32)
    grid = grid.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).to(work)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c)
    out = torch.cat([prefix.to(work), grid], dim=1)
    return out[0] if squeeze else out


def resampled_embedding(
    pos: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``resample_grid_embedding(pos, ...)`` of the parameter's current values, detached, in ``dtype``."""
    with torch.no_grad():
        return resample_grid_embedding(pos.detach(), old_grid, new_grid, num_prefix_tokens).to(dtype)

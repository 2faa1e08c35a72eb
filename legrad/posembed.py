"""Absolute positional embeddings for a new patch grid, computed on the fly and cached.

The model's own embedding is never written to: a resampled copy is built per grid size and kept in a
small thread-safe cache that notices when the source parameter changes (in-place updates bump its
version counter).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

__all__ = ["resample_grid_embedding", "PosEmbedCache"]


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


class PosEmbedCache:
    """Thread-safe LRU cache of resampled embeddings keyed by grid, dtype, device and source version."""

    def __init__(self, max_entries: int = 8):
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_entries

    def __getstate__(self) -> dict:
        # Locks cannot be pickled or deep-copied; the cached tensors are cheap to rebuild.
        return {"_max": self._max}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_max"])

    def get(
        self,
        pos: torch.Tensor,
        old_grid: tuple[int, int],
        new_grid: tuple[int, int],
        num_prefix_tokens: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Returns ``resample_grid_embedding(pos, ...)`` in ``dtype``, detached, from the cache if possible."""
        key = (
            pos.data_ptr(), pos._version, tuple(pos.shape), str(pos.device), tuple(old_grid), tuple(new_grid),
            num_prefix_tokens, dtype,
        )
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        with torch.no_grad():
            value = resample_grid_embedding(pos.detach(), old_grid, new_grid, num_prefix_tokens).to(dtype)
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return value

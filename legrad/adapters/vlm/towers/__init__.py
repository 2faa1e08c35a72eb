"""The vision towers of the VLM families, declared once per tower kind for the block runner
(:mod:`legrad.adapters.runner`) and shared by every family built on them.

A tower kind says what its blocks are made of (:class:`~legrad.adapters.runner.Block`) and which tokens
enter block 0 for one call (:class:`~legrad.adapters.runner.Run`); the runner then runs it plainly (blocks
below the explained ones, the drift guard's re-run, the unchanged model's scores) or with an explained
block's attention output as the leaf. What the family does with a block's output tokens (post-norm,
projector, merger, pooling) is the family's feature path, not the tower's.
"""

from __future__ import annotations

from torch import nn

from .common import ClipTower, Idefics3Tower, SiglipTower, VisionTower
from .internvit import InternViTAttentionOps, InternViTTower
from .pixtral import PixtralAttentionOps, PixtralTower, rms_norm_fn
from .qwen import Qwen3ViTTower, Qwen25ViTTower, QwenViTAttentionOps, QwenViTTower, qwen_rms_norm

__all__ = ["VisionTower", "ClipTower", "SiglipTower", "QwenViTTower", "Qwen25ViTTower", "Qwen3ViTTower",
           "QwenViTAttentionOps", "qwen_rms_norm", "InternViTTower", "InternViTAttentionOps", "Idefics3Tower",
           "PixtralTower", "PixtralAttentionOps", "rms_norm_fn", "TOWER_KINDS", "tower_for"]

#: Every tower kind by its name (what a family's ``tower_kind`` names); one line per kind.
TOWER_KINDS: dict[str, type[VisionTower]] = {t.kind: t for t in (
    ClipTower,
    SiglipTower,
    Idefics3Tower,
    QwenViTTower,
    Qwen25ViTTower,
    Qwen3ViTTower,
    InternViTTower,
    PixtralTower,
)}


def tower_for(kind: str, module: nn.Module, owner: str) -> VisionTower:
    """The declared tower of kind ``kind`` (a key of :data:`TOWER_KINDS`) over ``module``."""
    return TOWER_KINDS[kind](module, owner)

"""The vision towers of the VLM families, declared once per tower kind for the block runner
(:mod:`legrad.adapters.runner`) and shared by every family built on them.

A tower kind says what its blocks are made of (:class:`~legrad.adapters.runner.Block`) and which tokens
enter block 0 for one call (:class:`~legrad.adapters.runner.Run`); the runner then runs it plainly (blocks
below the explained ones, the drift guard's re-run, the unchanged model's scores) or with an explained
block's attention output as the leaf. What the family does with a block's output tokens (post-norm,
projector, merger, pooling) is the family's feature path, not the tower's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ...ops.functional import layer_norm
from ..hf.common import hf_block
from ..runner import Block, Run

__all__ = ["VisionTower", "ClipTower", "SiglipTower", "TOWER_KINDS", "tower_for"]


class VisionTower:
    """One tower kind: its blocks for the runner and the tokens entering block 0.

    Attributes:
        module: the vision transformer (the module holding ``embeddings`` and ``encoder``).
    """

    #: Name of the kind in messages and the docs' family table.
    kind: ClassVar[str] = "abstract"
    #: Leading tokens of the tower's sequence that are not patches (CLS).
    prefix: ClassVar[int] = 0

    def __init__(self, module: nn.Module, owner: str):
        self.module = module
        self.check(owner)

    def check(self, owner: str) -> None:
        """Raises TypeError when ``module`` does not have this kind's layout (``owner`` names the model)."""

    @property
    def layers(self) -> list[nn.Module]:
        """The tower's blocks (modules), in order."""
        raise NotImplementedError

    def blocks(self) -> list[Block]:
        """Every block, declared for the runner."""
        raise NotImplementedError

    def declare(self, pixels: Any, dtype: torch.dtype) -> Run:
        """The call's :class:`Run` (tokens in the tower's dtype; the caller casts them for explained blocks)."""
        raise NotImplementedError

    @property
    def config(self) -> Any:
        return self.module.config


class _EncoderTower(VisionTower):
    """CLIP/SigLIP layout: ``embeddings``, ``encoder.layers[*]`` with ``layer_norm1``, ``self_attn``,
    ``layer_norm2``, ``mlp``."""

    def check(self, owner: str) -> None:
        v = self.module
        attrs = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
        if not (hasattr(v, "embeddings") and hasattr(v, "encoder")
                and all(all(hasattr(blk, a) for a in attrs) for blk in v.encoder.layers)):
            raise TypeError(f"{owner}'s vision tower does not have the {self.kind} layout legrad expects (embeddings, "
                            "encoder.layers[*].self_attn/mlp/layer_norm1/2)")

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.module.encoder.layers)

    def blocks(self) -> list[Block]:
        return [hf_block(layer) for layer in self.module.encoder.layers]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.embeddings(pixels)

    def declare(self, pixels: torch.Tensor, dtype: torch.dtype) -> Run:
        return Run(tokens=self.embed(pixels.to(dtype)), blocks=self.blocks(), prefix=self.prefix)


class ClipTower(_EncoderTower):
    """transformers ``CLIPVisionTransformer``: class token, ``pre_layrnorm`` before block 0."""

    kind = "CLIP"
    prefix = 1

    def check(self, owner: str) -> None:
        if not hasattr(self.module, "pre_layrnorm"):
            raise TypeError(f"{owner} with a {type(self.module).__name__} vision tower is not supported (CLIP only)")
        super().check(owner)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return layer_norm(self.module.pre_layrnorm, self.module.embeddings(pixels))


class SiglipTower(_EncoderTower):
    """transformers ``SiglipVisionTransformer``: no class token; ``post_layernorm`` (and the head) belong to
    the families' feature paths."""

    kind = "SigLIP"
    prefix = 0

    def check(self, owner: str) -> None:
        if not hasattr(self.module, "post_layernorm") or hasattr(self.module, "pre_layrnorm"):
            raise TypeError(f"{owner} with a {type(self.module).__name__} vision tower is not supported "
                            "(SigLIP only)")
        super().check(owner)


#: Every tower kind by its name (what a family's ``tower_kind`` names).
TOWER_KINDS: dict[str, type[VisionTower]] = {t.kind: t for t in (ClipTower, SiglipTower)}


def tower_for(kind: str, module: nn.Module, owner: str) -> VisionTower:
    """The declared tower of kind ``kind`` (a key of :data:`TOWER_KINDS`) over ``module``."""
    return TOWER_KINDS[kind](module, owner)

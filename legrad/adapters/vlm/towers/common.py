"""The tower kinds every encoder-style VLM shares: the :class:`VisionTower` interface, CLIP, SigLIP and
Idefics3's SigLIP (blocks and embeddings of transformers' CLIP/SigLIP vision encoders)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ....ops.functional import layer_norm
from ...hf.common import hf_block
from ...runner import Block, Run

__all__ = ["VisionTower", "ClipTower", "SiglipTower", "Idefics3Tower"]


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

    @property
    def width(self) -> int:
        """Channels of the tower's tokens."""
        return int(self.config.hidden_size)

    @property
    def heads(self) -> int:
        """Attention heads of a block."""
        return int(self.config.num_attention_heads)


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


class Idefics3Tower(SiglipTower):
    """transformers ``Idefics3VisionTransformer`` / ``SmolVLMVisionTransformer``: SigLIP blocks whose embeddings take
    a ``patch_attention_mask`` (NaViT-style positions for padded images). Declared for whole images (every patch
    real: positions are then the plain raster ones, as the model computes them from an all-true mask)."""

    kind = "Idefics3 SigLIP"

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        p = int(self.config.patch_size)
        mask = torch.ones(pixels.shape[0], pixels.shape[-2] // p, pixels.shape[-1] // p, dtype=torch.bool,
                          device=pixels.device)
        return self.module.embeddings(pixels, patch_attention_mask=mask)

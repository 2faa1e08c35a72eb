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

from ...ops.attention import AttentionOps, merge_heads
from ...ops.functional import layer_norm, linear
from ..hf.common import activation, hf_block
from ..runner import Block, Run, chain

__all__ = ["VisionTower", "ClipTower", "SiglipTower", "QwenViTTower", "QwenViTAttentionOps", "TOWER_KINDS",
           "tower_for", "Idefics3Tower"]


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class QwenViTAttentionOps(AttentionOps):
    """The Qwen ViT's ``VisionAttention``: fused ``qkv``, 2-D rotary embedding on queries and keys (in float32, as
    the model applies it), ``proj``. ``rope`` is ``[2, N, hd]``: the model's own ``(cos, sin)``."""

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    @property
    def scale(self) -> float:
        return float(self.module.scaling)

    def qkv(self, x_q, x_kv=None, *, rope=None):
        if x_kv is not None:
            raise ValueError("the Qwen ViT's attention is self-attention")
        b, n, _ = x_q.shape
        q, k, v = linear(self.module.qkv, x_q).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            cos, sin = rope[0].float(), rope[1].float()
            q, k = ((t.float() * cos + _rotate_half(t.float()) * sin).to(t.dtype) for t in (q, k))
        return q, k, v

    def out(self, o, x_in=None):
        return linear(self.module.proj, merge_heads(o))


class QwenViTTower(VisionTower):
    """transformers' Qwen2-VL vision transformer (``Qwen2VisionTransformerPretrainedModel``): ``patch_embed`` over
    flattened patches, 2-D rotary positions, pre-norm blocks (``norm1``, ``attn``, ``norm2``, ``mlp``) attending
    within each image (one image per row here), tokens in the processor's 2 x 2 merge-window order.

    Its input is ``(pixel_values [images * N, C * T * P * P], image_grid_thw [images, 3])``; the images of one
    call share one grid (a row each)."""

    kind = "Qwen ViT"
    prefix = 0

    def check(self, owner: str) -> None:
        v = self.module
        attrs = ("norm1", "attn", "norm2", "mlp")
        if not (hasattr(v, "patch_embed") and hasattr(v, "rotary_pos_emb") and hasattr(v, "blocks")
                and all(all(hasattr(blk, a) for a in attrs) and hasattr(blk.attn, "qkv") for blk in v.blocks)):
            raise TypeError(f"{owner}'s vision tower does not have the Qwen ViT layout legrad expects (patch_embed, "
                            "rotary_pos_emb, blocks[*].norm1/attn.qkv/norm2/mlp)")

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.module.blocks)

    @property
    def width(self) -> int:
        return int(self.config.embed_dim)

    @property
    def heads(self) -> int:
        return int(self.config.num_heads)

    @property
    def merge(self) -> int:
        return int(self.config.spatial_merge_size)

    def _mlp_in(self, mlp: nn.Module):
        return lambda x: activation(mlp.act, linear(mlp.fc1, x))

    def blocks(self) -> list[Block]:
        return [Block(attn=QwenViTAttentionOps(blk.attn), norm1=chain(blk.norm1), norm2=chain(blk.norm2),
                      mlp_in=self._mlp_in(blk.mlp), mlp_out=chain(blk.mlp.fc2)) for blk in self.module.blocks]

    def declare(self, pixels: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> Run:
        from transformers.vision_utils import get_vision_position_ids

        values, grid = pixels
        images = grid.shape[0]
        x = self.module.patch_embed(values.to(dtype))  # the model's own patch embedding (a Conv3d, no state)
        positions = get_vision_position_ids(grid, self.merge).to(x.device)
        n = x.shape[0] // images
        cos, sin = self.module.rotary_pos_emb(x, positions[:n])
        return Run(tokens=x.reshape(images, n, -1), blocks=self.blocks(), prefix=0, rope=torch.stack([cos, sin]))


#: Every tower kind by its name (what a family's ``tower_kind`` names).
TOWER_KINDS: dict[str, type[VisionTower]] = {t.kind: t for t in (ClipTower, SiglipTower, QwenViTTower)}
TOWER_KINDS[Idefics3Tower.kind] = Idefics3Tower


def tower_for(kind: str, module: nn.Module, owner: str) -> VisionTower:
    """The declared tower of kind ``kind`` (a key of :data:`TOWER_KINDS`) over ``module``."""
    return TOWER_KINDS[kind](module, owner)

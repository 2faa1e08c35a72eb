"""The Qwen ViT tower kinds (Qwen2-VL; Qwen2.5-VL with window attention; Qwen3-VL / Qwen3.5 with a learned
position table): 2-D rotary positions, no class token, tokens in 2 x 2 merge-window order."""

from __future__ import annotations

import torch
from torch import nn

from ....ops.attention import AttentionOps, merge_heads
from ....ops.functional import linear, param
from ...hf.common import activation
from ...runner import Block, Fn, Run, chain
from .common import VisionTower

__all__ = ["rotate_half", "QwenViTAttentionOps", "QwenViTTower", "Qwen25ViTTower", "Qwen3ViTTower", "qwen_rms_norm"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
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
            q, k = ((t.float() * cos + rotate_half(t.float()) * sin).to(t.dtype) for t in (q, k))
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

    def norm(self, mod: nn.Module) -> Fn:
        """The tower's norm ``mod`` (its blocks' and its merger's) as a stateless function."""
        return chain(mod)

    def _mlp_in(self, mlp: nn.Module) -> Fn:
        return lambda x: activation(mlp.act, linear(mlp.fc1, x))

    def _mlp_out(self, mlp: nn.Module) -> Fn:
        return chain(mlp.fc2)

    def blocks(self, biases: list[torch.Tensor | None] | None = None) -> list[Block]:
        """Every block; ``biases``: each block's additive attention bias (None: attention over the whole image)."""
        biases = biases or [None] * len(self.module.blocks)
        return [Block(attn=QwenViTAttentionOps(blk.attn), norm1=self.norm(blk.norm1), norm2=self.norm(blk.norm2),
                      mlp_in=self._mlp_in(blk.mlp), mlp_out=self._mlp_out(blk.mlp), bias=bias)
                for blk, bias in zip(self.module.blocks, biases)]

    def embed(self, values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[images * N, C]`` entering block 0 (processor order)."""
        return self.module.patch_embed(values)  # the model's own patch embedding (a Conv3d, no state)

    def _biases(self, grid: torch.Tensor, device: torch.device) -> list[torch.Tensor | None]:
        """Each block's attention bias for images of patch grid ``grid`` ``[1, 3]`` (None: no bias)."""
        return [None] * len(self.module.blocks)

    def declare(self, pixels: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> Run:
        from transformers.vision_utils import get_vision_position_ids

        values, grid = pixels
        images = grid.shape[0]
        x = self.embed(values.to(dtype), grid)
        positions = get_vision_position_ids(grid, self.merge).to(x.device)
        n = x.shape[0] // images
        cos, sin = self.module.rotary_pos_emb(x, positions[:n])
        return Run(tokens=x.reshape(images, n, -1), blocks=self.blocks(self._biases(grid[:1], x.device)), prefix=0,
                   rope=torch.stack([cos, sin]))


def qwen_rms_norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen RMSNorm (``Qwen2_5_VLRMSNorm``) exactly as the model computes it: normalised in float32,
    cast back to ``x``'s dtype, then scaled by the weight (``[..., C]`` -> ``[..., C]``)."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
    return param(mod.weight, x.dtype) * y.to(x.dtype)


class Qwen25ViTTower(QwenViTTower):
    """transformers' Qwen2.5-VL vision transformer (``Qwen2_5_VisionTransformerPretrainedModel``): the Qwen ViT with
    RMSNorms, a gated MLP (``down(act(gate(x)) * up(x))``) and window attention: the blocks listed in
    ``fullatt_block_indexes`` attend over the whole image, the others within windows of
    ``window_size // merge // patch`` merge windows a side.

    The model permutes the tokens window by window and attends per window (``cu_seqlens``); legrad keeps the tokens
    in the processor's order and gives each windowed block an additive bias, ``-inf`` between tokens of different
    windows: the same attention (attention and MLPs commute with a permutation of the tokens), its matrix ``A_b``
    the full ``N x N`` one with zeros outside the windows, and no permutation to undo for the maps."""

    kind = "Qwen2.5 ViT"

    def check(self, owner: str) -> None:
        super().check(owner)
        cfg = self.config
        if not all(hasattr(blk.mlp, a) for blk in self.module.blocks for a in ("gate_proj", "up_proj", "down_proj")):
            raise TypeError(f"{owner}'s vision blocks do not have the gated MLP (gate_proj, up_proj, down_proj) legrad "
                            "expects")
        if cfg.window_size // cfg.spatial_merge_size // cfg.patch_size < 1:
            raise TypeError(f"{owner}: window_size {cfg.window_size} is smaller than one merge window")

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    @property
    def window(self) -> int:
        """Merge windows per side of an attention window."""
        cfg = self.config
        return int(cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)

    def norm(self, mod: nn.Module) -> Fn:
        return lambda x: qwen_rms_norm(mod, x)

    def _mlp_in(self, mlp: nn.Module) -> Fn:
        return lambda x: activation(mlp.act_fn, linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x)

    def _mlp_out(self, mlp: nn.Module) -> Fn:
        return chain(mlp.down_proj)

    def window_ids(self, grid: torch.Tensor) -> torch.Tensor:
        """``[N]`` the attention window of each token of an image of patch grid ``grid`` ``[1, 3]``, tokens in the
        processor's order; from the model's own window index (``get_vision_window_index``)."""
        from transformers.vision_utils import get_vision_window_index

        cfg = self.config
        index, cu = get_vision_window_index(grid.cpu(), spatial_merge_size=self.merge, window_size=cfg.window_size,
                                            patch_size=cfg.patch_size)
        unit = self.merge ** 2
        # index[j]: the merge window at position j of the model's window order; cu: the windows' token bounds there.
        window = torch.searchsorted(cu[1:].long(), torch.arange(len(index)) * unit, right=True)
        of_unit = torch.empty_like(index)
        of_unit[index] = window
        return of_unit.repeat_interleave(unit)  # each merge window's tokens are consecutive

    def _biases(self, grid: torch.Tensor, device: torch.device) -> list[torch.Tensor | None]:
        ids = self.window_ids(grid).to(device)
        bias = torch.zeros(len(ids), len(ids), device=device).masked_fill(ids[:, None] != ids[None, :], float("-inf"))
        full = {int(i) for i in self.config.fullatt_block_indexes}
        return [None if i in full else bias[None, None] for i in range(len(self.module.blocks))]


class Qwen3ViTTower(QwenViTTower):
    """transformers' Qwen3-VL / Qwen3.5 vision transformer (``Qwen3VLVisionModel``, ``Qwen3_5VisionModel``): the Qwen
    ViT with a learned position table resampled to each image's grid and added to the patch tokens (the model's own
    ``pos_embed`` and interpolation indices and weights), LayerNorms, ``linear_fc1``/``linear_fc2`` MLPs, attention over
    the whole image."""

    kind = "Qwen3 ViT"

    def check(self, owner: str) -> None:
        super().check(owner)
        if not hasattr(self.module, "pos_embed") or not all(
                hasattr(blk.mlp, "linear_fc1") and hasattr(blk.mlp, "linear_fc2") for blk in self.module.blocks):
            raise TypeError(f"{owner}'s vision tower does not have the Qwen3 ViT layout legrad expects (pos_embed, "
                            "blocks[*].mlp.linear_fc1/linear_fc2)")

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    def _mlp_in(self, mlp: nn.Module) -> Fn:
        return lambda x: activation(mlp.act_fn, linear(mlp.linear_fc1, x))

    def _mlp_out(self, mlp: nn.Module) -> Fn:
        return chain(mlp.linear_fc2)

    def embed(self, values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        v = self.module
        x = v.patch_embed(values)
        index, weight = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=v.num_grid_per_side, mode=v.interpolation_mode,
            align_corners=v.interpolation_align_corners, spatial_merge_size=self.merge)
        table = v.pos_embed.weight.detach()[index.to(x.device)]  # the embedding lookup, from detached weights
        return x + (table * weight.to(x.device)[:, :, None]).sum(1).to(x.dtype)

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

from ...ops.attention import AttentionOps, merge_heads, split_heads
from ...ops.functional import layer_norm, linear, param
from ..hf.common import activation, hf_block, mlp_in
from ..runner import Block, Fn, Run, chain, identity

__all__ = ["VisionTower", "ClipTower", "SiglipTower", "QwenViTTower", "QwenViTAttentionOps", "InternViTTower",
           "InternViTAttentionOps", "PixtralTower", "PixtralAttentionOps", "TOWER_KINDS", "tower_for"]


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


def _internvit_norm(mod: nn.Module) -> Fn:
    """InternViT's norms, statelessly: ``nn.LayerNorm``, its ``InternVLVisionRMSNorm`` (normalised in float32,
    cast back, then the gain, as the model does) or ``nn.Identity`` (q/k norms switched off)."""
    if isinstance(mod, nn.Identity):
        return identity
    if isinstance(mod, nn.LayerNorm):
        return lambda x: layer_norm(mod, x)

    def rms(x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
        return param(mod.weight, x.dtype) * y.to(x.dtype)

    return rms


def _is_internvit_norm(mod: Any) -> bool:
    return isinstance(mod, (nn.Identity, nn.LayerNorm)) or (
        type(mod).__name__ == "InternVLVisionRMSNorm" and hasattr(mod, "weight") and hasattr(mod, "variance_epsilon"))


class InternViTAttentionOps(AttentionOps):
    """InternViT's ``InternVLVisionAttention``: ``q_proj``/``k_proj``/``v_proj``, the optional q/k RMSNorm over
    all heads' channels (before the heads are split, as the model applies it), ``projection_layer``."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.q_norm, self.k_norm = _internvit_norm(module.q_norm), _internvit_norm(module.k_norm)

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    @property
    def scale(self) -> float:
        return float(self.module.scale)

    def qkv(self, x_q, x_kv=None, *, rope=None):
        self._no_rope(rope)
        if x_kv is not None and x_kv is not x_q:
            raise ValueError("InternViT's attention is self-attention")
        m, h = self.module, self.num_heads
        return (split_heads(self.q_norm(linear(m.q_proj, x_q)), h), split_heads(self.k_norm(linear(m.k_proj, x_q)), h),
                split_heads(linear(m.v_proj, x_q), h))

    def out(self, o, x_in=None):
        return linear(self.module.projection_layer, merge_heads(o))


class InternViTTower(VisionTower):
    """transformers ``InternVLVisionModel`` (InternViT): class token and absolute positions
    (``embeddings``), pre-norm blocks ``encoder.layer[*]`` (``layernorm_before``, ``attention`` with optional
    q/k RMSNorm, ``layernorm_after``, ``mlp``) with layer scales ``lambda_1``/``lambda_2`` on both branches;
    LayerNorm or RMSNorm by ``norm_type``. The final ``layernorm`` belongs to the family's feature path."""

    kind = "InternViT"
    prefix = 1

    def check(self, owner: str) -> None:
        v = self.module
        ok = hasattr(v, "embeddings") and hasattr(getattr(v, "encoder", None), "layer")
        for blk in getattr(getattr(v, "encoder", None), "layer", ()):
            attn = getattr(blk, "attention", None)
            ok = ok and all(hasattr(blk, a) for a in ("layernorm_before", "layernorm_after", "mlp", "lambda_1",
                                                      "lambda_2")) \
                and all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj",
                                                                                 "projection_layer")) \
                and all(_is_internvit_norm(getattr(m, n, None)) for m, n in (
                    (blk, "layernorm_before"), (blk, "layernorm_after"), (attn, "q_norm"), (attn, "k_norm")))
        if not ok:
            raise TypeError(f"{owner}'s vision tower does not have the InternViT layout legrad expects (embeddings, "
                            "encoder.layer[*].attention.q_proj/k_proj/v_proj/projection_layer/q_norm/k_norm, "
                            "layernorm_before/after, mlp, lambda_1/2)")

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.module.encoder.layer)

    def blocks(self) -> list[Block]:
        def gain(p: torch.Tensor) -> Fn:
            return lambda x: x * param(p, x.dtype)

        return [Block(attn=InternViTAttentionOps(blk.attention), norm1=_internvit_norm(blk.layernorm_before),
                      scale1=gain(blk.lambda_1), norm2=_internvit_norm(blk.layernorm_after), mlp_in=mlp_in(blk.mlp),
                      mlp_out=chain(blk.mlp.fc2), scale2=gain(blk.lambda_2)) for blk in self.module.encoder.layer]

    def declare(self, pixels: torch.Tensor, dtype: torch.dtype) -> Run:
        # The model's own embeddings (patch conv, class token, absolute positions; no state written).
        return Run(tokens=self.module.embeddings(pixels.to(dtype)), blocks=self.blocks(), prefix=self.prefix)


def _rms_norm(mod: nn.Module) -> Fn:
    """A transformers RMSNorm (``weight``, ``variance_epsilon``), statelessly: normalised in float32, cast back,
    then the gain, as the model does."""
    def rms(x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
        return param(mod.weight, x.dtype) * y.to(x.dtype)

    return rms


class PixtralAttentionOps(AttentionOps):
    """Pixtral's ``PixtralAttention``: ``q_proj``/``k_proj``/``v_proj``, the model's own 2-D rotary table applied to
    queries and keys (in their dtype, as the model does), ``o_proj``. ``rope`` is ``[2, B, N, hd]``: the model's own
    ``(cos, sin)`` of each row's image."""

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    @property
    def scale(self) -> float:
        return float(self.module.scaling)

    def qkv(self, x_q, x_kv=None, *, rope=None):
        if x_kv is not None and x_kv is not x_q:
            raise ValueError("Pixtral's attention is self-attention")
        m, h = self.module, self.num_heads
        q, k, v = (split_heads(linear(p, x_q), h) for p in (m.q_proj, m.k_proj, m.v_proj))
        if rope is not None:
            cos, sin = rope[0][:, None].to(q.dtype), rope[1][:, None].to(q.dtype)  # [B, 1, N, hd]: every head
            q, k = (t * cos + _rotate_half(t) * sin for t in (q, k))
        return q, k, v

    def out(self, o, x_in=None):
        return linear(self.module.o_proj, merge_heads(o))


class PixtralTower(VisionTower):
    """transformers ``PixtralVisionModel`` (Mistral 3's tower): ``patch_conv`` over an image of any size (its own
    ``image_sizes``), ``ln_pre`` (RMSNorm), 2-D rotary positions from the model's own table
    (``patch_positional_embedding``), pre-RMSNorm blocks ``transformer.layers[*]`` (``attention_norm``,
    ``attention``, ``ffn_norm``, gated ``feed_forward``); no class token, patches in raster order.

    The model packs the images of a call into one sequence with a block-diagonal mask; here each image is a row
    (the same attention), rows right-padded to the longest image with a key mask. Its input is
    ``(pixel_values [B, C, H, W], image_sizes [B, 2])`` (pixels; each image in the top-left corner)."""

    kind = "Pixtral"
    prefix = 0

    def check(self, owner: str) -> None:
        v = self.module
        ok = all(hasattr(v, a) for a in ("patch_conv", "ln_pre", "patch_positional_embedding")) \
            and hasattr(getattr(v, "transformer", None), "layers")
        for blk in getattr(getattr(v, "transformer", None), "layers", ()):
            attn, ff = getattr(blk, "attention", None), getattr(blk, "feed_forward", None)
            ok = ok and all(hasattr(getattr(blk, n, None), "variance_epsilon") for n in ("attention_norm", "ffn_norm")) \
                and all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and all(isinstance(getattr(ff, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")) \
                and hasattr(ff, "act_fn")
        if not ok:
            raise TypeError(f"{owner}'s vision tower does not have the Pixtral layout legrad expects (patch_conv, ln_pre, "
                            "patch_positional_embedding, transformer.layers[*].attention.q/k/v/o_proj, attention_norm, "
                            "ffn_norm, feed_forward.gate/up/down_proj)")

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.module.transformer.layers)

    @property
    def patch(self) -> int:
        return int(self.config.patch_size)

    def blocks(self) -> list[Block]:
        def gated(ff: nn.Module) -> Fn:
            return lambda x: activation(ff.act_fn, linear(ff.gate_proj, x)) * linear(ff.up_proj, x)

        return [Block(attn=PixtralAttentionOps(blk.attention), norm1=_rms_norm(blk.attention_norm),
                      norm2=_rms_norm(blk.ffn_norm), mlp_in=gated(blk.feed_forward),
                      mlp_out=chain(blk.feed_forward.down_proj)) for blk in self.module.transformer.layers]

    def declare(self, pixels: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> Run:
        values, sizes = pixels
        v, p = self.module, self.patch
        embeds = v.patch_conv(values.to(dtype))  # the model's own patch convolution (no state)
        grids = [(int(h) // p, int(w) // p) for h, w in sizes.tolist()]
        n = max(h * w for h, w in grids)
        tokens = embeds.new_zeros(len(grids), n, embeds.shape[1])
        rope = embeds.new_zeros(2, len(grids), n, v.patch_positional_embedding.inv_freq.shape[0] * 2)
        mask = torch.zeros(len(grids), n, dtype=torch.bool, device=embeds.device)
        for i, (h, w) in enumerate(grids):
            tokens[i, : h * w] = embeds[i, :, :h, :w].flatten(1).T  # raster order, as the model flattens it
            rows, cols = torch.meshgrid(torch.arange(h, device=embeds.device), torch.arange(w, device=embeds.device),
                                        indexing="ij")
            cos, sin = v.patch_positional_embedding(tokens, torch.stack([rows.flatten(), cols.flatten()], -1))
            rope[0, i, : h * w], rope[1, i, : h * w] = cos, sin
            mask[i, : h * w] = True
        return Run(tokens=_rms_norm(v.ln_pre)(tokens), blocks=self.blocks(), prefix=0, rope=rope,
                   key_mask=None if bool(mask.all()) else mask)


#: Every tower kind by its name (what a family's ``tower_kind`` names).
TOWER_KINDS: dict[str, type[VisionTower]] = {t.kind: t for t in (ClipTower, SiglipTower, QwenViTTower)}
TOWER_KINDS[InternViTTower.kind] = InternViTTower
TOWER_KINDS[PixtralTower.kind] = PixtralTower


def tower_for(kind: str, module: nn.Module, owner: str) -> VisionTower:
    """The declared tower of kind ``kind`` (a key of :data:`TOWER_KINDS`) over ``module``."""
    return TOWER_KINDS[kind](module, owner)

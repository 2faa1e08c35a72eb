"""The Pixtral tower kind (Mistral 3): images of any size, 2-D rotary positions from the model's own table,
RMSNorm, gated MLP; no class token, patches in raster order."""

from __future__ import annotations

import torch
from torch import nn

from ....ops.attention import AttentionOps, merge_heads, split_heads
from ....ops.functional import linear, param
from ...hf.common import activation
from ...runner import Block, Fn, Run, chain
from .common import VisionTower
from .qwen import rotate_half

__all__ = ["PixtralAttentionOps", "PixtralTower", "rms_norm_fn"]


def rms_norm_fn(mod: nn.Module) -> Fn:
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
            q, k = (t * cos + rotate_half(t) * sin for t in (q, k))
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

        return [Block(attn=PixtralAttentionOps(blk.attention), norm1=rms_norm_fn(blk.attention_norm),
                      norm2=rms_norm_fn(blk.ffn_norm), mlp_in=gated(blk.feed_forward),
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
        return Run(tokens=rms_norm_fn(v.ln_pre)(tokens), blocks=self.blocks(), prefix=0, rope=rope,
                   key_mask=None if bool(mask.all()) else mask)

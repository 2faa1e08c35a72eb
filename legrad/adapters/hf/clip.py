"""transformers ``CLIPModel``, ``MetaClip2Model``, ``AltCLIPModel``, ``ChineseCLIPModel``: ViT towers with
a CLS token, ``post_layernorm`` and ``visual_projection``. Layer feature: ``visual_projection(
post_layernorm(mean over all tokens of block l's output))``; LeGrad differentiates block l's
self-attention (the CLS column is dropped), as for the open_clip CLIP towers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ...ops.attention import merge_heads
from ...ops.functional import layer_norm, linear
from ..base import LayerStep
from .common import HFAdapter, activation, attn_scale, encoder_layer, mlp, sdpa, self_qkv

__all__ = ["HFClipAdapter"]


class HFClipAdapter(HFAdapter):
    """transformers ``CLIPModel``, ``MetaClip2Model``, ``AltCLIPModel``, ``ChineseCLIPModel``."""

    family = "transformers CLIPModel / MetaClip2Model / AltCLIPModel / ChineseCLIPModel"
    entry_points = ("compute_legrad", "compute_legrad_clip")
    hf_kind = "clip"

    @property
    def embed_dim(self) -> int:
        return self.model.visual_projection.out_features

    def _explained(self, layer: int, blk: nn.Module, x: torch.Tensor) -> tuple[LayerStep, torch.Tensor]:
        attn = blk.self_attn
        q, k, v = self_qkv(attn, layer_norm(blk.layer_norm1, x))
        scale = attn_scale(attn, q)
        o = sdpa(q, k, v, None, scale).detach().requires_grad_(True)
        with torch.enable_grad():
            x1 = x + linear(attn.out_proj, merge_heads(o))
            hidden = activation(blk.mlp.activation_fn, linear(blk.mlp.fc1, layer_norm(blk.layer_norm2, x1)))
            # fc2 is affine, so the token mean moves inside it: the graph keeps [B, C] instead of [B, N, C].
            pooled = x1.mean(1) + linear(blk.mlp.fc2, hidden.mean(1))
            feature = linear(self.model.visual_projection, layer_norm(self.visual.post_layernorm, pooled))
        with torch.no_grad():
            x_next = x1.detach() + linear(blk.mlp.fc2, hidden.detach())
        step = LayerStep(layer=layer, feature=feature, out=o, value=v, num_prefix_tokens=1, query=q, key=k,
                         scale=scale, block_output=x_next)
        return step, x_next

    def trace_tokens(self, image, compute_dtype):
        return layer_norm(self.visual.pre_layrnorm, self._embed(image)).to(compute_dtype), None

    def trace_block(self, layer, x, context):
        blk = self._layers[layer]
        attn = blk.self_attn
        h = layer_norm(blk.layer_norm1, x)
        q, k, v = self_qkv(attn, h)
        scale = attn_scale(attn, q)
        o = sdpa(q, k, v, None, scale)
        x = x + linear(attn.out_proj, merge_heads(o))
        x = x + mlp(blk.mlp, layer_norm(blk.layer_norm2, x))
        return x, LayerStep(layer=layer, feature=x, out=o, value=v.detach(), num_prefix_tokens=1,
                            query=q.detach(), key=k.detach(), scale=scale, tokens=h)

    def pooled_output(self, x):
        """``visual_projection(post_layernorm(CLS))``, what ``get_image_features`` returns."""
        return linear(self.model.visual_projection, layer_norm(self.visual.post_layernorm, x[:, 0]))

    def steps(self, image: torch.Tensor, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        x = layer_norm(self.visual.pre_layrnorm, self._embed(image))
        layers = self._layers
        for i in range(start):
            x = encoder_layer(layers[i], x, None)
        x = x.to(compute_dtype)
        for i in range(start, len(layers)):
            step, x = self._explained(i, layers[i], x)
            yield step
            del step  # free this layer's graph before building the next one

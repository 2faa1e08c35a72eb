"""The InternViT tower kind (InternVL): a class token, layer scales, optional q/k RMSNorm, LayerNorm or RMSNorm."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ....ops.attention import AttentionOps, merge_heads, split_heads
from ....ops.functional import layer_norm, linear, param
from ...hf.common import mlp_in
from ...runner import Block, Fn, Run, chain, identity
from .common import VisionTower

__all__ = ["InternViTAttentionOps", "InternViTTower"]


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

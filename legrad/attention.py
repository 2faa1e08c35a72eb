"""Attention recomputed from a module's own weights, exposing what LeGrad needs.

Fused attention kernels never materialise the post-softmax probabilities ``A``. LeGrad needs the
gradient of a score ``s`` with respect to ``A``; because the attention output is ``O = A V`` per head,
``ds/dA = (ds/dO) V^T``. So each attention type only has to produce per-head queries, keys and values,
the per-head output ``O`` (any kernel may compute it) and the output projection. One small class per
attention module type; adding a new module (e.g. open_clip's own ``Attention``) is one new class.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .functional import apply_module, param

__all__ = ["AttentionOps", "attention_ops_for", "merge_heads"]


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, hd]`` -> ``[B, N, H * hd]``."""
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


class AttentionOps:
    """Stateless view of one attention module: projections and the attention kernel.

    Subclasses set ``module_type`` and implement :meth:`qkv` and :meth:`out`.
    """

    module_type: ClassVar[type | tuple[type, ...]] = ()

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    def qkv(
        self, x_q: torch.Tensor, x_kv: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values ``[B, H, N, hd]`` in the inputs' dtype."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-head attention output ``O = softmax(q k^T * scale) v``, ``[B, H, Nq, hd]``."""
        return F.scaled_dot_product_attention(q, k, v)

    def probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Post-softmax attention probabilities ``[B, H, Nq, Nk]`` (for baselines and tests)."""
        scale = q.shape[-1] ** -0.5
        return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """Output projection of merged heads: ``[B, H, N, hd]`` -> ``[B, N, C]``."""
        raise NotImplementedError


class MultiheadAttentionOps(AttentionOps):
    """``torch.nn.MultiheadAttention`` (open_clip blocks, CoCa's AttentionalPooler)."""

    module_type = nn.MultiheadAttention

    def __init__(self, module: nn.MultiheadAttention):
        super().__init__(module)
        if module.bias_k is not None or module.add_zero_attn:
            raise TypeError("nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported by legrad")

    def qkv(self, x_q, x_kv=None):
        m = self.module
        x_kv = x_q if x_kv is None else x_kv
        dt = x_q.dtype
        e = m.embed_dim
        bias = param(m.in_proj_bias, dt)
        bq, bk, bv = (None, None, None) if bias is None else bias.split(e)
        if m._qkv_same_embed_dim:
            w = param(m.in_proj_weight, dt)
            wq, wk, wv = w.split(e)
        else:
            wq, wk, wv = (param(m.q_proj_weight, dt), param(m.k_proj_weight, dt), param(m.v_proj_weight, dt))
        if x_kv is x_q and m._qkv_same_embed_dim:
            q, k, v = F.linear(x_q, w, bias).chunk(3, dim=-1)
        else:
            q = F.linear(x_q, wq, bq)
            k = F.linear(x_kv, wk, bk)
            v = F.linear(x_kv, wv, bv)
        h = m.num_heads
        return _split_heads(q, h), _split_heads(k, h), _split_heads(v, h)

    def out(self, o):
        return apply_module(self.module.out_proj, merge_heads(o))


_REGISTRY: list[type[AttentionOps]] = [MultiheadAttentionOps]


def register_attention_ops(cls: type[AttentionOps]) -> type[AttentionOps]:
    """Class decorator adding an :class:`AttentionOps` implementation to the lookup table."""
    _REGISTRY.insert(0, cls)
    return cls


def attention_ops_for(module: nn.Module) -> AttentionOps:
    """Returns the :class:`AttentionOps` for an attention module.

    Raises:
        TypeError: if no implementation knows the module's type.
    """
    for cls in _REGISTRY:
        if cls.module_type and isinstance(module, cls.module_type):
            return cls(module)
    raise TypeError(f"legrad has no attention adapter for {type(module).__module__}.{type(module).__name__}")

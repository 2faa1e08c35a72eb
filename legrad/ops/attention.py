"""Attention recomputed from a module's own weights, exposing what LeGrad needs.

Fused attention kernels never materialise the post-softmax probabilities ``A``. LeGrad needs the
gradient of a score ``s`` with respect to ``A``; because the attention output is ``O = A V`` per head,
``ds/dA = (ds/dO) V^T``. So each attention type only has to produce per-head queries, keys and values,
the per-head output ``O`` (any kernel may compute it) and the output projection. One small class per
attention module type, all with the one signature of :class:`AttentionOps` (``qkv`` / ``attend`` /
``out`` / ``scale``); adding a new module (e.g. open_clip's own ``Attention``) is one new class.
"""

from __future__ import annotations

import functools
import importlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .functional import apply_module, linear, param

__all__ = [
    "AttentionOps",
    "attention_ops_for",
    "merge_heads",
    "split_heads",
    "MultiheadAttentionOps",
    "register_attention_ops",
    "TimmSelfAttentionOps",
    "LatentPoolOps",
    "HFSelfAttentionOps",
    "apply_rope",
    "exact_types",
]


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, hd]`` -> ``[B, N, H * hd]``."""
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H * hd]`` -> ``[B, H, N, hd]``."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


class AttentionOps:
    """Stateless view of one attention module: projections and the attention kernel.

    Every implementation has this one signature, so a block runner never needs to know which module it
    runs. Subclasses set ``module_type`` (or override :meth:`handles`) and implement :meth:`qkv` and
    :meth:`out`; :meth:`attend` and :attr:`scale` have defaults.
    """

    module_type: ClassVar[type | tuple[type, ...]] = ()

    def __init__(self, module: nn.Module):
        self.module = module

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        """Whether this implementation knows ``module`` (default: ``isinstance`` of :attr:`module_type`)."""
        return bool(cls.module_type) and isinstance(module, cls.module_type)

    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    @property
    def scale(self) -> float | None:
        """Softmax temperature of ``q k^T``; None for the default ``hd ** -0.5``."""
        return None

    def qkv(
        self, x_q: torch.Tensor, x_kv: torch.Tensor | None = None, *, rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries, keys and values ``[B, H, N, hd]`` in the inputs' dtype.

        Args:
            x_q: ``[B, Nq, C]`` tokens (or learned queries) the queries come from.
            x_kv: ``[B, Nk, C]`` tokens the keys and values come from (None: ``x_q``, self-attention).
            rope: ``[N, 2 * hd]`` rotary table (``[sin | cos]``) of the patch tokens, for rotary attention.
        """
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head attention output ``O = softmax(q k^T * scale + bias) v``, ``[B, H, Nq, hd]``.

        Args:
            bias: additive logit bias broadcastable to ``[B, H, Nq, Nk]`` (relative positions).
            key_mask: ``[B, Nk]`` bool, False for padded keys (never attended to).
        """
        mask = None if bias is None else bias.to(q.dtype)
        if key_mask is not None:
            keep = key_mask[:, None, None, :]
            mask = keep if mask is None else mask.masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def out(self, o: torch.Tensor, x_in: torch.Tensor | None = None) -> torch.Tensor:
        """Output projection of the heads: ``[B, H, N, hd]`` -> ``[B, N, C]``; ``x_in`` (the attention's
        input) only for gated attention."""
        raise NotImplementedError

    def _no_rope(self, rope: torch.Tensor | None) -> None:
        if rope is not None:
            raise ValueError(f"{type(self).__name__} has no rotary embedding")


class MultiheadAttentionOps(AttentionOps):
    """``torch.nn.MultiheadAttention`` (open_clip blocks, CoCa's AttentionalPooler)."""

    module_type = nn.MultiheadAttention

    def __init__(self, module: nn.MultiheadAttention):
        super().__init__(module)
        if module.bias_k is not None or module.add_zero_attn:
            raise TypeError("nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported by legrad")

    def qkv(self, x_q, x_kv=None, *, rope=None):
        self._no_rope(rope)
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
        return split_heads(q, h), split_heads(k, h), split_heads(v, h)

    def out(self, o, x_in=None):
        return apply_module(self.module.out_proj, merge_heads(o))


class HFSelfAttentionOps(AttentionOps):
    """transformers self-attention with separate ``q_proj``/``k_proj``/``v_proj`` and ``out_proj`` (CLIP,
    SigLIP and the vision towers of VLMs) or ``o_proj`` (ViT/DeiT classifiers). Not in the lookup table:
    the Hugging Face adapters check their layout and build it directly."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        out = getattr(module, "out_proj", None) or getattr(module, "o_proj", None)
        if not all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")) \
                or not isinstance(out, nn.Linear):
            raise TypeError(f"legrad expects q_proj/k_proj/v_proj/out_proj Linear layers in {type(module).__name__}")
        self.proj = out

    @property
    def num_heads(self) -> int:
        m = self.module
        return int(getattr(m, "num_heads", None) or m.num_attention_heads)

    @property
    def scale(self) -> float | None:
        s = getattr(self.module, "scale", getattr(self.module, "scaling", None))
        return None if s is None else float(s)

    def qkv(self, x_q, x_kv=None, *, rope=None):
        self._no_rope(rope)
        if x_kv is not None and x_kv is not x_q:
            raise ValueError("transformers self-attention takes one input sequence")
        m, h = self.module, self.num_heads
        return split_heads(linear(m.q_proj, x_q), h), split_heads(linear(m.k_proj, x_q), h), \
            split_heads(linear(m.v_proj, x_q), h)

    def out(self, o, x_in=None):
        return linear(self.proj, merge_heads(o))


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
        if cls.handles(module):
            return cls(module)
    raise TypeError(f"legrad has no attention adapter for {type(module).__module__}.{type(module).__name__}")


# ---------------------------------------------------------------------------------------------- timm
@functools.cache
def exact_types(paths: tuple[str, ...]) -> tuple[type, ...]:
    """Classes named by ``"module.Class"`` paths; those whose module cannot be imported are left out.

    timm is an optional dependency, so its classes are looked up lazily. Callers compare with
    ``type(m) in exact_types(...)`` (not ``isinstance``): a subclass may change ``forward``, and running
    it with the parent's maths would be silently wrong.
    """
    out = []
    for path in paths:
        mod_name, cls_name = path.rsplit(".", 1)
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        cls = getattr(mod, cls_name, None)
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


def apply_rope(x: torch.Tensor, table: torch.Tensor, half: bool) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[..., N, hd]`` with a concatenated ``[sin | cos]`` table ``[N, 2 * hd]``.

    ``half`` selects the rotate-half layout (pairs ``(i, i + hd/2)``); otherwise pairs are interleaved
    ``(2i, 2i + 1)``. Computed in the wider of the two dtypes, returned in ``x``'s dtype.
    """
    sin, cos = table.chunk(2, dim=-1)
    work = torch.promote_types(x.dtype, table.dtype)
    xw = x.to(work)
    if half:
        a, b = xw.chunk(2, dim=-1)
        rotated = torch.cat([-b, a], dim=-1)
    else:
        rotated = torch.stack([-xw[..., 1::2], xw[..., ::2]], dim=-1).reshape(xw.shape)
    return (xw * cos.to(work) + rotated * sin.to(work)).to(x.dtype)


class TimmSelfAttentionOps(AttentionOps):
    """timm self-attention: ``Attention`` (ViT, SigLIP, ViTamin, MobileCLIP-B), ``AttentionRope``
    (PE-Core), ``EvaAttention`` (EVA01/EVA02) and ``RelPosAttention``.

    Rotary tables and additive position biases depend on the input grid, so the tower adapter builds
    them and passes them in (``rope=``, ``bias=``).
    """

    _paths: ClassVar[tuple[str, ...]] = (
        "timm.layers.attention.Attention",
        "timm.layers.attention.AttentionRope",
        "timm.models.eva.EvaAttention",
        "timm.models.vision_transformer_relpos.RelPosAttention",
    )

    @classmethod
    def handles(cls, module):
        return type(module) in exact_types(cls._paths)

    def __init__(self, module: nn.Module):
        super().__init__(module)
        qkv = getattr(module, "qkv", None)
        if qkv is not None and not isinstance(qkv, nn.Linear):
            raise TypeError(f"legrad supports timm attention with a Linear qkv projection, got {type(qkv).__name__}")

    @property
    def scale(self) -> float:
        return float(self.module.scale)

    @property
    def has_gate(self) -> bool:
        return getattr(self.module, "gate", None) is not None

    def qkv(self, x_q, x_kv=None, *, rope=None):
        """Per-head ``q, k, v`` ``[B, H, N, hd]`` after q/k norms and rotary embedding (prefix tokens unrotated)."""
        if x_kv is not None and x_kv is not x_q:
            raise ValueError("timm self-attention takes one input sequence")
        m = self.module
        x = x_q
        dt = x.dtype
        b, n, _ = x.shape
        h, hd = m.num_heads, m.head_dim
        h_kv = getattr(m, "num_kv_heads", h)
        if getattr(m, "qkv", None) is not None:
            bias = param(m.qkv.bias, dt)
            if getattr(m, "q_bias", None) is not None:  # EvaAttention: q and v biases, k bias fixed at zero
                bias = torch.cat([param(m.q_bias, dt), param(m.k_bias, dt), param(m.v_bias, dt)])
            qkv = F.linear(x, param(m.qkv.weight, dt), bias).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = linear(m.q_proj, x).reshape(b, n, h, hd).transpose(1, 2)
            k = linear(m.k_proj, x).reshape(b, n, h_kv, hd).transpose(1, 2)
            v = linear(m.v_proj, x).reshape(b, n, h_kv, hd).transpose(1, 2)
        q, k = apply_module(m.q_norm, q), apply_module(m.k_norm, k)
        if rope is not None:
            npt = int(getattr(m, "num_prefix_tokens", 0))
            half = bool(getattr(m, "rotate_half", False))
            q = torch.cat([q[:, :, :npt], apply_rope(q[:, :, npt:], rope, half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rope(k[:, :, npt:], rope, half)], dim=2)
        if h_kv != h:  # grouped-query attention: head i reads kv head i // group
            k = k.repeat_interleave(h // h_kv, dim=1)
            v = v.repeat_interleave(h // h_kv, dim=1)
        return q, k, v

    def out(self, o, x_in=None):
        """Output projection; ``x_in`` (the attention's input) is needed only by gated attention."""
        m = self.module
        y = merge_heads(o)
        norm = getattr(m, "norm", None)  # scale_norm (EVA02, PE); RelPosAttention has none
        if norm is not None:
            y = apply_module(norm, y)
        if self.has_gate:
            if x_in is None:
                raise ValueError("gated timm attention needs its input to compute the gate")
            y = y * torch.sigmoid(linear(m.gate, x_in.to(y.dtype)))
        return linear(m.proj, y)


class LatentPoolOps(AttentionOps):
    """timm ``AttentionPoolLatent`` (the ``map`` head of SigLIP/SigLIP2 and PE-Core): learned latent
    queries attending over the tower's tokens. :meth:`out` is the attention's projection only; the
    pooler's residual MLP is applied by the tower adapter."""

    _paths: ClassVar[tuple[str, ...]] = ("timm.layers.attention_pool.AttentionPoolLatent",)

    @classmethod
    def handles(cls, module):
        return type(module) in exact_types(cls._paths)

    @property
    def scale(self) -> float:
        return float(self.module.scale)

    def latent(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The latent queries ``[B, L, Dl]``."""
        lat = param(self.module.latent, dtype)
        return lat.expand(batch, -1, -1)

    def qkv(self, x_q, x_kv=None, *, rope=None):
        """``x_q``: latent queries ``[B, L, Dl]``; ``x_kv``: tokens ``[B, N, C]``."""
        self._no_rope(rope)
        if x_kv is None:
            raise ValueError("AttentionPoolLatent needs the tokens as x_kv")
        m = self.module
        b, n, _ = x_kv.shape
        h, hd = m.num_heads, m.head_dim
        q = apply_module(m.q, x_q.to(x_kv.dtype))
        q = q.reshape(b, q.shape[1], h, hd).transpose(1, 2)
        kv = linear(m.kv, x_kv).reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        return apply_module(m.q_norm, q), apply_module(m.k_norm, k), v

    def out(self, o, x_in=None):
        return apply_module(self.module.proj, merge_heads(o))


register_attention_ops(LatentPoolOps)
register_attention_ops(TimmSelfAttentionOps)

"""Per-architecture adapters: how to run an image tower so that LeGrad can explain it.

An adapter turns an image batch into a sequence of :class:`LayerStep` objects, one per explained
layer. A step holds the per-head attention output ``O`` of the attention that LeGrad differentiates
(a leaf tensor that requires grad), the values ``V`` of that attention, and the tower's embedding for
that layer computed from ``O`` (the autograd graph between the two is the only graph built). The
heatmap engine (:mod:`legrad.heatmap`) needs nothing else, so a new model family is one new class
registered with :func:`register_tower`.

All towers are run statelessly from their modules' weights: no hooks, no ``forward`` rebinding, no
writes, eval semantics whatever the module mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionOps, attention_ops_for
from .functional import apply_module, param
from .posembed import resampled_embedding

__all__ = [
    "LayerStep",
    "TowerAdapter",
    "OpenClipViTAdapter",
    "OpenClipCoCaAdapter",
    "register_tower",
    "tower_adapter_for",
    "supported_tower_names",
    "is_supported_visual",
    "UNSUPPORTED_HINT",
]


@dataclass
class LayerStep:
    """What one explained layer hands to the heatmap engine.

    Attributes:
        layer: block index (0-based) this step explains.
        feature: ``[B, E]`` the tower's (un-normalised) embedding for this layer, a function of ``out``.
        out: ``[B, H, Nq, hd]`` per-head attention output (leaf, ``requires_grad=True``); only the
            query rows that matter (all rows for self-attention, the contrastive query for poolers).
        value: ``[B, H, Nk, hd]`` the attention's values (no grad).
        num_prefix_tokens: leading key columns that are not patch positions (dropped from the map).
        key_mask: optional ``[B, Nk]`` bool, False for padded keys that must get no relevance.
        query: ``[B, H, Nq, hd]`` queries as the kernel sees them (after any q/k norm or rotary
            embedding), for :meth:`probs`; None if the adapter does not provide them.
        key: ``[B, H, Nk, hd]`` keys, likewise.
        scale: softmax temperature applied to ``query @ key^T`` (default ``hd ** -0.5``).
        attn_bias: optional additive logit bias broadcastable to ``[B, H, Nq, Nk]`` (relative positions).
        tokens: ``[B, Nk, C]`` the explained attention's (pre-normed) input tokens; only set by
            :meth:`TowerAdapter.trace`, where they are part of the graph (GradCAM's activations).
    """

    layer: int
    feature: torch.Tensor
    out: torch.Tensor
    value: torch.Tensor
    num_prefix_tokens: int
    key_mask: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    scale: float | None = None
    tokens: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None

    def probs(self, rows: slice | None = None) -> torch.Tensor:
        """Post-softmax attention probabilities ``[B, H, Nq, Nk]`` of the explained attention (no grad).

        Used by baselines (raw attention, rollout, CheferCAM) and tests; LeGrad itself never needs them.

        Args:
            rows: only these query rows (``[B, H, len(rows), Nk]``); softmax acts per row, so a block of
                rows equals the same rows of the full matrix.
        """
        if self.query is None or self.key is None:
            raise NotImplementedError("this tower adapter does not expose queries/keys")
        scale = self.query.shape[-1] ** -0.5 if self.scale is None else self.scale
        query = self.query if rows is None else self.query[..., rows, :]
        logits = (query * scale) @ self.key.transpose(-1, -2)
        if self.attn_bias is not None:
            bias = self.attn_bias.to(logits.dtype)
            if rows is not None and bias.shape[-2] != 1:
                bias = bias[..., rows, :]
            logits = logits + bias
        if self.key_mask is not None:
            logits = logits.masked_fill(~self.key_mask[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)


class TowerAdapter:
    """Base class of the per-family adapters.

    Subclasses implement :meth:`matches`, :attr:`depth`, :attr:`patch_size`, :attr:`in_chans`,
    :attr:`embed_dim` and :meth:`steps`; :attr:`family` names the family in messages and tables.
    """

    family: ClassVar[str] = "abstract"
    #: Entry points of :class:`~legrad.LeWrapper` that are valid for this family.
    entry_points: ClassVar[tuple[str, ...]] = ("compute_legrad",)
    #: Whether LeWrapper applies the empty-prompt correction (SigLIP-style attention-pooled towers).
    uses_empty_prompt_correction: ClassVar[bool] = False

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        """Whether this adapter handles the image tower ``visual``."""
        raise NotImplementedError

    @classmethod
    def from_model(cls, model: nn.Module) -> TowerAdapter | None:
        """The adapter for ``model``'s image tower, or None if this family does not apply.

        The default looks at ``model.visual`` (OpenCLIP); other model libraries override this.
        """
        visual = getattr(model, "visual", None)
        if visual is not None and cls.matches(visual):
            return cls(visual)
        return None

    @classmethod
    def supports_config(cls, model_cfg: dict) -> bool:
        """Whether an OpenCLIP model config (``open_clip.get_model_config``) builds a tower of this family."""
        return False

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        raise NotImplementedError

    @property
    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def embed_dim(self) -> int:
        """Width of the tower's output embedding (must equal the text embedding width)."""
        raise NotImplementedError

    @property
    def uses_attention_pooler(self) -> bool:
        return False

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (class token, registers); used for memory estimates."""
        return 1

    @property
    def width(self) -> int:
        """Token width of the tower (the widest normalised width: an upper value for memory estimates)."""
        widths = [int(m.normalized_shape[-1]) for m in self.visual.modules()
                  if isinstance(getattr(m, "normalized_shape", None), (tuple, list, torch.Size))
                  and len(m.normalized_shape)]
        return max(widths) if widths else self.embed_dim

    def param_dtype(self) -> torch.dtype:
        for p in self.visual.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def device(self) -> torch.device:
        for p in self.visual.parameters():
            return p.device
        return torch.device("cpu")

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid for an input size.

        Raises:
            ValueError: if the size is not a multiple of the patch size.
        """
        ph, pw = self.patch_size
        if height < ph or width < pw:
            raise ValueError(
                f"image size {height}x{width} is smaller than one patch ({ph}x{pw}); resize it to at least "
                f"{ph}x{pw} (e.g. LePreprocess(preprocess, image_size={max(ph, pw)}))"
            )
        if height % ph or width % pw:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}; resize it "
                f"(e.g. LePreprocess(preprocess, image_size={max(ph, (height // ph) * ph)})) or crop to "
                f"{(height // ph) * ph}x{(width // pw) * pw}"
            )
        return height // ph, width // pw

    def steps(self, image: torch.Tensor, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        """Runs the tower once and yields one :class:`LayerStep` per block from ``start`` to the last.

        Must be called under ``torch.no_grad()``; each step's graph is built under ``enable_grad``.

        Args:
            image: ``[B, C, H, W]`` already validated, on the tower's device and dtype.
            start: first explained block (0-based, non-negative).
            compute_dtype: dtype of the explained layers' graph (float32 for half-precision models).
        """
        raise NotImplementedError

    def trace(self, image: torch.Tensor, compute_dtype: torch.dtype) -> tuple[list[LayerStep], torch.Tensor]:
        """Runs the whole tower as ONE differentiable graph (for gradient baselines: GradCAM, CheferCAM).

        Unlike :meth:`steps`, later blocks depend on earlier ones in the graph, and the embedding is the
        model's own pooled output (what ``encode_image`` returns, un-normalised). Call it under
        ``torch.no_grad()``; the graph is built under ``enable_grad``.

        Args:
            image: ``[B, C, H, W]`` already validated, on the tower's device and dtype.
            compute_dtype: dtype of the graph.

        Returns:
            ``(steps, embedding)``: one :class:`LayerStep` per block (``out`` and ``tokens`` are non-leaf
            tensors of the graph, ``feature`` is the embedding) and the ``[B, E]`` embedding.

        Raises:
            NotImplementedError: if the family has no traced forward.
        """
        raise NotImplementedError(
            f"the {self.family} adapter has no traced forward (TowerAdapter.trace), which gradient "
            "baselines (GradCAM, CheferCAM) need; LeGrad and raw attention still work"
        )


def _block_attention(blk: nn.Module) -> AttentionOps:
    return attention_ops_for(blk.attn)


def _plain_openclip_vit_cfg(v: dict) -> bool:
    """Whether an open_clip ``vision_cfg`` builds open_clip's own ViT with standard residual blocks."""
    if v.get("timm_model_name") or isinstance(v.get("layers"), (list, tuple)):
        return False
    custom_flags = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
    return v.get("block_type") in (None, "default") and not any(v.get(k) for k in custom_flags)


class OpenClipViTAdapter(TowerAdapter):
    """open_clip ``VisionTransformer`` with CLS or average pooling (OpenAI/LAION CLIP, CLIPA, MetaCLIP...).

    Layer feature: ``proj(ln_post(mean over all tokens of block l's output)))``; gradient w.r.t.
    block l's self-attention probabilities; one prefix (CLS) column dropped.
    """

    family = "open_clip VisionTransformer (CLS/avg pool)"
    entry_points = ("compute_legrad", "compute_legrad_clip")

    @classmethod
    def matches(cls, visual):
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        return (
            isinstance(visual, VisionTransformer)
            and getattr(visual, "attn_pool", None) is None
            and all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks)
        )

    @classmethod
    def supports_config(cls, model_cfg):
        v = model_cfg.get("vision_cfg", {})
        return _plain_openclip_vit_cfg(v) and not v.get("attentional_pool") and v.get("pool_type", "tok") != "none"

    @classmethod
    def from_model(cls, model):
        adapter = super().from_model(model)
        if adapter is not None and "compute_legrad_coca" not in adapter.entry_points:
            from open_clip.coca_model import CoCa

            if isinstance(model, CoCa):  # a CoCa model whose image tower pools by CLS token (coca_base)
                adapter.entry_points = (*adapter.entry_points, "compute_legrad_coca")
        return adapter

    @property
    def depth(self):
        return len(self.visual.transformer.resblocks)

    @property
    def patch_size(self):
        ps = self.visual.patch_size
        return (ps, ps) if isinstance(ps, int) else tuple(ps)

    @property
    def in_chans(self):
        return self.visual.conv1.in_channels

    @property
    def embed_dim(self):
        proj = self.visual.proj
        return proj.shape[1] if proj is not None else self.visual.ln_post.normalized_shape[0]

    def _tokens(self, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        v = self.visual
        gh, gw = self.grid_size(image.shape[-2], image.shape[-1])
        x = F.conv2d(image.to(dtype), param(v.conv1.weight, dtype), param(v.conv1.bias, dtype), stride=v.conv1.stride)
        x = x.flatten(2).transpose(1, 2)
        cls_tok = param(v.class_embedding, dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1)
        pos = resampled_embedding(v.positional_embedding, tuple(v.grid_size), (gh, gw), 1, dtype)
        x = x + pos
        # Patch dropout only acts in training mode: eval semantics means it is skipped.
        return apply_module(v.ln_pre, x)

    @staticmethod
    def _mlp_hidden(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        mlp = blk.mlp
        return apply_module(mlp.gelu, apply_module(mlp.c_fc, apply_module(blk.ln_2, x)))

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ops = _block_attention(blk)
        q, k, v = ops.qkv(apply_module(blk.ln_1, x))
        x = x + apply_module(blk.ls_1, ops.out(ops.attend(q, k, v)))
        return x + apply_module(blk.ls_2, apply_module(blk.mlp.c_proj, self._mlp_hidden(blk, x)))

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        v = self.visual
        y = apply_module(v.ln_post, pooled)
        return y @ param(v.proj, y.dtype) if v.proj is not None else y

    def _explained_block(self, layer: int, blk: nn.Module, x: torch.Tensor):
        ops = _block_attention(blk)
        q, k, v = ops.qkv(apply_module(blk.ln_1, x))
        o = ops.attend(q, k, v).detach().requires_grad_(True)
        with torch.enable_grad():
            x1 = x + apply_module(blk.ls_1, ops.out(o))
            hidden = self._mlp_hidden(blk, x1)
            # The token mean commutes with c_proj and ls_2 (both linear), so the graph holds the pooled
            # vector there instead of [B, N, D]: the batched backward then skips one big matmul per prompt.
            pooled = x1.mean(1) + apply_module(blk.ls_2, apply_module(blk.mlp.c_proj, hidden.mean(1)))
            feature = self._head(pooled)
        with torch.no_grad():
            x_next = x1.detach() + apply_module(blk.ls_2, apply_module(blk.mlp.c_proj, hidden.detach()))
        step = LayerStep(layer=layer, feature=feature, out=o, value=v, num_prefix_tokens=1, query=q, key=k)
        return step, x_next

    def _pooled_output(self, x: torch.Tensor) -> torch.Tensor:
        # Mirrors VisionTransformer._pool for towers without attn_pool (the only ones this adapter matches).
        v = self.visual
        if v.pool_type not in ("tok", "avg"):
            raise ValueError(f"open_clip pool_type={v.pool_type!r} gives no single image embedding")

        def pool(t):
            return t[:, 0] if v.pool_type == "tok" else t[:, 1:].mean(1)

        if v.final_ln_after_pool:
            pooled = apply_module(v.ln_post, pool(x))
        else:
            pooled = pool(apply_module(v.ln_post, x))
        return pooled @ param(v.proj, pooled.dtype) if v.proj is not None else pooled

    def trace(self, image, compute_dtype):
        # The patch embedding is the graph's only leaf: every later activation is a function of it.
        x = self._tokens(image, compute_dtype).detach().requires_grad_(True)
        steps = []
        with torch.enable_grad():
            for i, blk in enumerate(self.visual.transformer.resblocks):
                ops = _block_attention(blk)
                h = apply_module(blk.ln_1, x)
                q, k, v = ops.qkv(h)
                o = ops.attend(q, k, v)
                x = x + apply_module(blk.ls_1, ops.out(o))
                x = x + apply_module(blk.ls_2, apply_module(blk.mlp.c_proj, self._mlp_hidden(blk, x)))
                steps.append(LayerStep(layer=i, feature=x, out=o, value=v.detach(), num_prefix_tokens=1,
                                       query=q.detach(), key=k.detach(), tokens=h))
            embedding = self._pooled_output(x)
        for step in steps:
            step.feature = embedding
        return steps, embedding

    def steps(self, image, start, compute_dtype):
        model_dtype = self.param_dtype()
        x = self._tokens(image, model_dtype)
        blocks = self.visual.transformer.resblocks
        for i in range(start):
            x = self._block(blocks[i], x)
        x = x.to(compute_dtype)
        for i in range(start, len(blocks)):
            step, x = self._explained_block(i, blocks[i], x)
            yield step
            del step  # free this layer's graph before building the next one


class OpenClipCoCaAdapter(OpenClipViTAdapter):
    """open_clip ``VisionTransformer`` with CoCa's ``AttentionalPooler`` (learned queries over all tokens).

    For each block ``l``: block ``l``'s output -> pooler (``ln_k`` on the tokens, ``ln_q`` on the
    queries, ``nn.MultiheadAttention``) -> ``ln_post`` -> contrastive query (query 0; the mean of the
    others for ``pool_type='avg'``) -> ``proj``. The gradient is taken w.r.t. the pooler's attention of
    the contrastive query; the CLS key column is dropped.
    """

    family = "open_clip VisionTransformer + attentional pooler (CoCa)"
    entry_points = ("compute_legrad", "compute_legrad_coca")

    @classmethod
    def matches(cls, visual):
        from open_clip.transformer import AttentionalPooler, ResidualAttentionBlock, VisionTransformer

        return (
            isinstance(visual, VisionTransformer)
            and type(getattr(visual, "attn_pool", None)) is AttentionalPooler
            and getattr(visual, "attn_pool_contrastive", None) is None
            and visual.pool_type in ("tok", "avg")
            and all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks)
        )

    @classmethod
    def supports_config(cls, model_cfg):
        v = model_cfg.get("vision_cfg", {})
        pool = v.get("attentional_pool")
        # string values ('parallel', 'cascade') select open_clip's experimental second pooler
        return _plain_openclip_vit_cfg(v) and bool(pool) and not isinstance(pool, str)

    @property
    def uses_attention_pooler(self):
        return True

    def _pool_attention(self, z: torch.Tensor):
        """Pooler queries (contrastive rows only), keys and values on block output ``z``: ``(ops, q, k, v)``."""
        vis = self.visual
        pool = vis.attn_pool
        ops = attention_ops_for(pool.attn)
        keys = apply_module(pool.ln_k, z)
        queries = apply_module(pool.ln_q, param(pool.query, keys.dtype))
        # ln_post and the projection act per query, so only the contrastive query rows are computed.
        rows = queries[:1] if vis.pool_type == "tok" else queries[1:]
        q, k, v = ops.qkv(rows.unsqueeze(0).expand(keys.shape[0], -1, -1), keys)
        return ops, q, k, v

    def _pool_output(self, ops: AttentionOps, o: torch.Tensor) -> torch.Tensor:
        """From the pooler's per-head attention output ``o`` to the image embedding."""
        vis = self.visual
        y = apply_module(vis.ln_post, ops.out(o))
        y = y[:, 0] if vis.pool_type == "tok" else y.mean(1)
        return y @ param(vis.proj, y.dtype) if vis.proj is not None else y

    def pooler_step(self, layer: int, z: torch.Tensor) -> LayerStep:
        """The explained pooler on block ``layer``'s output ``z`` ``[B, N, C]``."""
        ops, q, k, v = self._pool_attention(z)
        o = ops.attend(q, k, v).detach().requires_grad_(True)
        with torch.enable_grad():
            feature = self._pool_output(ops, o)
        return LayerStep(layer=layer, feature=feature, out=o, value=v, num_prefix_tokens=1, query=q, key=k)

    def steps(self, image, start, compute_dtype):
        x = self._tokens(image, self.param_dtype())
        blocks = self.visual.transformer.resblocks
        for i in range(start):
            x = self._block(blocks[i], x)
        x = x.to(compute_dtype)
        for i in range(start, len(blocks)):
            x = self._block(blocks[i], x)
            yield self.pooler_step(i, x)

    # The parent's traced forward pools by CLS token; CoCa's is not offered (gradient baselines refuse CoCa).
    trace = TowerAdapter.trace


_TOWERS: list[type[TowerAdapter]] = [OpenClipViTAdapter, OpenClipCoCaAdapter]

UNSUPPORTED_HINT = (
    "LeGrad needs a Vision Transformer image tower with self-attention blocks; ModifiedResNet (RN50...), "
    "ConvNeXt, FastViT/MobileCLIP-S and Swin towers are not supported."
)


def register_tower(cls: type[TowerAdapter]) -> type[TowerAdapter]:
    """Class decorator registering a :class:`TowerAdapter` (checked before the built-in ones)."""
    _TOWERS.insert(0, cls)
    return cls


def supported_tower_names() -> list[str]:
    """Names of the tower families that have an adapter."""
    return [t.family for t in _TOWERS]


def is_supported_visual(visual: Any) -> bool:
    """Whether some adapter handles the image tower ``visual``."""
    return any(_safe_matches(cls, visual) for cls in _TOWERS)


def _safe_matches(cls: type[TowerAdapter], visual: Any) -> bool:
    try:
        return cls.matches(visual)
    except ImportError:  # an optional dependency of that family is missing
        return False


def tower_adapter_for(model: Any) -> TowerAdapter:
    """Builds the adapter for a model's image tower.

    Raises:
        TypeError: naming the tower and the supported families when none matches.
    """
    for cls in _TOWERS:
        try:
            adapter = cls.from_model(model)
        except ImportError:
            continue
        if adapter is not None:
            return adapter
    tower = getattr(model, "visual", model)
    raise TypeError(
        f"unsupported image tower {type(tower).__module__}.{type(tower).__name__}. "
        f"{UNSUPPORTED_HINT} Supported families: {', '.join(supported_tower_names())}."
    )


# timm towers live in their own module, which imports the base classes above.
from .towers_timm import TimmMapAdapter, TimmViTAdapter  # noqa: E402

_TOWERS.extend([TimmViTAdapter, TimmMapAdapter])

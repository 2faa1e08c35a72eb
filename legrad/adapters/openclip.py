"""Adapters for open_clip's own ``VisionTransformer`` image towers: CLS/average pooled (CLIP, CLIPA,
MetaCLIP...) and CoCa's attentional pooler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.targets import Embedding
from ..ops.attention import attention_ops_for
from ..ops.functional import apply_module, param
from ..ops.posembed import resampled_embedding
from .runner import Block, BlockTower, Pooler, Run, chain

__all__ = ["OpenClipViTAdapter", "OpenClipCoCaAdapter", "CoCaReferenceAdapter", "encode_image"]


def encode_image(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """An open_clip model's own un-normalised image embedding ``[B, E]`` (the drift guard's reference)."""
    out = model.encode_image(image, normalize=False)
    return out[0] if isinstance(out, tuple) else out  # towers built with output_tokens=True


def _block(blk: nn.Module) -> Block:
    """An open_clip ``ResidualAttentionBlock``: pre-norm, optional layer scales, ``c_fc -> gelu -> c_proj``."""
    return Block(attn=attention_ops_for(blk.attn), norm1=chain(blk.ln_1), scale1=chain(blk.ls_1),
                 norm2=chain(blk.ln_2), mlp_in=chain(blk.mlp.c_fc, blk.mlp.gelu), mlp_out=chain(blk.mlp.c_proj),
                 scale2=chain(blk.ls_2))


def _plain_openclip_vit_cfg(v: dict) -> bool:
    """Whether an open_clip ``vision_cfg`` builds open_clip's own ViT with standard residual blocks."""
    if v.get("timm_model_name") or isinstance(v.get("layers"), (list, tuple)):
        return False
    custom_flags = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
    return v.get("block_type") in (None, "default") and not any(v.get(k) for k in custom_flags)


class OpenClipViTAdapter(BlockTower):
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
                # an attribute of this instance: the class's entry points stay as declared
                adapter.entry_points = (*type(adapter).entry_points, "compute_legrad_coca")
        return adapter

    def for_reference(self, reference):
        # legrad-torch 1.1 explains these towers exactly as legrad does (same feature, same order of
        # upsampling and normalisation), one image per call; only its projection is mandatory.
        if self.visual.proj is None:
            raise ValueError(f"reference={reference!r}: legrad-torch {reference} projects each layer's feature with the "
                             "tower's proj, which this tower does not have; drop reference= to get legrad's maps")
        return self

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

    def declare(self, image, dtype):
        return Run(self._tokens(image, dtype), [_block(b) for b in self.visual.transformer.resblocks], prefix=1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        v = self.visual
        y = apply_module(v.ln_post, pooled)
        return y @ param(v.proj, y.dtype) if v.proj is not None else y

    @property
    def pools_by_average(self):
        return self.visual.pool_type == "avg"

    def readout(self, x: torch.Tensor, context: Run | None = None) -> torch.Tensor:
        # Mirrors VisionTransformer._pool for towers without attn_pool (the only ones this adapter matches).
        v = self.visual
        if v.pool_type not in ("tok", "avg"):
            raise ValueError(f"open_clip pool_type={v.pool_type!r} gives no single image embedding")

        def take(t):
            return t[:, 0] if v.pool_type == "tok" else t[:, 1:].mean(1)

        if v.final_ln_after_pool:
            pooled = apply_module(v.ln_post, take(x))
        else:
            pooled = take(apply_module(v.ln_post, x))
        return pooled @ param(v.proj, pooled.dtype) if v.proj is not None else pooled

    def own_output(self, model, image):
        return encode_image(model, image)


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

    def for_reference(self, reference):
        if self.visual.proj is None:
            super().for_reference(reference)  # raises: the original needs the projection
        return CoCaReferenceAdapter(self.visual)

    #: Whether the explained query is always query 0 (legrad-torch 1.1), whatever ``pool_type`` says.
    reference_query_zero = False

    def pooler(self) -> Pooler:
        vis = self.visual
        pool_ = vis.attn_pool

        def queries(keys: torch.Tensor) -> torch.Tensor:
            q = apply_module(pool_.ln_q, param(pool_.query, keys.dtype))
            # ln_post and the projection act per query, so only the contrastive query rows are computed.
            rows = q[:1] if vis.pool_type == "tok" or self.reference_query_zero else q[1:]
            return rows.unsqueeze(0).expand(keys.shape[0], -1, -1)

        return Pooler(attention_ops_for(pool_.attn), keys=lambda z: (apply_module(pool_.ln_k, z), 1),
                      queries=queries, finish=self._finish)

    def readout(self, x, context=None):
        return BlockTower.readout(self, x, context)  # the pooler's embedding, not the parent's token pooling

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        """From the pooler's projected output ``[B, L, C]`` to the image embedding."""
        vis = self.visual
        y = apply_module(vis.ln_post, y)
        y = y[:, 0] if vis.pool_type == "tok" else y.mean(1)
        return y @ param(vis.proj, y.dtype) if vis.proj is not None else y


class CoCaReferenceAdapter(OpenClipCoCaAdapter):
    """legrad-torch 1.1's CoCa maps (``LeWrapper(reference="1.1")``).

    Layer feature: ``pooler(block l's output)[:, 0] @ proj``, without the ``ln_post`` that the model
    applies after the pooler, scored by a plain dot product with the text embedding (the feature is
    not L2-normalised); the gradient is taken w.r.t. the pooler's attention of query 0.
    """

    family = "open_clip VisionTransformer + attentional pooler (CoCa), as legrad-torch 1.1 explains it"
    reference_query_zero = True

    @property
    def readout_space(self) -> Embedding:
        return Embedding(self.embed_dim, cosine=False)

    def for_reference(self, reference):
        return self

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        y = y[:, 0]
        return y @ param(self.visual.proj, y.dtype)

"""Tower adapters for open_clip's timm image towers (``open_clip.timm_model.TimmModel``).

Two families share one stateless re-implementation of timm's ViT-style trunks (``VisionTransformer``
with plain, ConvStem (MobileCLIP-B) or MbConv (ViTamin) stems, ``Eva`` with rotary embeddings (EVA02,
PE-Core), ``VisionTransformerRelPos``):

* :class:`TimmViTAdapter`, towers pooled by a class token or an average: the layer feature is the
  tower's final norm(s), head and projection applied to the mean over all tokens of block ``l``'s
  output; the gradient is taken w.r.t. block ``l``'s self-attention.
* :class:`TimmMapAdapter`, towers pooled by timm's ``AttentionPoolLatent`` (``global_pool='map'``:
  SigLIP, SigLIP2, PE-Core): block ``l``'s output goes through the tower's own path to the embedding
  (final norm, the pooler, fc norm, head, projection) and the gradient is taken w.r.t. the pooler's
  attention of the contrastive latent query.

Everything is recomputed from the modules' weights: no hooks, no flag flips (``fused_attn`` is never
touched), eval semantics whatever the mode. Positional tables (absolute, rotary, relative) are built
for the input's patch grid from the modules' own parameters and settings, without writing to them.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.targets import Embedding
from ..ops.attention import LatentPoolOps
from ..ops.functional import apply_module, eval_view, param
from ..ops.posembed import resampled_embedding
from .openclip import encode_image
from .runner import BlockTower, Pooler, Run
from .timm_blocks import (
    PATCH_EMBED,
    TIMM_MODEL,
    apply_head_module,
    apply_mlp,
    head_problem,
    is_exact,
    mlp_final,
    mlp_kind,
    reference_problem,
    rel_pos_mlp_bias,
    rope_table,
    timm_block,
    trunk_problem,
)

__all__ = ["TimmViTAdapter", "TimmMapAdapter", "TimmMapReferenceAdapter", "timm_config_support"]

# timm model modules whose entry points build one of the trunks above.
_TIMM_MODULES = frozenset({
    "timm.models.vision_transformer",
    "timm.models.vision_transformer_hybrid",
    "timm.models.vitamin",
    "timm.models.eva",
    "timm.models.vision_transformer_relpos",
})


@functools.lru_cache(maxsize=256)
def _timm_model_info(model_name: str, global_pool: str | None) -> tuple[bool, bool]:
    """``(supported, pooled_by_map)`` for ``timm.create_model(model_name)`` pooled as open_clip pools it.

    Decided from the trunk's classes: the model is built on the meta device (no memory, no weights)
    with a single block, which is enough to see every class the tower uses.
    """
    try:
        import timm
        from timm.models import model_entrypoint
    except ImportError:  # open_clip can run without timm; its timm towers then cannot be built either
        return False, False
    try:
        if model_entrypoint(model_name).__module__ not in _TIMM_MODULES:
            return False, False
    except Exception:  # unknown to this timm version
        return False, False
    kwargs: dict[str, Any] = {"pretrained": False, "depth": 1, "num_classes": 0}
    if global_pool is not None:
        kwargs["global_pool"] = global_pool
    try:
        with torch.device("meta"):
            trunk = timm.create_model(model_name, **kwargs)
    except Exception:
        return False, False
    return trunk_problem(trunk) is None, getattr(trunk, "attn_pool", None) is not None


def timm_config_support(model_cfg: dict, pooled_by_map: bool | None = None) -> bool:
    """Whether an open_clip config builds a timm tower legrad supports (optionally: of one pooling family).

    Decided from the timm entry point's module and the classes of the trunk it builds, never from names.
    """
    v = model_cfg.get("vision_cfg", {})
    name = v.get("timm_model_name")
    if not name:
        return False
    pool = v.get("timm_pool", "avg") or ""
    proj = v.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn"):
        return False
    # open_clip's TimmModel: with its own projection an empty pool keeps the trunk's default pooling,
    # without one the pool is passed to timm as is.
    global_pool = (pool or None) if proj in ("linear", "mlp") else pool
    ok, by_map = _timm_model_info(name, global_pool)
    return ok and (pooled_by_map is None or by_map == pooled_by_map)


# ---------------------------------------------------------------------------------------------- adapters
class _TimmTowerAdapter(BlockTower):
    """Shared stateless trunk for timm towers; subclasses define what a layer's feature is."""

    pooled_by_map: ClassVar[bool] = False
    #: Trunk attributes holding prefix tokens, in sequence order (DeiT-distilled: cls, dist).
    prefix_token_names: ClassVar[tuple[str, ...]] = ("cls_token", "reg_token")

    @classmethod
    def matches(cls, visual):
        if not is_exact(visual, TIMM_MODEL):
            return False
        trunk = getattr(visual, "trunk", None)
        return (trunk is not None and trunk_problem(trunk, cls.pooled_by_map) is None
                and head_problem(visual.head) is None)

    @classmethod
    def supports_config(cls, model_cfg):
        return timm_config_support(model_cfg, cls.pooled_by_map)

    def __init__(self, visual: nn.Module):
        super().__init__(visual)
        self.trunk = visual.trunk

    # ------------------------------------------------------------------ geometry
    @property
    def depth(self):
        return len(self.trunk.blocks)

    @property
    def patch_size(self):
        pe = self.trunk.patch_embed
        if hasattr(pe, "feat_ratio"):
            r = pe.feat_ratio(as_scalar=False)
        else:
            r = pe.patch_size
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))

    @property
    def in_chans(self):
        return int(getattr(self.trunk, "in_chans", 3))

    @property
    def embed_dim(self):
        t = self.trunk
        dim = t.embed_dim
        pool = getattr(t, "attn_pool", None)
        if pool is not None:
            dim = pool.out_features
        if isinstance(t.head, nn.Linear):
            dim = t.head.out_features
        for child in self.visual.head.children():
            if isinstance(child, nn.Linear):
                dim = child.out_features
            elif mlp_kind(child) is not None:
                dim = mlp_final(child).out_features
        return dim

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.trunk, "num_prefix_tokens", 0))

    @property
    def native_size(self):
        size = getattr(self.trunk.patch_embed, "img_size", None)  # open_clip's image_size may differ from it
        return super().native_size if size is None else (int(size[0]), int(size[1]))

    def own_output(self, model, image):
        return encode_image(model, image)

    @property
    def pools_by_average(self) -> bool:
        return getattr(self.trunk, "global_pool", None) == "avg"

    # ------------------------------------------------------------------ embedding
    def _patches(self, image: torch.Tensor, dtype: torch.dtype, grid: tuple[int, int]) -> torch.Tensor:
        pe = self.trunk.patch_embed
        if is_exact(pe, PATCH_EMBED):
            proj = pe.proj
            if not isinstance(proj, nn.Conv2d):
                raise TypeError(f"legrad supports timm PatchEmbed with a Conv2d projection, got {type(proj).__name__}")
            x = F.conv2d(image.to(dtype), param(proj.weight, dtype), param(proj.bias, dtype), stride=proj.stride,
                         padding=proj.padding, dilation=proj.dilation, groups=proj.groups)
            x = x.flatten(2).transpose(1, 2)
            return apply_module(pe.norm, x)
        # Hybrid stems (ViTamin, MobileCLIP-B): their forward is pure in eval mode and has no size checks.
        x = eval_view(pe)(image.to(dtype))
        if x.ndim == 4:  # NHWC output format
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if x.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"the stem produced {x.shape[1]} tokens for a {grid[0]}x{grid[1]} patch grid; use an image size "
                f"that is a multiple of {self.patch_size}"
            )
        return x

    def _tokens(self, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = self.trunk
        grid = self.grid_size(image.shape[-2], image.shape[-1])
        x = self._patches(image, dtype, grid)
        b = x.shape[0]
        prefix = []
        for name in self.prefix_token_names:
            tok = getattr(t, name, None)
            if tok is not None:
                prefix.append(param(tok, dtype).expand(b, -1, -1))
        pos = getattr(t, "pos_embed", None)
        no_embed_class = bool(getattr(t, "no_embed_class", False))
        if pos is not None:
            pos_prefix = 0 if no_embed_class else self.num_prefix_tokens
            pos = resampled_embedding(pos, tuple(t.patch_embed.grid_size), grid, pos_prefix, dtype)
        if pos is not None and no_embed_class:
            x = x + pos
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if pos is not None and not no_embed_class:
            x = x + pos
        # pos_drop and patch dropout only act in training mode: eval semantics skips them.
        norm_pre = getattr(t, "norm_pre", None)
        return x if norm_pre is None else apply_module(norm_pre, x)

    def _rope(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """Rotary table ``[N, 2 * hd]`` for ``grid``, built from the trunk's rope settings (never written)."""
        rope = getattr(self.trunk, "rope", None)
        if rope is None:
            return None
        cached = getattr(rope, "pos_embed", None)
        feat = getattr(rope, "feat_shape", None)
        if (cached is not None and feat is not None and tuple(feat) == tuple(grid)
                and cached.dtype in (torch.float32, torch.float64)):
            return cached.detach()
        return rope_table(rope, grid, device)

    def _rel_bias(self, rel_pos: nn.Module | None, grid: tuple[int, int], device) -> torch.Tensor | None:
        if rel_pos is None:
            return None
        return rel_pos_mlp_bias(rel_pos, grid, device)

    def declare(self, image, dtype):
        grid = self.grid_size(image.shape[-2], image.shape[-1])
        device = image.device
        shared = self._rel_bias(getattr(self.trunk, "shared_rel_pos", None), grid, device)
        blocks = []
        for blk in self.trunk.blocks:
            bias = self._rel_bias(getattr(blk.attn, "rel_pos", None), grid, device)
            blocks.append(timm_block(blk, bias if bias is not None else shared))
        return Run(self._tokens(image, dtype), blocks, prefix=self.num_prefix_tokens, rope=self._rope(grid, device))

    # ------------------------------------------------------------------ head
    def _after_pool(self, y: torch.Tensor) -> torch.Tensor:
        """fc_norm, trunk head and open_clip's head/projection on a pooled ``[B, C]`` vector."""
        t = self.trunk
        y = apply_module(t.fc_norm, y)
        y = apply_module(t.head, y)
        return apply_head_module(self.visual.head, y)


class TimmViTAdapter(_TimmTowerAdapter):
    """timm ViT-style towers pooled by class token or average (EVA01/EVA02, ViTamin, MobileCLIP-B,
    MobileCLIP2-B/L, timm ViT, VisionTransformerRelPos).

    Layer feature: ``proj(head(fc_norm(norm(mean over all tokens of block l's output))))``; gradient
    w.r.t. block ``l``'s self-attention; prefix (class/register) columns dropped.
    """

    family = "timm ViT / EVA / ViTamin / MobileCLIP-B (CLS/avg pool)"
    entry_points = ("compute_legrad", "compute_legrad_clip")
    pooled_by_map = False

    def readout(self, x, context=None):
        t = self.trunk
        x = apply_module(t.norm, x)
        npt = self.num_prefix_tokens
        if t.global_pool == "token":
            pooled = x[:, 0]
        else:
            if not getattr(t, "pool_include_prefix", False):
                x = x[:, npt:]
            pooled = x.mean(1)
            if t.global_pool == "max":
                pooled = x.amax(1)
            elif t.global_pool == "avgmax":
                pooled = 0.5 * (x.amax(1) + pooled)
        return self._after_pool(pooled)

    def head(self, pooled):
        return self._after_pool(apply_module(self.trunk.norm, pooled))


class TimmMapAdapter(_TimmTowerAdapter):
    """timm towers with an ``AttentionPoolLatent`` head (``map`` pool: SigLIP, SigLIP2, nllb-clip-siglip,
    PE-Core).

    For each block ``l``: tokens -> final norm -> pooler (explained: the contrastive latent query's
    attention) -> pooler MLP -> fc_norm -> head -> projection. Key columns of prefix tokens (PE-Core's
    class token) are dropped. The empty-prompt correction applies (see :class:`~legrad.LeWrapper`).
    """

    family = "timm attention-pooled (map: SigLIP, SigLIP2, PE-Core)"
    entry_points = ("compute_legrad", "compute_legrad_siglip")
    uses_empty_prompt_correction = True
    pooled_by_map = True

    def for_reference(self, reference):
        if not isinstance(self.readout_space, Embedding):  # timm classifiers share this class; never in the original
            return None
        problem = reference_problem(self.visual)
        if problem is not None:
            raise ValueError(f"reference={reference!r}: legrad-torch {reference} never explained this tower: {problem}; "
                             "drop reference= to get legrad's maps")
        return TimmMapReferenceAdapter(self.visual)

    #: Whether the pooler sees the trunk's final ``norm`` of the block output (the model's own forward).
    pool_after_norm = True

    def _pool_keys(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The pooler's keys (with its position embedding) on block output ``z`` and how many of them are
        prefix tokens."""
        t, pool = self.trunk, self.trunk.attn_pool
        keys = apply_module(t.norm, z) if self.pool_after_norm else z
        npt = self.num_prefix_tokens
        # timm's VisionTransformer hides prefix tokens from the pooler unless pool_include_prefix; Eva does not.
        if hasattr(t, "pool_include_prefix") and not t.pool_include_prefix:
            keys, npt = keys[:, npt:], 0
        if pool.pos_embed is not None:
            if pool.pos_embed.shape[0] != keys.shape[1]:
                raise ValueError(
                    f"this tower's attention pool has a fixed position embedding for {pool.pos_embed.shape[0]} "
                    f"tokens; the image gives {keys.shape[1]}: use the model's own image size"
                )
            keys = keys + param(pool.pos_embed, keys.dtype)
        return keys, npt

    def pooler(self) -> Pooler:
        pool = self.trunk.attn_pool
        ops = LatentPoolOps(pool)

        def queries(keys: torch.Tensor) -> torch.Tensor:
            latent = ops.latent(keys.shape[0], keys.dtype)
            # later ops are per latent row: only row 0 reaches the embedding
            return latent[:, :1] if pool.pool == "token" else latent

        def finish(y: torch.Tensor) -> torch.Tensor:
            if pool.mlp is not None:
                y = y + apply_mlp(pool.mlp, apply_module(pool.norm, y))
            y = y[:, 0] if pool.pool == "token" else y.mean(1)
            return self._after_pool(y)

        return Pooler(ops, keys=self._pool_keys, queries=queries, finish=finish)


class TimmMapReferenceAdapter(TimmMapAdapter):
    """legrad-torch 1.1's maps of SigLIP/SigLIP2 towers (``LeWrapper(reference="1.1")``).

    The pooler runs on block ``l``'s raw output, without the trunk's final ``norm`` that the model's
    own forward applies first; the summed (and corrected) patch grid is min-max normalised before it
    is upsampled, and not normalised again.
    """

    family = "timm attention-pooled (map: SigLIP, SigLIP2), as legrad-torch 1.1 explains it"
    normalizes_on_grid = True
    pool_after_norm = False

    def for_reference(self, reference):
        return self

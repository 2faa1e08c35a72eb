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

import copy
import functools
import inspect
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import LatentPoolOps, TimmSelfAttentionOps, attention_ops_for, exact_types
from .functional import apply_module, linear, param
from .posembed import resampled_embedding
from .towers import LayerStep, TowerAdapter

__all__ = ["TimmViTAdapter", "TimmMapAdapter", "timm_config_support", "eval_view", "apply_mlp"]

_TRUNKS = (
    "timm.models.vision_transformer.VisionTransformer",
    "timm.models.eva.Eva",
    "timm.models.vision_transformer_relpos.VisionTransformerRelPos",
)
_PRE_NORM_BLOCKS = (
    "timm.models.vision_transformer.Block",
    "timm.models.vision_transformer_relpos.RelPosBlock",
    "timm.models.eva.EvaBlock",
)
_POST_NORM_BLOCKS = (
    "timm.models.vision_transformer.ResPostBlock",
    "timm.models.vision_transformer_relpos.ResPostRelPosBlock",
    "timm.models.eva.EvaBlockPostNorm",
)
_MLPS = {
    "timm.layers.mlp.Mlp": "mlp",
    "timm.layers.mlp.GluMlp": "glu",
    "timm.layers.mlp.SwiGLU": "swiglu",
    "timm.models.vitamin.GeGluMlp": "geglu",
}
_PATCH_EMBED = ("timm.layers.patch_embed.PatchEmbed",)
_ROPE_CAT = ("timm.layers.pos_embed_sincos.RotaryEmbeddingCat",)
_REL_POS_MLP = ("timm.layers.pos_embed_rel.RelPosMlp",)
_TIMM_MODEL = ("open_clip.timm_model.TimmModel",)
# timm model modules whose entry points build one of the trunks above.
_TIMM_MODULES = frozenset({
    "timm.models.vision_transformer",
    "timm.models.vision_transformer_hybrid",
    "timm.models.vitamin",
    "timm.models.eva",
    "timm.models.vision_transformer_relpos",
})
_CLS_AVG_POOLS = frozenset({"token", "avg", "avgmax", "max"})


def _is(module: Any, paths: tuple[str, ...]) -> bool:
    return module is not None and type(module) in exact_types(paths)


def _mlp_kind(mlp: nn.Module) -> str | None:
    for path, kind in _MLPS.items():
        if _is(mlp, (path,)):
            return kind
    return None


# ---------------------------------------------------------------------------------------------- eval view
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
)


def eval_view(module: nn.Module) -> nn.Module:
    """A copy of a module tree in eval mode that shares the original's parameters and buffers.

    Used for convolutional stems (ViTamin's MbConv stages, MobileCLIP's ConvStem with BatchNorm), whose
    forward is pure in eval mode but would use batch statistics, dropout or drop-path in train mode.
    Nothing is copied but the module objects themselves (parameter/buffer dicts are shared, so weight
    updates and ``.to()`` are seen); the user's module, its mode and its hooks are untouched, and the
    view's hooks are empty.
    """
    view = copy.copy(module)
    d = view.__dict__
    d["_modules"] = OrderedDict((k, None if c is None else eval_view(c)) for k, c in module._modules.items())
    d["training"] = False
    for name in _HOOK_DICTS:
        if name in d:
            d[name] = OrderedDict()
    return view


# ---------------------------------------------------------------------------------------------- MLPs
def _mlp_parts(mlp: nn.Module) -> tuple[str, nn.Linear]:
    kind = _mlp_kind(mlp)
    if kind is None:
        raise TypeError(f"legrad does not support the MLP {type(mlp).__module__}.{type(mlp).__name__}")
    final = mlp.w2 if kind == "geglu" else mlp.fc2
    if not isinstance(final, nn.Linear):
        raise TypeError(f"legrad supports timm MLPs with Linear layers, got {type(final).__name__}")
    return kind, final


def mlp_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm MLP up to (not including) its final linear layer, eval semantics, in ``x``'s dtype."""
    kind, _ = _mlp_parts(mlp)
    if kind == "mlp":
        h = apply_module(mlp.act, linear(mlp.fc1, x))
    elif kind == "glu":
        a, b = linear(mlp.fc1, x).chunk(2, dim=-1)
        h = a * apply_module(mlp.act, b) if mlp.gate_last else apply_module(mlp.act, a) * b
    elif kind == "swiglu":
        h = apply_module(mlp.act, linear(mlp.fc1_g, x)) * linear(mlp.fc1_x, x)
    else:  # geglu (ViTamin): the norm comes first
        x = apply_module(mlp.norm, x)
        return apply_module(mlp.act, linear(mlp.w0, x)) * linear(mlp.w1, x)
    return apply_module(mlp.norm, h)


def mlp_final(mlp: nn.Module) -> nn.Linear:
    """The final linear layer of a timm MLP."""
    return _mlp_parts(mlp)[1]


def apply_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm MLP (``Mlp``, ``GluMlp``, ``SwiGLU``, ViTamin's ``GeGluMlp``) with eval semantics."""
    return linear(mlp_final(mlp), mlp_hidden(mlp, x))


def _apply(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`apply_module` that also knows timm MLPs (heads may hold one)."""
    if _mlp_kind(mod) is not None:
        return apply_mlp(mod, x)
    if isinstance(mod, nn.Sequential):
        for child in mod:
            x = _apply(child, x)
        return x
    return apply_module(mod, x)


# ---------------------------------------------------------------------------------------------- blocks
class _Block:
    """One timm block as residual branches: pre-norm ``x + s(f(norm(x)))`` or post-norm ``x + norm(f(x))``."""

    def __init__(self, blk: nn.Module):
        self.blk = blk
        if _is(blk, _PRE_NORM_BLOCKS):
            self.post_norm = False
        elif _is(blk, _POST_NORM_BLOCKS):
            self.post_norm = True
        else:
            raise TypeError(f"legrad does not support the timm block {type(blk).__module__}.{type(blk).__name__}")
        self.ops = attention_ops_for(blk.attn)
        if not isinstance(self.ops, TimmSelfAttentionOps):
            raise TypeError(f"legrad does not support {type(blk.attn).__name__} inside {type(blk).__name__}")
        _mlp_parts(blk.mlp)

    def _scale(self, which: int, y: torch.Tensor) -> torch.Tensor:
        blk = self.blk
        gamma = getattr(blk, f"gamma_{which}", None)  # EvaBlock stores layer scale as a bare parameter
        if gamma is not None:
            return y * param(gamma, y.dtype)
        ls = getattr(blk, f"ls{which}", None)
        return y if ls is None else apply_module(ls, y)

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.post_norm else apply_module(self.blk.norm1, x)

    def attn_residual(self, y: torch.Tensor) -> torch.Tensor:
        """The attention branch's contribution to the residual stream, given the attention output."""
        return apply_module(self.blk.norm1, y) if self.post_norm else self._scale(1, y)

    def mlp_branch(self, x1: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            return apply_module(self.blk.norm2, apply_mlp(self.blk.mlp, x1))
        return self._scale(2, apply_mlp(self.blk.mlp, apply_module(self.blk.norm2, x1)))

    def attention(self, x: torch.Tensor, rope: torch.Tensor | None, bias: torch.Tensor | None):
        h_in = self.attn_input(x)
        q, k, v = self.ops.qkv(h_in, rope=rope)
        return h_in, q, k, v, self.ops.attend(q, k, v, bias)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        h_in, _, _, _, o = self.attention(x, rope, bias)
        x = x + self.attn_residual(self.ops.out(o, h_in))
        return x + self.mlp_branch(x)

    def explained(self, x: torch.Tensor, rope: torch.Tensor | None, bias: torch.Tensor | None):
        """Block output (no grad) and the token mean of it as a function of a leaf attention output ``o``.

        Returns:
            ``(o, q, k, v, pooled, x_next)``: ``pooled`` ``[B, C]`` is in the graph of ``o``.
        """
        h_in, q, k, v, o = self.attention(x, rope, bias)
        o = o.detach().requires_grad_(True)
        blk = self.blk
        with torch.enable_grad():
            x1 = x + self.attn_residual(self.ops.out(o, h_in))
            if self.post_norm:
                branch = self.mlp_branch(x1)
                pooled = (x1 + branch).mean(1)
                x_next = (x1 + branch).detach()
            else:
                hidden = mlp_hidden(blk.mlp, apply_module(blk.norm2, x1))
                # The token mean commutes with the final linear layer and the layer scale, so the graph
                # keeps [B, hidden] there instead of [B, N, hidden] (cheaper batched backward).
                pooled = x1.mean(1) + self._scale(2, linear(mlp_final(blk.mlp), hidden.mean(1)))
        if not self.post_norm:
            with torch.no_grad():
                x_next = x1.detach() + self._scale(2, linear(mlp_final(blk.mlp), hidden.detach()))
        return o, q, k, v, pooled, x_next


# ---------------------------------------------------------------------------------------------- support
def _trunk_problem(trunk: nn.Module, pooled_by_map: bool | None = None,
                   trunks: tuple[str, ...] = _TRUNKS) -> str | None:
    """Why legrad cannot run this timm trunk (None when it can); ``trunks``: the accepted classes."""
    if not _is(trunk, trunks):
        return f"timm {type(trunk).__name__} is not a ViT-style trunk legrad knows"
    if getattr(trunk, "rope_mixed", False):
        return "mixed-mode rotary embeddings are not supported"
    rope = getattr(trunk, "rope", None)
    if rope is not None and not _is(rope, _ROPE_CAT):
        return f"rotary embedding {type(rope).__name__} is not supported"
    if getattr(trunk, "shared_rel_pos", None) is not None and not _is(trunk.shared_rel_pos, _REL_POS_MLP):
        return "shared relative position bias is not supported"
    for blk in trunk.blocks:
        try:
            _Block(blk)
        except TypeError as e:
            return str(e)
        rel = getattr(blk.attn, "rel_pos", None)
        if rel is not None and not _is(rel, _REL_POS_MLP):
            return f"relative position module {type(rel).__name__} is not supported"
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None:
        if not LatentPoolOps.handles(pool):
            return f"attention pool {type(pool).__name__} is not supported"
        if pool.pool not in ("token", "avg"):
            return f"AttentionPoolLatent with pool_type={pool.pool!r} gives no single embedding"
        if pool.mlp is not None:
            try:
                _mlp_parts(pool.mlp)
            except TypeError as e:
                return str(e)
    elif trunk.global_pool not in _CLS_AVG_POOLS:
        return f"global_pool={trunk.global_pool!r} gives no single image embedding"
    if pooled_by_map is not None and pooled_by_map != (pool is not None):
        return "wrong pooling family"
    return None


def _head_problem(head: nn.Module) -> str | None:
    for child in head.children():
        if isinstance(child, (nn.Dropout, nn.Linear, nn.Identity)) or _mlp_kind(child) is not None:
            continue
        return f"open_clip timm head layer {type(child).__name__} is not supported"
    return None


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
    return _trunk_problem(trunk) is None, getattr(trunk, "attn_pool", None) is not None


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
class _TimmTowerAdapter(TowerAdapter):
    """Shared stateless trunk for timm towers; subclasses define what a layer's feature is."""

    pooled_by_map: ClassVar[bool] = False
    #: Trunk attributes holding prefix tokens, in sequence order (DeiT-distilled: cls, dist).
    prefix_token_names: ClassVar[tuple[str, ...]] = ("cls_token", "reg_token")

    @classmethod
    def matches(cls, visual):
        if not _is(visual, _TIMM_MODEL):
            return False
        trunk = getattr(visual, "trunk", None)
        return (trunk is not None and _trunk_problem(trunk, cls.pooled_by_map) is None
                and _head_problem(visual.head) is None)

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
            elif _mlp_kind(child) is not None:
                dim = mlp_final(child).out_features
        return dim

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.trunk, "num_prefix_tokens", 0))

    # ------------------------------------------------------------------ embedding
    def _patches(self, image: torch.Tensor, dtype: torch.dtype, grid: tuple[int, int]) -> torch.Tensor:
        pe = self.trunk.patch_embed
        if _is(pe, _PATCH_EMBED):
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
        return _rope_table(rope, grid, device)

    def _rel_bias(self, rel_pos: nn.Module | None, grid: tuple[int, int], device) -> torch.Tensor | None:
        if rel_pos is None:
            return None
        return _rel_pos_mlp_bias(rel_pos, grid, device)

    def _block_inputs(self, grid: tuple[int, int], device: torch.device):
        rope = self._rope(grid, device)
        shared = self._rel_bias(getattr(self.trunk, "shared_rel_pos", None), grid, device)
        blocks = []
        for blk in self.trunk.blocks:
            bias = self._rel_bias(getattr(blk.attn, "rel_pos", None), grid, device)
            blocks.append((_Block(blk), bias if bias is not None else shared))
        return rope, blocks

    # ------------------------------------------------------------------ head
    def _after_pool(self, y: torch.Tensor) -> torch.Tensor:
        """fc_norm, trunk head and open_clip's head/projection on a pooled ``[B, C]`` vector."""
        t = self.trunk
        y = apply_module(t.fc_norm, y)
        y = apply_module(t.head, y)
        return _apply(self.visual.head, y)

    def _pooled_output(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's own embedding from the last block's tokens (what ``encode_image`` returns)."""
        raise NotImplementedError

    def trace(self, image, compute_dtype):
        grid = self.grid_size(image.shape[-2], image.shape[-1])
        rope, blocks = self._block_inputs(grid, image.device)
        # The embedded tokens are the graph's only leaf: every later activation is a function of them.
        x = self._tokens(image, compute_dtype).detach().requires_grad_(True)
        npt = self.num_prefix_tokens
        steps = []
        with torch.enable_grad():
            for i, (blk, bias) in enumerate(blocks):
                h_in, q, k, v, o = blk.attention(x, rope, bias)
                x = x + blk.attn_residual(blk.ops.out(o, h_in))
                x = x + blk.mlp_branch(x)
                steps.append(LayerStep(layer=i, feature=x, out=o, value=v.detach(), num_prefix_tokens=npt,
                                       query=q.detach(), key=k.detach(), scale=blk.ops.scale, attn_bias=bias,
                                       tokens=h_in))
            embedding = self._pooled_output(x)
        for step in steps:
            step.feature = embedding
        return steps, embedding

    def _run(self, image: torch.Tensor, start: int, compute_dtype: torch.dtype):
        """Embeds the image and runs the blocks below ``start`` (in the model dtype).

        Returns:
            ``(x, rope, blocks)``: tokens ``[B, N, C]`` entering block ``start``, in ``compute_dtype``; the
            rotary table (or None); ``(block, attention bias)`` for every block.
        """
        model_dtype = self.param_dtype()
        grid = self.grid_size(image.shape[-2], image.shape[-1])
        rope, blocks = self._block_inputs(grid, image.device)
        x = self._tokens(image, model_dtype)
        for i in range(start):
            blk, bias = blocks[i]
            x = blk.forward(x, rope, bias)
        return x.to(compute_dtype), rope, blocks


class TimmViTAdapter(_TimmTowerAdapter):
    """timm ViT-style towers pooled by class token or average (EVA01/EVA02, ViTamin, MobileCLIP-B,
    MobileCLIP2-B/L, timm ViT, VisionTransformerRelPos).

    Layer feature: ``proj(head(fc_norm(norm(mean over all tokens of block l's output))))``; gradient
    w.r.t. block ``l``'s self-attention; prefix (class/register) columns dropped.
    """

    family = "timm ViT / EVA / ViTamin / MobileCLIP-B (CLS/avg pool)"
    entry_points = ("compute_legrad", "compute_legrad_clip")
    pooled_by_map = False

    def _pooled_output(self, x):
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

    def steps(self, image, start, compute_dtype):
        x, rope, blocks = self._run(image, start, compute_dtype)
        npt = self.num_prefix_tokens
        for i in range(start, len(blocks)):
            blk, bias = blocks[i]
            o, q, k, v, pooled, x = blk.explained(x, rope, bias)
            with torch.enable_grad():
                feature = self._after_pool(apply_module(self.trunk.norm, pooled))
            yield LayerStep(layer=i, feature=feature, out=o, value=v, num_prefix_tokens=npt, query=q, key=k,
                            scale=blk.ops.scale, attn_bias=bias)
            del o, q, k, v, pooled, feature  # the consumer is done with this layer: free its graph now


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

    @property
    def uses_attention_pooler(self):
        return True

    def _pool_keys(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Tokens the pooler attends to and how many of them are prefix tokens."""
        t = self.trunk
        x = apply_module(t.norm, z)
        npt = self.num_prefix_tokens
        # timm's VisionTransformer hides prefix tokens from the pooler unless pool_include_prefix; Eva does not.
        if hasattr(t, "pool_include_prefix") and not t.pool_include_prefix:
            return x[:, npt:], 0
        return x, npt

    def _pool_attention(self, z: torch.Tensor):
        """Pooler queries/keys/values on block output ``z``: ``(ops, q, k, v, prefix tokens among keys)``."""
        pool = self.trunk.attn_pool
        ops = LatentPoolOps(pool)
        keys, npt = self._pool_keys(z)
        if pool.pos_embed is not None:
            if pool.pos_embed.shape[0] != keys.shape[1]:
                raise ValueError(
                    f"this tower's attention pool has a fixed position embedding for {pool.pos_embed.shape[0]} "
                    f"tokens; the image gives {keys.shape[1]}: use the model's own image size"
                )
            keys = keys + param(pool.pos_embed, keys.dtype)
        latent = ops.latent(keys.shape[0], keys.dtype)
        if pool.pool == "token":  # later ops are per latent row: only row 0 reaches the embedding
            latent = latent[:, :1]
        q, k, v = ops.qkv(latent, keys)
        return ops, q, k, v, npt

    def _pool_output(self, ops: LatentPoolOps, o: torch.Tensor) -> torch.Tensor:
        """From the pooler's per-head attention output ``o`` to the tower's embedding."""
        pool = self.trunk.attn_pool
        y = ops.out(o)
        if pool.mlp is not None:
            y = y + apply_mlp(pool.mlp, apply_module(pool.norm, y))
        y = y[:, 0] if pool.pool == "token" else y.mean(1)
        return self._after_pool(y)

    def _pooled_output(self, x):
        ops, q, k, v, _ = self._pool_attention(x)
        return self._pool_output(ops, ops.attend(q, k, v))

    def pooler_step(self, layer: int, z: torch.Tensor) -> LayerStep:
        """The explained pooler on block ``layer``'s output ``z`` ``[B, N, C]``."""
        ops, q, k, v, npt = self._pool_attention(z)
        o = ops.attend(q, k, v).detach().requires_grad_(True)
        with torch.enable_grad():
            feature = self._pool_output(ops, o)
        return LayerStep(layer=layer, feature=feature, out=o, value=v, num_prefix_tokens=npt, query=q, key=k,
                         scale=ops.scale)

    def steps(self, image, start, compute_dtype) -> Iterator[LayerStep]:
        x, rope, blocks = self._run(image, start, compute_dtype)
        for i in range(start, len(blocks)):
            blk, bias = blocks[i]
            x = blk.forward(x, rope, bias)
            yield self.pooler_step(i, x)


# ---------------------------------------------------------------------------------------------- tables
def _rope_table(rope: nn.Module, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[sin | cos]`` rotary table for a grid, from a ``RotaryEmbeddingCat``'s bands and settings."""
    from timm.layers.pos_embed_sincos import build_rotary_pos_embed

    accepted = inspect.signature(build_rotary_pos_embed).parameters
    settings = {
        "in_pixels": rope.in_pixels,
        "ref_feat_shape": rope.ref_feat_shape,
        "grid_offset": getattr(rope, "grid_offset", 0.0),
        "grid_indexing": getattr(rope, "grid_indexing", "ij"),
        "rotate_half": getattr(rope, "rotate_half", False),
        "grid_type": getattr(rope, "grid_type", None),
        "normalize_coords": getattr(rope, "normalize_coords", "separate"),
    }
    kwargs = {k: val for k, val in settings.items() if k in accepted}
    bands = rope.bands.detach().to(device=device, dtype=torch.float32)
    sin, cos = build_rotary_pos_embed(list(grid), bands=bands, device=device, dtype=torch.float32, **kwargs)
    return torch.cat([sin, cos], dim=-1)


def _rel_pos_mlp_bias(rel: nn.Module, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Additive attention bias ``[1, H, N, N]`` of a ``RelPosMlp`` for a grid (its MLP, eval semantics)."""
    from timm.layers.pos_embed_rel import gen_relative_log_coords, gen_relative_position_index

    coords = gen_relative_log_coords(tuple(grid), tuple(rel.pretrained_window_size), mode=rel.mode, device=device,
                                     dtype=torch.float32)
    bias = apply_mlp(rel.mlp, coords)  # [2gh-1, 2gw-1, heads]
    n = grid[0] * grid[1]
    index = gen_relative_position_index(tuple(grid), device=device).view(-1)
    bias = bias.reshape(-1, rel.num_heads)[index].view(n, n, rel.num_heads).permute(2, 0, 1)
    bias = apply_module(rel.bias_act, bias)
    if rel.bias_gain is not None:
        bias = rel.bias_gain * bias
    if rel.prefix_tokens:
        bias = F.pad(bias, [rel.prefix_tokens, 0, rel.prefix_tokens, 0])
    return bias.unsqueeze(0)

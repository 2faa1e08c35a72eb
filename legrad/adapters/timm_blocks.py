"""Stateless building blocks of timm's ViT-style trunks, shared by the open_clip timm towers
(:mod:`legrad.adapters.timm`) and the timm classifiers (:mod:`legrad.adapters.classifiers.timm`).

:func:`timm_block` declares one timm block (pre- or post-norm) for the runner (:mod:`legrad.adapters.runner`); the MLP helpers know
timm's MLP classes; :func:`trunk_problem` says why a trunk is not supported (from its classes, never its
name); :func:`rope_table` / :func:`rel_pos_mlp_bias` build grid-dependent position tables from the
modules' own settings, without writing to them. timm itself is only imported when a timm model is used.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import LatentPoolOps, TimmSelfAttentionOps, attention_ops_for, exact_types
from ..ops.functional import apply_module, linear, param
from .runner import Block, Fn, chain

__all__ = [
    "TRUNKS", "PATCH_EMBED", "TIMM_MODEL", "timm_block", "is_exact", "mlp_kind", "mlp_hidden",
    "mlp_final", "apply_mlp", "apply_head_module", "trunk_problem", "head_problem", "reference_problem",
    "rope_table", "rel_pos_mlp_bias",
]

TRUNKS = (
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
PATCH_EMBED = ("timm.layers.patch_embed.PatchEmbed",)
_ROPE_CAT = ("timm.layers.pos_embed_sincos.RotaryEmbeddingCat",)
_REL_POS_MLP = ("timm.layers.pos_embed_rel.RelPosMlp",)
TIMM_MODEL = ("open_clip.timm_model.TimmModel",)
_CLS_AVG_POOLS = frozenset({"token", "avg", "avgmax", "max"})


def is_exact(module: Any, paths: tuple[str, ...]) -> bool:
    return module is not None and type(module) in exact_types(paths)


def mlp_kind(mlp: nn.Module) -> str | None:
    for path, kind in _MLPS.items():
        if is_exact(mlp, (path,)):
            return kind
    return None


# ---------------------------------------------------------------------------------------------- eval view
# ---------------------------------------------------------------------------------------------- MLPs
def _mlp_parts(mlp: nn.Module) -> tuple[str, nn.Linear]:
    kind = mlp_kind(mlp)
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


def apply_head_module(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`apply_module` that also knows timm MLPs (heads may hold one)."""
    if mlp_kind(mod) is not None:
        return apply_mlp(mod, x)
    if isinstance(mod, nn.Sequential):
        for child in mod:
            x = apply_head_module(child, x)
        return x
    return apply_module(mod, x)


# ---------------------------------------------------------------------------------------------- blocks
def _layer_scale(blk: nn.Module, which: int) -> Fn:
    gamma = getattr(blk, f"gamma_{which}", None)  # EvaBlock stores layer scale as a bare parameter
    if gamma is not None:
        return lambda y: y * param(gamma, y.dtype)
    return chain(getattr(blk, f"ls{which}", None))


def timm_block(blk: nn.Module, bias: torch.Tensor | None = None) -> Block:
    """One timm block, declared: pre-norm ``x + s(f(norm(x)))`` or post-norm ``x + norm(f(x))``.

    Raises:
        TypeError: for a block, attention or MLP class legrad does not know.
    """
    if is_exact(blk, _PRE_NORM_BLOCKS):
        post_norm = False
    elif is_exact(blk, _POST_NORM_BLOCKS):
        post_norm = True
    else:
        raise TypeError(f"legrad does not support the timm block {type(blk).__module__}.{type(blk).__name__}")
    ops = attention_ops_for(blk.attn)
    if not isinstance(ops, TimmSelfAttentionOps):
        raise TypeError(f"legrad does not support {type(blk.attn).__name__} inside {type(blk).__name__}")
    mlp = blk.mlp
    final = chain(mlp_final(mlp))
    if post_norm:
        return Block(attn=ops, scale1=chain(blk.norm1), mlp_in=lambda t: mlp_hidden(mlp, t), mlp_out=final,
                     scale2=chain(blk.norm2), post_norm=True, bias=bias)
    return Block(attn=ops, norm1=chain(blk.norm1), scale1=_layer_scale(blk, 1), norm2=chain(blk.norm2),
                 mlp_in=lambda t: mlp_hidden(mlp, t), mlp_out=final, scale2=_layer_scale(blk, 2), bias=bias)


# ---------------------------------------------------------------------------------------------- support
def trunk_problem(trunk: nn.Module, pooled_by_map: bool | None = None,
                   trunks: tuple[str, ...] = TRUNKS) -> str | None:
    """Why legrad cannot run this timm trunk (None when it can); ``trunks``: the accepted classes."""
    if not is_exact(trunk, trunks):
        return f"timm {type(trunk).__name__} is not a ViT-style trunk legrad knows"
    if getattr(trunk, "rope_mixed", False):
        return "mixed-mode rotary embeddings are not supported"
    rope = getattr(trunk, "rope", None)
    if rope is not None and not is_exact(rope, _ROPE_CAT):
        return f"rotary embedding {type(rope).__name__} is not supported"
    if getattr(trunk, "shared_rel_pos", None) is not None and not is_exact(trunk.shared_rel_pos, _REL_POS_MLP):
        return "shared relative position bias is not supported"
    for blk in trunk.blocks:
        try:
            timm_block(blk)
        except TypeError as e:
            return str(e)
        rel = getattr(blk.attn, "rel_pos", None)
        if rel is not None and not is_exact(rel, _REL_POS_MLP):
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


def head_problem(head: nn.Module) -> str | None:
    for child in head.children():
        if isinstance(child, (nn.Dropout, nn.Linear, nn.Identity)) or mlp_kind(child) is not None:
            continue
        return f"open_clip timm head layer {type(child).__name__} is not supported"
    return None


def reference_problem(visual: nn.Module) -> str | None:
    """Why legrad-torch 1.1 never explained this ``map``-pooled open_clip timm tower (None when it did).

    The original re-ran each block with a plain pre-norm block forward, fed its raw output to the
    pooler and scored the pooler's output (one latent query) directly, and shaped the map as a square
    grid of all tokens: so it handled timm ``VisionTransformer`` trunks of plain ``Block`` s, without
    prefix tokens and with nothing after the pooler (SigLIP, SigLIP2).
    """
    if not is_exact(visual, TIMM_MODEL):
        return f"{type(visual).__name__} is not an open_clip TimmModel"
    trunk = visual.trunk
    if not is_exact(trunk, TRUNKS[:1]):
        return f"its trunk is timm {type(trunk).__name__}, not VisionTransformer"
    if not all(is_exact(blk, _PRE_NORM_BLOCKS[:1]) for blk in trunk.blocks):
        return "its blocks are not all timm's plain Block"
    if int(getattr(trunk, "num_prefix_tokens", 0)):
        return "it has prefix (class/register) tokens"
    if trunk.attn_pool.latent_len != 1:
        return f"its pooler has {trunk.attn_pool.latent_len} latent queries, not one"
    after = [m for m in (trunk.fc_norm, trunk.head, *visual.head.children())
             if not isinstance(m, (nn.Identity, nn.Dropout))]
    if after:
        return f"layers follow the pooler ({', '.join(type(m).__name__ for m in after)}), which the original skipped"
    return None


# ---------------------------------------------------------------------------------------------- tables
def rope_table(rope: nn.Module, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
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


def rel_pos_mlp_bias(rel: nn.Module, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
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

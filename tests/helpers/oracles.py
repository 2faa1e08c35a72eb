"""Slow, obviously-correct reference implementations used by the tests.

Nothing here imports from ``legrad``: each oracle re-implements the definition directly with explicit
attention probabilities ``A`` that require grad, one prompt and one layer at a time, on a deep copy
of the model in eval mode.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed


def min_max(m: torch.Tensor) -> torch.Tensor:
    """Reference min-max of one map (a constant map becomes zeros)."""
    lo, hi = m.min(), m.max()
    if hi - lo <= 0:
        return torch.zeros_like(m)
    return (m - lo) / (hi - lo)


def explicit_mha(mha: torch.nn.MultiheadAttention, x_q: torch.Tensor, x_kv: torch.Tensor):
    """Returns (A, V, out_fn) with A [B, H, Nq, Nk] a leaf requiring grad and out_fn(A) the MHA output."""
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.split(e)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None, None, None)
    q, k, v = F.linear(x_q, wq, bq), F.linear(x_kv, wk, bk), F.linear(x_kv, wv, bv)
    b, nq, nk = x_q.shape[0], x_q.shape[1], x_kv.shape[1]
    q = q.reshape(b, nq, h, -1).permute(0, 2, 1, 3)
    k = k.reshape(b, nk, h, -1).permute(0, 2, 1, 3)
    v = v.reshape(b, nk, h, -1).permute(0, 2, 1, 3)
    d = q.shape[-1]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / (d ** 0.5)
    attn = logits.softmax(-1).detach().requires_grad_(True)

    def out_fn(a):
        o = torch.einsum("bhqk,bhkd->bhqd", a, v.detach())
        o = o.permute(0, 2, 1, 3).reshape(b, nq, e)
        return mha.out_proj(o)

    return attn, out_fn


def _run_block(blk, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """The module's own forward on batch-first tokens (open_clip < 2.26-ish blocks are sequence-first)."""
    if batch_first:
        return blk(x)
    return blk(x.transpose(0, 1)).transpose(0, 1)


def openclip_vit_oracle(model, image: torch.Tensor, text: torch.Tensor, layer_index: int,
                        normalize: bool = True) -> torch.Tensor:
    """LeGrad for an open_clip ``VisionTransformer`` (CLS/avg pool), per image, prompt and layer.

    Args:
        model: open_clip CLIP model.
        image: ``[B, 3, H, W]``.
        text: ``[P, D]`` or ``[B, P, D]``.
        layer_index: first explained block (negative from the end).
        normalize: min-max normalise each map (False: the raw sum over layers, upsampled).

    Returns:
        ``[B, P, H, W]`` maps.
    """
    model = copy.deepcopy(model).eval()
    v = model.visual
    blocks = v.transformer.resblocks
    start = layer_index % len(blocks)
    batch_first = getattr(v.transformer, "batch_first", False)
    ps = v.patch_size[0] if isinstance(v.patch_size, tuple) else v.patch_size
    out = []
    for b in range(image.shape[0]):
        img = image[b : b + 1].to(next(v.parameters()).dtype)
        t_b = text[b] if text.ndim == 3 else text
        H, W = img.shape[-2:]
        gh, gw = H // ps, W // ps
        with torch.no_grad():
            x = v.conv1(img).flatten(2).transpose(1, 2)
            x = torch.cat([v.class_embedding.reshape(1, 1, -1).to(x.dtype), x], dim=1)
            pos = resample_abs_pos_embed(
                v.positional_embedding.unsqueeze(0), new_size=[gh, gw], old_size=list(v.grid_size),
                num_prefix_tokens=1, interpolation="bicubic", antialias=True,
            )
            x = v.ln_pre(x + pos.to(x.dtype))
            for i in range(start):
                x = _run_block(blocks[i], x, batch_first)
        per_prompt = torch.zeros(t_b.shape[0], H, W, dtype=torch.float64)
        for i in range(start, len(blocks)):
            blk = blocks[i]
            for p in range(t_b.shape[0]):
                h = blk.ln_1(x)
                attn, out_fn = explicit_mha(blk.attn, h, h)
                x1 = x + blk.ls_1(out_fn(attn))
                z = x1 + blk.ls_2(blk.mlp(blk.ln_2(x1)))
                f = F.normalize(v.ln_post(z.mean(1)) @ v.proj, dim=-1)
                s = (f[0] * t_b[p].to(f.dtype)).sum()
                (g,) = torch.autograd.grad(s, attn)
                m = g.clamp(min=0).mean(dim=(1, 2))[0, 1:]
                m = m.reshape(1, 1, gh, gw).double()
                per_prompt[p] += F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[0, 0]
            with torch.no_grad():
                x = _run_block(blk, x, batch_first)
        out.append(torch.stack([min_max(per_prompt[p]) if normalize else per_prompt[p] for p in range(t_b.shape[0])]))
    return torch.stack(out).float()


# ------------------------------------------------------------------------------------------------ CoCa
def _openclip_tokens(v, img):
    """open_clip ViT patch tokens with resampled positions (module forwards), ``[1, 1 + gh * gw, C]``."""
    ps = v.patch_size[0] if isinstance(v.patch_size, tuple) else v.patch_size
    gh, gw = img.shape[-2] // ps, img.shape[-1] // ps
    x = v.conv1(img).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.reshape(1, 1, -1).to(x.dtype), x], dim=1)
    pos = resample_abs_pos_embed(
        v.positional_embedding.unsqueeze(0), new_size=[gh, gw], old_size=list(v.grid_size),
        num_prefix_tokens=1, interpolation="bicubic", antialias=True,
    )
    return v.ln_pre(x + pos.to(x.dtype)), (gh, gw)


def coca_oracle(model, image: torch.Tensor, text: torch.Tensor, layer_index: int) -> torch.Tensor:
    """LeGrad for an open_clip ViT with CoCa's ``AttentionalPooler``, per image, prompt and layer.

    For block l: the pooler runs on block l's output with explicit attention probabilities (all
    queries, a leaf requiring grad), then ``ln_post``, the contrastive query (0, or the mean of the
    others for ``pool_type='avg'``), ``proj``; the map is relu(dS/dA) of the contrastive rows, mean over
    heads, CLS column dropped.
    """
    model = copy.deepcopy(model).eval()
    v = model.visual
    pool = v.attn_pool
    blocks = v.transformer.resblocks
    start = layer_index % len(blocks)
    out = []
    for b in range(image.shape[0]):
        img = image[b : b + 1].to(next(v.parameters()).dtype)
        t_b = text[b] if text.ndim == 3 else text
        H, W = img.shape[-2:]
        with torch.no_grad():
            x, (gh, gw) = _openclip_tokens(v, img)
            for i in range(start):
                x = blocks[i](x)
        grid = torch.zeros(t_b.shape[0], gh, gw, dtype=torch.float64)
        for i in range(start, len(blocks)):
            with torch.no_grad():
                x = blocks[i](x)
            keys = pool.ln_k(x)
            queries = pool.ln_q(pool.query).unsqueeze(0)
            for p in range(t_b.shape[0]):
                attn, out_fn = explicit_mha(pool.attn, queries, keys)
                y = v.ln_post(out_fn(attn))
                pooled = y[:, 0] if v.pool_type == "tok" else y[:, 1:].mean(1)
                f = F.normalize(pooled @ v.proj, dim=-1)
                (g,) = torch.autograd.grad((f[0] * t_b[p].to(f.dtype)).sum(), attn)
                rows = g[:, :, :1] if v.pool_type == "tok" else g[:, :, 1:]
                grid[p] += rows.clamp(min=0).mean(dim=(1, 2))[0, 1:].reshape(gh, gw).double()
        maps = F.interpolate(grid[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        out.append(torch.stack([min_max(m) for m in maps]))
    return torch.stack(out).float()


# ------------------------------------------------------------------------------------------------ timm
class _Stop(Exception):
    pass


def _timm_copy(model, height: int, width: int):
    """Deep copy in eval mode with timm's unfused attention and the trunk resized to the input (timm's
    own ``set_input_size``: resampled absolute positions, rotary and relative tables for the new grid)."""
    model = copy.deepcopy(model).eval()
    for m in model.visual.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model.visual.trunk.set_input_size(img_size=(height, width))
    return model


def block_output(trunk, img, layer: int, leaf_attention: bool):
    """Runs the trunk's own ``forward_features`` up to block ``layer`` and returns its output.

    With ``leaf_attention`` the block's post-softmax attention (timm's unfused path, caught at its
    ``attn_drop``, an identity in eval mode) is replaced by a leaf requiring grad, returned too.
    """
    captured = {}
    handles = []
    if leaf_attention:
        def leaf(mod, inp, out):
            a = out.detach().requires_grad_(True)
            captured["attn"] = a
            return a

        handles.append(trunk.blocks[layer].attn.attn_drop.register_forward_hook(leaf))

    def stop(mod, inp, out):
        captured["z"] = out
        raise _Stop

    handles.append(trunk.blocks[layer].register_forward_hook(stop))
    try:
        trunk.forward_features(img)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured["z"], captured.get("attn")


class ExplicitLatentPool(torch.nn.Module):
    """timm ``AttentionPoolLatent`` written out with its attention probabilities as a leaf."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.attn = None

    def forward(self, x):
        p = self.pool
        b, n, c = x.shape
        if p.pos_embed is not None:
            x = x + p.pos_embed.unsqueeze(0)
        q = p.q(p.latent.expand(b, -1, -1)).reshape(b, p.latent_len, p.num_heads, p.head_dim).transpose(1, 2)
        k, v = p.kv(x).reshape(b, n, 2, p.num_heads, p.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = p.q_norm(q), p.k_norm(k)
        a = ((q * p.scale) @ k.transpose(-1, -2)).softmax(-1).detach().requires_grad_(True)
        self.attn = a
        y = p.proj((a @ v.detach()).transpose(1, 2).reshape(b, p.latent_len, -1))
        if p.mlp is not None:
            y = y + p.mlp(p.norm(y))
        return y[:, 0] if p.pool == "token" else y.mean(1)


def _timm_grid_maps(model, image, text, layer_index, prefix_in_keys):
    """Per image: ``[P, gh, gw]`` summed relevance (before upsampling), for the timm oracles."""
    H, W = image.shape[-2:]
    model = _timm_copy(model, H, W)
    vis = model.visual
    trunk = vis.trunk
    gh, gw = trunk.patch_embed.grid_size
    depth = len(trunk.blocks)
    start = layer_index % depth
    npt = trunk.num_prefix_tokens
    pooled_by_map = getattr(trunk, "attn_pool", None) is not None
    if pooled_by_map:
        explicit = ExplicitLatentPool(trunk.attn_pool)
        trunk.attn_pool = explicit
    out = []
    for b in range(image.shape[0]):
        img = image[b : b + 1].to(next(vis.parameters()).dtype)
        t_b = text[b] if text.ndim == 3 else text
        grid = torch.zeros(t_b.shape[0], gh, gw, dtype=torch.float64)
        for i in range(start, depth):
            for p in range(t_b.shape[0]):
                if pooled_by_map:
                    with torch.no_grad():
                        z, _ = block_output(trunk, img, i, leaf_attention=False)
                    f = vis.head(trunk.forward_head(trunk.norm(z)))
                    attn = explicit.attn
                    drop = npt if prefix_in_keys else 0
                else:
                    z, attn = block_output(trunk, img, i, leaf_attention=True)
                    y = trunk.norm(z.mean(1, keepdim=True))[:, 0]
                    f = vis.head(trunk.head(trunk.fc_norm(y)))
                    drop = npt
                f = F.normalize(f, dim=-1)
                (g,) = torch.autograd.grad((f[0] * t_b[p].to(f.dtype)).sum(), attn)
                if pooled_by_map and trunk.attn_pool.pool.pool == "token":
                    g = g[:, :, :1]
                grid[p] += g.clamp(min=0).mean(dim=(1, 2))[0, drop:].reshape(gh, gw).double()
        out.append(grid)
    return out


def timm_oracle(model, image: torch.Tensor, text: torch.Tensor, layer_index: int,
                empty: torch.Tensor | None = None, threshold: float = 0.8) -> torch.Tensor:
    """LeGrad for open_clip timm towers, per image, prompt and layer, through timm's own forward code.

    CLS/avg-pooled trunks: the attention of block l is a leaf (timm's unfused softmax, caught by a hook
    on a deep copy); the feature is ``head(fc_norm(norm(mean of all tokens of block l)))``.
    ``map``-pooled trunks: the pooler is written out explicitly on block l's output and timm's own
    ``forward_head`` does the rest; the contrastive latent row(s) of its attention are used.
    ``empty``: the empty-prompt embedding ``[D]``; its map (min-maxed on the grid) zeroes the main maps
    where it exceeds ``threshold``.

    Returns:
        ``[B, P, H, W]`` maps.
    """
    H, W = image.shape[-2:]
    trunk = model.visual.trunk
    # timm's VisionTransformer hides prefix tokens from its pooler unless pool_include_prefix; Eva does not.
    prefix_in_keys = not hasattr(trunk, "pool_include_prefix") or bool(trunk.pool_include_prefix)
    grids = _timm_grid_maps(model, image, text, layer_index, prefix_in_keys)
    if empty is not None:
        empty_text = empty.reshape(1, -1)
        empty_grids = _timm_grid_maps(model, image, empty_text, layer_index, prefix_in_keys)
        for grid, e in zip(grids, empty_grids):
            mask = min_max(e[0]) > threshold
            grid[:, mask] = 0
    out = []
    for grid in grids:
        maps = F.interpolate(grid[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        out.append(torch.stack([min_max(m) for m in maps]))
    return torch.stack(out).float()

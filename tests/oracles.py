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


def _min_max(m: torch.Tensor) -> torch.Tensor:
    lo, hi = m.min(), m.max()
    if hi - lo <= 0:
        return torch.zeros_like(m)
    return (m - lo) / (hi - lo)


def _explicit_mha(mha: torch.nn.MultiheadAttention, x_q: torch.Tensor, x_kv: torch.Tensor):
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


def openclip_vit_oracle(model, image: torch.Tensor, text: torch.Tensor, layer_index: int) -> torch.Tensor:
    """LeGrad for an open_clip ``VisionTransformer`` (CLS/avg pool), per image, prompt and layer.

    Args:
        model: open_clip CLIP model.
        image: ``[B, 3, H, W]``.
        text: ``[P, D]`` or ``[B, P, D]``.
        layer_index: first explained block (negative from the end).

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
                attn, out_fn = _explicit_mha(blk.attn, h, h)
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
        out.append(torch.stack([_min_max(per_prompt[p]) for p in range(t_b.shape[0])]))
    return torch.stack(out).float()

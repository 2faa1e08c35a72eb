"""Training losses of the bundled demo CLIP (``scripts/train_toy_clip.py``), on open_clip's ``CLIP``.

* :func:`multi_positive_loss`: the symmetric CLIP loss with several phrases per scene;
* :func:`dense_targets` / :func:`dense_loss`: every patch's embedding scores its object's phrase (stage 2);
* :func:`block_with_probs`, :func:`legrad_patch_map`, :func:`map_loss`, :func:`pick_map_objects`: LeGrad's own
  map, computed inside the training graph, must peak on the prompted object (stage 3).

Imported only by the training script and its tests (``import legrad`` does not load it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import VOCABULARY


def multi_positive_loss(logits: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric CLIP loss with several positives per row and column.

    Args:
        logits: ``[B, V]`` scaled image-phrase similarities.
        pos: ``[B, V]`` bool, True where phrase v is in image b.

    Returns:
        ``(image->text, text->image)`` losses averaged over positive pairs.
    """
    neg_inf = torch.finfo(logits.dtype).min
    neg_only = logits.masked_fill(pos, neg_inf)
    lse_row = torch.logsumexp(neg_only, dim=1, keepdim=True)  # over phrases absent from the image
    lse_col = torch.logsumexp(neg_only, dim=0, keepdim=True)  # over images without the phrase
    i2t = torch.logaddexp(logits, lse_row) - logits
    t2i = torch.logaddexp(logits, lse_col) - logits
    return i2t[pos].mean(), t2i[pos].mean()


def dense_targets(covers: list[torch.Tensor], pos_ids: list[list[int]], background: int) -> torch.Tensor:
    """Per-patch class targets ``[B, grid*grid]``: the phrase of the object covering >= 30 % of the
    patch (the most covered one), ``background`` where objects cover < 2 %, -100 (ignored) otherwise."""
    out = []
    for cover, ids in zip(covers, pos_ids):
        flat = cover.flatten(1)  # [k, N]
        best, arg = flat.max(0)
        t = torch.full_like(arg, -100)
        t[best >= 0.3] = torch.tensor(ids)[arg[best >= 0.3]]
        t[flat.sum(0) < 0.02] = background
        out.append(t)
    return torch.stack(out)


def dense_loss(
    patch_f: torch.Tensor, txt_f: torch.Tensor, bg: torch.Tensor, scale: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of every patch embedding ``[B, N, E]`` over the phrases and a background embedding."""
    classes = torch.cat([txt_f, F.normalize(bg, dim=-1)[None]])  # [V + 1, E]
    logits = scale * F.normalize(patch_f, dim=-1) @ classes.T  # [B, N, V + 1]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)


def block_with_probs(blk: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip ``ResidualAttentionBlock`` (batch first, no mask) with its attention probabilities
    ``[B, H, N, N]`` as a tensor of the graph, so that LeGrad's gradient w.r.t. them can itself be trained.
    ``main`` checks it against the block's own forward before training."""
    attn = blk.attn
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax((q * (d // h) ** -0.5) @ k.transpose(-1, -2), dim=-1)
    o = (probs @ v).transpose(1, 2).reshape(b, n, d)
    x = x + blk.ls_1(attn.out_proj(o))
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, probs


def encode_image_all(
    model: torch.nn.Module, x: torch.Tensor, deep_layers: tuple[int, ...] = (), dense_layers: tuple[int, ...] = (),
    map_layers: tuple[int, ...] = (), traced: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The model's image embedding (its own pooling), the embedding of the mean of all final tokens,
    the mean-token embeddings after the blocks in ``deep_layers`` and the patch-token embeddings
    ``[B, N, E]`` after the blocks in ``dense_layers`` (all through ``ln_post`` and ``proj``).

    The first equals ``model.encode_image(x)``. Blocks in ``map_layers`` append ``(output, attention
    probabilities)`` to ``traced``.

    Raises:
        ValueError: if ``map_layers`` is given without a ``traced`` list to fill.
    """
    if map_layers and traced is None:
        raise ValueError("encode_image_all: map_layers needs a list passed as traced to receive the blocks' "
                         "(output, attention probabilities)")
    visual = model.visual
    tokens = visual._embeds(x)
    deep, dense = [], []
    for i, blk in enumerate(visual.transformer.resblocks):
        if i in map_layers:
            tokens, probs = block_with_probs(blk, tokens)
            traced.append((tokens, probs))
        else:
            tokens = blk(tokens)
        if i in deep_layers:
            deep.append(visual.ln_post(tokens.mean(dim=1)) @ visual.proj)
        if i in dense_layers:
            dense.append(visual.ln_post(tokens[:, 1:]) @ visual.proj)
    if visual.pool_type == "avg":  # open_clip normalises every token, then averages the patch tokens
        cls_f = visual.ln_post(tokens)[:, 1:].mean(dim=1) @ visual.proj
    else:
        cls_f = visual.ln_post(tokens[:, 0]) @ visual.proj
    mean_f = visual.ln_post(tokens.mean(dim=1)) @ visual.proj
    return cls_f, mean_f, deep, dense


def legrad_patch_map(visual: torch.nn.Module, traced: list[tuple[torch.Tensor, torch.Tensor]],
                     txt: torch.Tensor) -> torch.Tensor:
    """LeGrad's patch relevance ``[B, N - 1]`` for one phrase per image (``txt`` ``[B, E]``, normalised),
    summed over the ``(block output, attention probabilities)`` pairs in ``traced``, differentiable
    (the gradient is taken with ``create_graph``): the positive part of d cos(feature_l, text) /
    d probs_l averaged over heads and query rows, the class column dropped. The feature is the block's
    token mean through ``ln_post`` and ``proj``, as legrad's open_clip adapter reads it out."""
    rel = 0
    for tokens, probs in traced:
        feat = F.normalize(visual.ln_post(tokens.mean(dim=1)) @ visual.proj, dim=-1)
        (grad,) = torch.autograd.grad((feat * txt).sum(), probs, create_graph=True)
        rel = rel + grad.clamp(min=0).mean(dim=(1, 2))[:, 1:]
    return rel


def map_loss(rel: torch.Tensor, cover: torch.Tensor, temp: float) -> torch.Tensor:
    """The max-normalised map ``[B, N]``, as a softmax over patches at ``temp``, must put its mass on the
    patches the object covers most (at least half its best patch's coverage; ``cover`` ``[B, N]``)."""
    z = rel / (rel.amax(dim=1, keepdim=True) + 1e-12)
    logp = F.log_softmax(z / temp, dim=1)
    target = cover >= 0.5 * cover.amax(dim=1, keepdim=True)
    return -torch.logsumexp(logp.masked_fill(~target, float("-inf")), dim=1).mean()


def pick_map_objects(pos_ids: list[list[int]], rng: np.random.Generator, shared_prob: float) -> list[int]:
    """One object per scene for the map loss: with ``shared_prob`` one whose colour another object of the
    scene has (where there is one), otherwise any."""
    picks = []
    for ids in pos_ids:
        colours = [VOCABULARY[i].split()[1] for i in ids]
        shared = [j for j, c in enumerate(colours) if colours.count(c) > 1]
        pool = shared if shared and rng.random() < shared_prob else list(range(len(ids)))
        picks.append(int(pool[rng.integers(len(pool))]))
    return picks

"""LeGrad aggregation: from per-layer attention gradients to one heatmap per (image, prompt).

For each explained layer ``l`` and prompt ``p`` (Bousselham et al., 2024, arXiv 2404.03214):

    s_{l,p} = <t_p, normalize(f_l)>,        G = d s_{l,p} / d A_l = (d s_{l,p} / d O_l) V_l^T
    m_{l,p} = mean over heads and query rows of relu(G), prefix key columns dropped

The maps of all layers are summed on the patch grid, upsampled bilinearly to the input size and
min-max normalised per (image, prompt). Upsampling is linear, so summing before it equals summing
the upsampled maps.

The gradients of all prompts come from one forward pass: the backward from the scores to ``O_l`` is
batched over prompts (``is_grads_batched``), in chunks of prompts; ``relu(G)`` is summed over blocks
of query rows, so the working set is ``[chunk, B, heads, block, Nk]`` (memory O(tokens) per row block,
not O(tokens^2) per prompt). Chunk and block both come from one budget (:func:`plan_blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .towers import LayerStep

__all__ = [
    "layer_relevance",
    "accumulate_relevance",
    "upsample",
    "min_max",
    "scores",
    "Scorer",
    "plan_blocks",
    "NonFiniteError",
    "DEFAULT_WORK_BYTES",
    "DEFAULT_CHUNK_BYTES",
]

#: ``scorer(feature [B, E], prompts) -> [B, P]``: a layer's scores, differentiable in ``feature``. The
#: default is :func:`scores` (cosine with text embeddings); classifiers score class logits
#: (:func:`legrad.classifiers.logit_scores`, prompts are then class indices).
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Default memory budget (bytes) for the relevance working set of one batched backward: the prompts'
#: ``dS/dO`` and the ``[chunk, B, heads, block, Nk]`` gradient block. Prompt chunk and query block are
#: both derived from it (:func:`plan_blocks`).
DEFAULT_WORK_BYTES = 32 * 2**20
#: Former name of :data:`DEFAULT_WORK_BYTES`, kept for callers that import it.
DEFAULT_CHUNK_BYTES = DEFAULT_WORK_BYTES
#: Query rows below which a block's matmul stops being efficient; the planner shrinks the prompt
#: chunk before it shrinks blocks below this.
_MIN_EFFICIENT_BLOCK = 64


class NonFiniteError(ValueError):
    """Scores or gradients overflowed to inf/NaN although the inputs were finite."""


def _per_prompt_bytes(step: LayerStep) -> tuple[int, int]:
    """``(fixed, per_row)`` bytes per prompt: the batched backward's activations and ``dS/dO`` (fixed),
    and one query row of the ``[B, heads, rows, Nk]`` gradient block (per row)."""
    b, h, nq, hd = step.out.shape
    nk = step.value.shape[2]
    elt = step.out.element_size()
    # dS/dO plus the batched backward's own activations (~ a few [B, N, 4C] tensors per prompt).
    fixed = b * 8 * nq * h * hd * elt
    per_row = b * h * nk * elt
    return fixed, per_row


def plan_blocks(num_prompts: int, num_queries: int, fixed: int, per_row: int, budget: int = DEFAULT_WORK_BYTES,
                prompt_chunk: int | None = None) -> tuple[int, int]:
    """Prompt chunk and query block sizes whose working set fits ``budget``.

    The working set of one chunk is ``chunk * (fixed + block * per_row)``. All prompts and all rows
    at once when that fits; otherwise prompts are chunked down to keep blocks of at least
    ``_MIN_EFFICIENT_BLOCK`` rows, then the block shrinks, never below ``_MIN_EFFICIENT_BLOCK`` rows
    (or all rows, if fewer): below that, time grows much faster than memory shrinks.

    Args:
        num_prompts: prompts of the call (P).
        num_queries: query rows of the explained attention (Nq).
        fixed: bytes per prompt that do not depend on the block (see :func:`_per_prompt_bytes`).
        per_row: bytes per prompt and query row of the gradient block.
        budget: bytes.
        prompt_chunk: fixes the chunk (the block is still derived from the budget).

    Returns:
        ``(chunk, block)``, both >= 1.
    """
    if prompt_chunk is not None:
        chunk = max(1, min(prompt_chunk, num_prompts))
    elif num_prompts * (fixed + num_queries * per_row) <= budget:
        return num_prompts, num_queries
    else:
        min_block = min(num_queries, _MIN_EFFICIENT_BLOCK)
        chunk = max(1, min(num_prompts, budget // max(fixed + min_block * per_row, 1)))
    block = (budget // chunk - fixed) // max(per_row, 1)
    # Never below an efficient block: when one prompt's fixed part alone exceeds the budget, rows of one
    # would multiply the matmul count for little memory (a block of _MIN_EFFICIENT_BLOCK rows costs far
    # less than ``fixed`` at any size).
    return chunk, int(min(num_queries, max(block, _MIN_EFFICIENT_BLOCK, 1)))


def scores(feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine scores ``[B, P]`` of L2-normalised image features ``[B, E]`` against text ``[P, E]``/``[B, P, E]``."""
    f = F.normalize(feature, dim=-1)
    text = text.to(f.dtype)
    if text.ndim == 2:
        return f @ text.t()
    return torch.einsum("be,bpe->bp", f, text)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"{what} overflowed to inf/NaN although the inputs are finite: the image's values are too large "
            "for the model's dtype (check the preprocessing: pixel values should be normalised to about [-3, 3]; "
            "for a float16/bfloat16 model, also try the float32 model)"
        )


def _prompt_grads(total: torch.Tensor, out: torch.Tensor, lo: int, hi: int, last: bool) -> torch.Tensor:
    """``dS_p/dO`` for prompts ``lo:hi``, ``[hi - lo, *out.shape]``, from one batched backward."""
    if torch.is_anomaly_enabled():
        # Anomaly mode's NaN check calls .item() on every gradient, which vmap (is_grads_batched)
        # cannot batch: one backward per prompt gives the same values.
        with torch.enable_grad():
            parts = total[lo:hi].unbind()  # indexed with grad enabled so each part keeps its graph
        grads = [torch.autograd.grad(part, out, retain_graph=not (last and i == hi - lo - 1))[0]
                 for i, part in enumerate(parts)]
        return torch.stack(grads)
    eye = torch.zeros(hi - lo, total.shape[0], dtype=total.dtype, device=total.device)
    eye[:, lo:hi] = torch.eye(hi - lo, dtype=total.dtype, device=total.device)
    (d_out,) = torch.autograd.grad(total, out, grad_outputs=eye, retain_graph=not last, is_grads_batched=True)
    return d_out


def layer_relevance(step: LayerStep, text: torch.Tensor, prompt_chunk: int | None = None,
                    work_bytes: int | None = None, scorer: Scorer | None = None) -> torch.Tensor:
    """Relevance of each key token for each prompt at one layer.

    ``relu(ds/dA)`` is accumulated over blocks of query rows (relu and the mean over rows act row by
    row), so no more than ``[chunk, B, heads, block, Nk]`` of it is ever held.

    Args:
        step: the layer's :class:`~legrad.towers.LayerStep`.
        text: ``[P, E]`` or ``[B, P, E]`` text embeddings (used as given), in the step's dtype.
        prompt_chunk: prompts per batched backward; None picks a size from ``work_bytes``.
        work_bytes: memory budget of the relevance working set (see :func:`plan_blocks`); None for
            :data:`DEFAULT_WORK_BYTES` (read at call time).
        scorer: how ``step.feature`` is scored against ``text``; None for :func:`scores`.

    Returns:
        ``[B, P, Nk - num_prefix_tokens]`` mean over heads and query rows of ``relu(ds/dA)``.

    Raises:
        NonFiniteError: if the scores or the gradients are not finite (numeric overflow).
    """
    with torch.enable_grad():
        s = (scores if scorer is None else scorer)(step.feature, text)
        total = s.sum(0)  # each image's score depends only on its own tokens
    _check_finite(total, "the image-text scores")
    num_prompts = total.shape[0]
    b, h, nq, _ = step.out.shape
    fixed, per_row = _per_prompt_bytes(step)
    budget = DEFAULT_WORK_BYTES if work_bytes is None else work_bytes
    chunk, block = plan_blocks(num_prompts, nq, fixed, per_row, budget, prompt_chunk)
    v_t = step.value.to(step.out.dtype).transpose(-1, -2)  # [B, H, hd, Nk]
    nk = v_t.shape[-1]
    # One buffer for every block of the layer: same-size reuse keeps the allocator from fragmenting.
    buf = torch.empty(chunk * b * h * block * nk, dtype=step.out.dtype, device=step.out.device)
    pieces = []
    for lo in range(0, num_prompts, chunk):
        hi = min(lo + chunk, num_prompts)
        d_out = _prompt_grads(total, step.out, lo, hi, last=hi >= num_prompts)  # [c, B, H, Nq, hd]
        rel = torch.zeros(hi - lo, b, nk, dtype=buf.dtype, device=buf.device)
        for q0 in range(0, nq, block):
            rows = min(block, nq - q0)
            g = buf[: (hi - lo) * b * h * rows * nk].view(hi - lo, b, h, rows, nk)
            torch.matmul(d_out[..., q0:q0 + rows, :], v_t, out=g)  # [c, B, H, rows, Nk]
            rel += g.clamp_min_(0).sum(dim=(2, 3))
        del d_out
        rel = rel / (h * nq)
        _check_finite(rel, "the attention gradients")
        pieces.append(rel.transpose(0, 1))
    rel = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    if step.key_mask is not None:
        rel = rel * step.key_mask[:, None, :].to(rel.dtype)
    return rel[..., step.num_prefix_tokens:]


def accumulate_relevance(
    steps: Iterable[LayerStep], text: torch.Tensor, prompt_chunk: int | None = None,
    work_bytes: int | None = None, scorer: Scorer | None = None,
) -> torch.Tensor:
    """Sum of :func:`layer_relevance` over the explained layers, ``[B, P, num_patches]``."""
    total = None
    for step in steps:
        rel = layer_relevance(step, text, prompt_chunk, work_bytes, scorer=scorer)
        total = rel if total is None else total + rel
        del step
    if total is None:
        raise ValueError("no layer to explain: layer_index selects no block")
    return total


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) upsampling of ``[B, P, gh, gw]`` to ``[B, P, H, W]``."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalises ``[B, P, H, W]`` per (image, prompt); a constant map becomes all zeros."""
    flat = maps.flatten(2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    rng = hi - lo
    ok = rng > torch.finfo(flat.dtype).tiny
    out = torch.where(ok, (flat - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(flat))
    return out.reshape(maps.shape)

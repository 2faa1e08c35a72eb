"""LeGrad relevance: from per-layer attention gradients to one patch-grid map per (image, prompt).

For each explained layer ``l`` and prompt ``p`` (Bousselham et al., 2024, arXiv 2404.03214):

    s_{l,p} = <t_p, normalize(f_l)>,        G = d s_{l,p} / d A_l = (d s_{l,p} / d O_l) V_l^T
    m_{l,p} = mean over heads and query rows of relu(G), prefix key columns dropped

The maps of all layers are summed on the patch grid (:mod:`legrad.engine.maps` then upsamples them
bilinearly and min-max normalises them; upsampling is linear, so summing before it equals summing the
upsampled maps).

The gradients of all prompts come from one forward pass: the backward from the scores to ``O_l`` is
batched over prompts (``is_grads_batched``), in chunks of prompts; ``relu(G)`` is summed over blocks
of query rows, so the working set is ``[chunk, B, heads, block, Nk]`` (memory O(tokens) per row block,
not O(tokens^2) per prompt). Chunk and block both come from one budget (:func:`legrad.engine.budget.plan_blocks`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import budget
from .deadline import check_deadline
from .step import LayerStep, Scorer, cosine_scores

__all__ = ["layer_relevance", "accumulate_relevance", "NonFiniteError"]


class NonFiniteError(ValueError):
    """Scores or gradients overflowed to inf/NaN although the inputs were finite."""


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(
            f"{what} overflowed to inf/NaN although the inputs are finite: the image's values are too large "
            "for the model's dtype (check the preprocessing: pixel values should be normalised to about [-3, 3]; "
            "for a float16/bfloat16 model, also try the float32 model)"
        )


def _prompt_grads(total: torch.Tensor, out: torch.Tensor, lo: int, hi: int, last: bool) -> torch.Tensor:
    """``dS_p/dO`` for prompts ``lo:hi``, ``[hi - lo, *out.shape]``, from one batched backward."""
    if torch.is_anomaly_enabled() or hi - lo == 1:
        # Anomaly mode's NaN check calls .item() on every gradient, which vmap (is_grads_batched)
        # cannot batch: one backward per prompt gives the same values. One prompt needs no batching at all
        # (and a VLM's language model, whose scores a chunk of one "prompt" holds, has ops vmap cannot batch).
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
        step: the layer's :class:`~legrad.engine.step.LayerStep`.
        text: ``[P, E]`` or ``[B, P, E]`` text embeddings (used as given), in the step's dtype.
        prompt_chunk: prompts per batched backward; None picks a size from ``work_bytes``.
        work_bytes: memory budget of the relevance working set (see :func:`~legrad.engine.budget.plan_blocks`); None
            for :data:`~legrad.engine.budget.DEFAULT_WORK_BYTES` (read at call time).
        scorer: how ``step.feature`` is scored against ``text``; None for the cosine.

    Returns:
        ``[B, P, Nk - num_prefix_tokens]`` mean over heads and query rows of ``relu(ds/dA)``.

    Raises:
        NonFiniteError: if the scores or the gradients are not finite (numeric overflow).
    """
    with torch.enable_grad():
        s = (cosine_scores if scorer is None else scorer)(step.feature, text)
        total = s.sum(0)  # each image's score depends only on its own tokens
    _check_finite(total, "the image-text scores")
    num_prompts = total.shape[0]
    b, h, nq, _ = step.out.shape
    fixed, per_row = budget.step_bytes(step)
    work = budget.DEFAULT_WORK_BYTES if work_bytes is None else work_bytes
    chunk, block = budget.plan_blocks(num_prompts, nq, fixed, per_row, work, prompt_chunk)
    v_t = step.value.to(step.out.dtype).transpose(-1, -2)  # [B, H, hd, Nk]
    nk = v_t.shape[-1]
    # One buffer for every block of the layer: same-size reuse keeps the allocator from fragmenting.
    buf = torch.empty(chunk * b * h * block * nk, dtype=step.out.dtype, device=step.out.device)
    pieces = []
    for lo in range(0, num_prompts, chunk):
        check_deadline()
        hi = min(lo + chunk, num_prompts)
        d_out = _prompt_grads(total, step.out, lo, hi, last=hi >= num_prompts)  # [c, B, H, Nq, hd]
        rel = torch.zeros(hi - lo, b, nk, dtype=buf.dtype, device=buf.device)
        for q0 in range(0, nq, block):
            check_deadline()
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
    for step in steps:  # the tower's next blocks run inside this iteration
        check_deadline()
        rel = layer_relevance(step, text, prompt_chunk, work_bytes, scorer=scorer)
        total = rel if total is None else total + rel
        del step
    if total is None:
        raise ValueError("no layer to explain: layer_index selects no block")
    return total

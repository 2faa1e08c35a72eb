"""LeGrad aggregation: from per-layer attention gradients to one heatmap per (image, prompt).

For each explained layer ``l`` and prompt ``p`` (Bousselham et al., 2024, arXiv 2404.03214):

    s_{l,p} = <t_p, normalize(f_l)>,        G = d s_{l,p} / d A_l = (d s_{l,p} / d O_l) V_l^T
    m_{l,p} = mean over heads and query rows of relu(G), prefix key columns dropped

The maps of all layers are summed on the patch grid, upsampled bilinearly to the input size and
min-max normalised per (image, prompt). Upsampling is linear, so summing before it equals summing
the upsampled maps.

The gradients of all prompts come from one forward pass: the backward from the scores to ``O_l`` is
batched over prompts (``is_grads_batched``), in chunks whose size bounds the memory used for the
``[chunk, B, heads, Nq, Nk]`` gradient tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .towers import LayerStep

__all__ = ["layer_relevance", "accumulate_relevance", "upsample", "min_max", "scores", "Scorer", "DEFAULT_CHUNK_BYTES"]

#: ``scorer(feature [B, E], prompts) -> [B, P]``: a layer's scores, differentiable in ``feature``. The
#: default is :func:`scores` (cosine with text embeddings); classifiers score class logits
#: (:func:`legrad.classifiers.logit_scores`, prompts are then class indices).
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Default memory budget for one chunk of prompts' attention gradients (bytes).
DEFAULT_CHUNK_BYTES = 384 * 2**20


def _prompt_chunk_size(step: LayerStep, num_prompts: int, prompt_chunk: int | None) -> int:
    if prompt_chunk is not None:
        return max(1, min(prompt_chunk, num_prompts))
    b, h, nq, hd = step.out.shape
    nk = step.value.shape[2]
    width = h * hd
    # dA plus the batched backward's own activations (~ a few [B, N, 4C] tensors per prompt).
    per_prompt = b * (h * nq * nk + 8 * nq * width) * step.out.element_size()
    return max(1, min(num_prompts, DEFAULT_CHUNK_BYTES // max(per_prompt, 1)))


def scores(feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine scores ``[B, P]`` of L2-normalised image features ``[B, E]`` against text ``[P, E]``/``[B, P, E]``."""
    f = F.normalize(feature, dim=-1)
    text = text.to(f.dtype)
    if text.ndim == 2:
        return f @ text.t()
    return torch.einsum("be,bpe->bp", f, text)


def layer_relevance(step: LayerStep, text: torch.Tensor, prompt_chunk: int | None = None,
                    scorer: Scorer | None = None) -> torch.Tensor:
    """Relevance of each key token for each prompt at one layer.

    Args:
        step: the layer's :class:`~legrad.towers.LayerStep`.
        text: ``[P, E]`` or ``[B, P, E]`` text embeddings (used as given), in the step's dtype.
        prompt_chunk: prompts per batched backward; None picks a size from a memory budget.
        scorer: how ``step.feature`` is scored against ``text``; None for :func:`scores`.

    Returns:
        ``[B, P, Nk - num_prefix_tokens]`` mean over heads and query rows of ``relu(ds/dA)``.
    """
    with torch.enable_grad():
        s = (scores if scorer is None else scorer)(step.feature, text)
        total = s.sum(0)  # each image's score depends only on its own tokens
    num_prompts = total.shape[0]
    chunk = _prompt_chunk_size(step, num_prompts, prompt_chunk)
    v_t = step.value.to(step.out.dtype).transpose(-1, -2)  # [B, H, hd, Nk]
    eye = torch.eye(num_prompts, dtype=total.dtype, device=total.device)
    pieces = []
    for lo in range(0, num_prompts, chunk):
        hi = min(lo + chunk, num_prompts)
        (d_out,) = torch.autograd.grad(
            total, step.out, grad_outputs=eye[lo:hi], retain_graph=hi < num_prompts, is_grads_batched=True
        )
        grad_attn = torch.matmul(d_out, v_t)  # [c, B, H, Nq, Nk]
        rel = grad_attn.clamp_min_(0).mean(dim=(2, 3))  # [c, B, Nk]
        pieces.append(rel.transpose(0, 1))
        del d_out, grad_attn
    rel = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    if step.key_mask is not None:
        rel = rel * step.key_mask[:, None, :].to(rel.dtype)
    return rel[..., step.num_prefix_tokens:]


def accumulate_relevance(
    steps: Iterable[LayerStep], text: torch.Tensor, prompt_chunk: int | None = None, scorer: Scorer | None = None
) -> torch.Tensor:
    """Sum of :func:`layer_relevance` over the explained layers, ``[B, P, num_patches]``."""
    total = None
    for step in steps:
        rel = layer_relevance(step, text, prompt_chunk, scorer)
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

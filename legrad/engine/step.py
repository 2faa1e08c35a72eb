"""What an adapter hands to the engine: one :class:`LayerStep` per explained layer, the validated
:class:`ImageBatch` of a call, and the scorers that turn a layer's feature into the scores LeGrad
differentiates (cosine with text embeddings for vision-language towers, a class logit for classifiers;
the targets of :mod:`~legrad.engine.targets` choose among them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LayerStep", "ImageBatch", "Scorer", "compute_dtype_for", "cosine_scores", "dot_scores", "logit_scores"]


@dataclass
class LayerStep:
    """What one explained layer hands to the heatmap engine.

    Attributes:
        layer: block index (0-based) this step explains.
        feature: ``[B, E]`` the tower's (un-normalised) embedding for this layer, a function of ``out``.
        out: ``[B, H, Nq, hd]`` per-head attention output (leaf, ``requires_grad=True``); only the
            query rows that matter (all rows for self-attention, the contrastive query for poolers).
        value: ``[B, H, Nk, hd]`` the attention's values (no grad).
        num_prefix_tokens: leading key columns that are not patch positions (dropped from the map).
        key_mask: optional ``[B, Nk]`` bool, False for padded keys that must get no relevance.
        query: ``[B, H, Nq, hd]`` queries as the kernel sees them (after any q/k norm or rotary
            embedding), for :meth:`probs`; None if the adapter does not provide them.
        key: ``[B, H, Nk, hd]`` keys, likewise.
        scale: softmax temperature applied to ``query @ key^T`` (default ``hd ** -0.5``).
        attn_bias: optional additive logit bias broadcastable to ``[B, H, Nq, Nk]`` (relative positions).
        block_output: ``[B, N, C]`` the block's output tokens (no grad), set by towers whose layer
            feature is not the model's own pooling, so that the last step yields the model's embedding
            (``TowerAdapter.readout``, ``return_scores``).
    """

    layer: int
    feature: torch.Tensor
    out: torch.Tensor
    value: torch.Tensor
    num_prefix_tokens: int
    key_mask: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    scale: float | None = None
    attn_bias: torch.Tensor | None = None
    block_output: torch.Tensor | None = None

    def probs(self, rows: slice | None = None) -> torch.Tensor:
        """Post-softmax attention probabilities ``[B, H, Nq, Nk]`` of the explained attention (no grad).

        Used by baselines (raw attention, rollout, CheferCAM) and tests; LeGrad itself never needs them.

        Args:
            rows: only these query rows (``[B, H, len(rows), Nk]``); softmax acts per row, so a block of
                rows equals the same rows of the full matrix.
        """
        if self.query is None or self.key is None:
            raise NotImplementedError("this tower adapter does not expose queries/keys")
        scale = self.query.shape[-1] ** -0.5 if self.scale is None else self.scale
        query = self.query if rows is None else self.query[..., rows, :]
        logits = (query * scale) @ self.key.transpose(-1, -2)
        if self.attn_bias is not None:
            bias = self.attn_bias.to(logits.dtype)
            if rows is not None and bias.shape[-2] != 1:
                bias = bias[..., rows, :]
            logits = logits + bias
        if self.key_mask is not None:
            logits = logits.masked_fill(~self.key_mask[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)


#: What ``TowerAdapter.steps`` takes as its image: one tensor, or a tuple of tensors for families whose
#: inputs are several tensors (Siglip2 NaFlex: pixel values, patch mask, spatial shapes).
ModelInput = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass
class ImageBatch:
    """A validated image batch, as ``TowerAdapter.prepare_inputs`` returns it.

    Attributes:
        pixels: what ``steps``/``trace`` take: ``[B, C, H, W]``, or a tuple of tensors (its floating
            tensors are cast to the model's dtype by the pipeline, the others only moved).
        grids: ``(gh, gw)`` patch grid of each image (B entries); the relevance of image ``b`` is its
            first ``gh * gw`` key columns after the prefix tokens (the rest is padding).
        sizes: ``(H, W)`` pixel size of each image's map at its native resolution.
        tokens: tokens per image the tower runs on (prefix and padding included), for the memory estimate.
    """

    pixels: ModelInput
    grids: list[tuple[int, int]]
    sizes: list[tuple[int, int]]
    tokens: int

    @property
    def batch(self) -> int:
        return len(self.grids)

    @property
    def device(self) -> torch.device:
        return (self.pixels if isinstance(self.pixels, torch.Tensor) else self.pixels[0]).device


#: ``scorer(feature [B, E], prompts) -> [B, P]``: a layer's scores, differentiable in ``feature``.
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_scores(feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine scores ``[B, P]`` of L2-normalised image features ``[B, E]`` against text ``[P, E]``/``[B, P, E]``."""
    f = F.normalize(feature, dim=-1)
    text = text.to(f.dtype)
    if text.ndim == 2:
        return f @ text.t()
    return torch.einsum("be,bpe->bp", f, text)


def dot_scores(feature: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Plain dot products ``[B, P]`` of un-normalised image features ``[B, E]`` with text ``[P, E]``/``[B, P, E]``
    (legrad-torch 1.1's CoCa score, see ``LeWrapper(reference="1.1")``)."""
    text = text.to(feature.dtype)
    if text.ndim == 2:
        return feature @ text.t()
    return torch.einsum("be,bpe->bp", feature, text)


def logit_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target logits ``[B, P]`` from layer logits ``[B, K]`` and class indices ``[P]`` or ``[B, P]``."""
    target = target.to(logits.device)
    if target.ndim == 1:
        return logits[:, target]
    return logits.gather(1, target)



def compute_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    """The explained layers' dtype: float32 for half-precision models, the model's dtype otherwise."""
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype

"""Attention baselines, prompt-independent: :class:`RawAttention` and :class:`AttentionRollout`.

Notation (as in :mod:`legrad.eval.baselines`): ``A_l`` is block ``l``'s post-softmax attention
``[heads, N, N]``, ``E_h`` the mean over heads, the "CLS row" the row of the token the model pools
(:func:`readout_row`). Prefix columns are dropped from every map.
The target only sets ``P``: the map is the same for every prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..engine.step import LayerStep
from .base import BaselineMethod, Run
from .targets import Target

__all__ = ["RawAttention", "AttentionRollout", "patch_columns", "readout_row", "require_self_attention"]


def readout_row(adapter: Any, mat: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The row of the token(s) the model's readout pools, of a token-to-token matrix ``[B, Nq, Nk]`` -> ``[B, Nk]``,
    from the tower's description (``readout_tokens``, ``pools_by_average``).

    Attention poolers (``Nq != Nk``): the mean of their query rows; a readout of several leading tokens (distilled
    DeiT): the mean of their rows; average pooling (or no prefix token): the mean of the patch rows; otherwise
    the first (class) token's row.
    """
    nq, nk = mat.shape[-2:]
    if nq != nk:
        return mat.mean(1)
    if adapter.readout_tokens > 1:
        return mat[:, :adapter.readout_tokens].mean(1)
    if adapter.pools_by_average or num_prefix_tokens == 0:
        return mat[:, num_prefix_tokens:].mean(1)
    return mat[:, 0]


def patch_columns(step: LayerStep, rel: torch.Tensor) -> torch.Tensor:
    """Zeroes padded keys and drops the prefix columns: ``[B, ..., Nk]`` -> ``[B, ..., patches]``."""
    if step.key_mask is not None:
        shape = (rel.shape[0],) + (1,) * (rel.ndim - 2) + (rel.shape[-1],)
        rel = rel * step.key_mask.reshape(shape).to(rel.dtype)
    return rel[..., step.num_prefix_tokens:]


def require_self_attention(run: Run, step: LayerStep, method: str) -> None:
    """Refuses towers explained through an attention pooler (no token-to-token matrix of the blocks)."""
    nq, nk = step.query.shape[-2], step.key.shape[-2]
    if nq != nk:
        raise NotImplementedError(
            f"{method} needs every block's self-attention, but the {run.adapter.family} adapter explains "
            "each layer through its attention pooler; use legrad or raw_attention for this model"
        )


def _attention_steps(run: Run, start: int) -> Iterator[LayerStep]:
    # steps() builds a small per-layer graph for LeGrad; the attention baselines just ignore it.
    return run.adapter.steps(run.image, start, run.dtype)


class RawAttention(BaselineMethod):
    """Raw attention: ``E_h A_L[cls, patches]`` of the last block (the pooler's attention for pooled towers)."""

    name = "raw_attention"

    def maps(self, image: Any, target: Target, normalize: bool, **call_options: Any) -> torch.Tensor:
        self.no_call_options(call_options)
        run = Run(self.wrapper, image, target)
        with torch.inference_mode(False), torch.no_grad():
            last = None
            for step in _attention_steps(run, run.adapter.depth - 1):
                last = step
            a = last.probs().mean(1)  # [B, Nq, Nk]
            rel = patch_columns(last, readout_row(run.adapter, a, last.num_prefix_tokens))
            return run.finish(rel[:, None], normalize)


class AttentionRollout(BaselineMethod):
    """Attention rollout (Abnar & Zuidema, 2020): ``R = prod_l (0.5 E_h A_l + 0.5 I)``, map ``R[cls, patches]``.

    Options:
        start_layer: first block of the product (negative counts from the end); 0 = all blocks.
    """

    name = "rollout"
    options = {"start_layer": 0}
    first_block = "start_layer"

    def maps(self, image: Any, target: Target, normalize: bool, **call_options: Any) -> torch.Tensor:
        self.no_call_options(call_options)
        run = Run(self.wrapper, image, target)
        depth = run.adapter.depth
        start = self.start_block(depth)
        with torch.inference_mode(False), torch.no_grad():
            rollout, last = None, None
            for step in _attention_steps(run, start):
                require_self_attention(run, step, "attention rollout")
                a = step.probs().mean(1).to(torch.float64)  # [B, N, N]; float64: a long product of matrices
                a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
                rollout = a if rollout is None else a @ rollout
                last = step
            rel = patch_columns(last, readout_row(run.adapter, rollout, last.num_prefix_tokens))
            return run.finish(rel[:, None], normalize)

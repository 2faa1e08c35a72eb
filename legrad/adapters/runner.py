"""One block runner for every declared tower: a family states what its tower is made of
(:class:`Block`, :class:`Pooler`, :class:`Run`) and :class:`BlockTower` derives the three ways legrad
runs it from that one description:

* **plain** (:func:`plain_block`): the blocks below the explained layers, no graph;
* **explained** (:func:`explained_block`, :func:`pooler_step`): one :class:`LayerStep` per layer, the
  attention output ``O`` as the only leaf;
* **traced** (:func:`traced_block`): the whole tower as one graph, for the gradient baselines;

and, with the family's :meth:`BlockTower.readout` (the model's own output from the last block's tokens), the
plain run of every block that the drift guard and ``class_logits`` compute (:func:`rerun`).

A block is ``x + scale1(attn(norm1(x)))`` then ``x + scale2(mlp_out(mlp_in(norm2(x))))``; post-norm
blocks put their norms in ``scale1``/``scale2`` (``post_norm=True``). The pooled-gradient step (the
token mean commutes with the MLP's final affine layer and a linear ``scale2``, so the explained graph
holds ``[B, C]`` there instead of ``[B, N, C]``) exists only in :func:`explained_block`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.step import LayerStep, ModelInput
from ..ops.attention import AttentionOps
from ..ops.functional import apply_module
from .base import TowerAdapter
from .capabilities import TracedStep, missing

__all__ = ["Block", "Fn", "Pooler", "Run", "BlockTower", "identity", "chain", "pool", "attention", "after_attention", "plain_block",
           "explained_block", "traced_block", "pooler_step", "rerun"]

Fn = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    """The identity (an absent norm or layer scale)."""
    return x


def chain(*mods: nn.Module | None) -> Fn:
    """The function applying ``mods`` in order with eval semantics (:func:`~legrad.ops.functional.apply_module`;
    None entries are skipped)."""
    mods = tuple(m for m in mods if m is not None)

    def apply(x: torch.Tensor) -> torch.Tensor:
        for m in mods:
            x = apply_module(m, x)
        return x

    return apply


@dataclass
class Block:
    """What one transformer block is made of; every part is a stateless function of ``[B, N, C]`` tokens.

    Attributes:
        attn: the block's attention (one :class:`AttentionOps` interface for every module type).
        mlp_in: the MLP up to (not including) its final affine layer.
        mlp_out: the MLP's final affine layer.
        norm1: the attention's input norm (pre-norm); identity for post-norm blocks.
        scale1: on the attention output before the residual add (layer scale; post-norm: the norm).
        norm2: the MLP's input norm (pre-norm); identity for post-norm blocks.
        scale2: on the MLP output before the residual add (layer scale; post-norm: the norm).
        post_norm: whether ``scale2`` is a norm (then the token mean cannot move inside it).
        bias: additive attention bias ``[1, H, N, N]`` (relative positions) or None.
    """

    attn: AttentionOps
    mlp_in: Fn
    mlp_out: Fn
    norm1: Fn = identity
    scale1: Fn = identity
    norm2: Fn = identity
    scale2: Fn = identity
    post_norm: bool = False
    bias: torch.Tensor | None = None


@dataclass
class Pooler:
    """An attention pooler (CoCa's, timm's ``map`` head, SigLIP's head): learned queries over the tokens.

    Attributes:
        attn: the pooler's attention.
        keys: block output ``[B, N, C]`` -> ``(tokens the queries attend to, prefix tokens among them)``.
        queries: those tokens -> the queries ``[B, L, D]`` whose attention is explained.
        finish: the attention's projected output ``[B, L, C]`` -> the embedding ``[B, E]``.
    """

    attn: AttentionOps
    keys: Callable[[torch.Tensor], tuple[torch.Tensor, int]]
    queries: Fn
    finish: Fn


@dataclass
class Run:
    """One call's tower: the tokens entering block 0 and what the blocks need.

    Attributes:
        tokens: ``[B, N, C]`` embedded tokens (patches, prefix tokens, positions, pre-norm).
        blocks: every block, in order.
        prefix: leading tokens that are not patches (class, registers).
        rope: rotary table for the patch tokens, or None.
        key_mask: ``[B, N]`` bool, False for padded tokens, or None.
    """

    tokens: torch.Tensor
    blocks: Sequence[Block]
    prefix: int
    rope: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None


def attention(block: Block, x: torch.Tensor, run: Run | None = None):
    """``(h, q, k, v, o)``: the attention's input, per-head queries/keys/values and output on ``x``
    (``run``: the call's rotary table and key mask; None for neither)."""
    h = block.norm1(x)
    q, k, v = block.attn.qkv(h, rope=None if run is None else run.rope)
    return h, q, k, v, block.attn.attend(q, k, v, bias=block.bias, key_mask=None if run is None else run.key_mask)


def after_attention(block: Block, x: torch.Tensor, h: torch.Tensor | None, o: torch.Tensor) -> torch.Tensor:
    """The rest of the block given its attention output ``o``: both residual branches."""
    x = x + block.scale1(block.attn.out(o, h))
    return x + block.scale2(block.mlp_out(block.mlp_in(block.norm2(x))))


def plain_block(block: Block, x: torch.Tensor, run: Run | None = None) -> torch.Tensor:
    """The block's output ``[B, N, C]`` (eval semantics, no graph of its own)."""
    h, _, _, _, o = attention(block, x, run)
    return after_attention(block, x, h, o)


def _step(layer: int, run: Run, block: Block | None, attn: AttentionOps, feature, o, v, q, k, prefix: int,
          kind: type[LayerStep] = LayerStep, **kw: Any) -> LayerStep:
    return kind(layer=layer, feature=feature, out=o, value=v, num_prefix_tokens=prefix, query=q, key=k,
                scale=attn.scale, attn_bias=None if block is None else block.bias, key_mask=run.key_mask, **kw)


def explained_block(layer: int, block: Block, x: torch.Tensor, run: Run, head: Fn) -> tuple[LayerStep, torch.Tensor]:
    """Block ``layer`` with its attention output as the leaf and ``head(mean over tokens of its output)`` as
    the feature; returns the step and the block output (no grad)."""
    h, q, k, v, o = attention(block, x, run)
    o = o.detach().requires_grad_(True)
    with torch.enable_grad():
        x1 = x + block.scale1(block.attn.out(o, h))
        if block.post_norm:
            y = x1 + block.scale2(block.mlp_out(block.mlp_in(block.norm2(x1))))
            pooled, x_next = y.mean(1), y.detach()
        else:
            hidden = block.mlp_in(block.norm2(x1))
            # The token mean commutes with the MLP's final affine layer and the (linear) layer scale, so the
            # graph keeps [B, C] there instead of [B, N, C]: the batched backward skips one big matmul.
            pooled = x1.mean(1) + block.scale2(block.mlp_out(hidden.mean(1)))
        feature = head(pooled)
    if not block.post_norm:
        with torch.no_grad():
            x_next = x1.detach() + block.scale2(block.mlp_out(hidden.detach()))
    return _step(layer, run, block, block.attn, feature, o, v, q, k, run.prefix, block_output=x_next), x_next


def traced_block(layer: int, block: Block, x: torch.Tensor, run: Run) -> tuple[torch.Tensor, TracedStep]:
    """Block ``layer`` in one differentiable graph (its :class:`TracedStep`'s ``out`` and ``tokens`` are graph
    tensors)."""
    h, q, k, v, o = attention(block, x, run)
    x = after_attention(block, x, h, o)
    return x, _step(layer, run, block, block.attn, x, o, v.detach(), q.detach(), k.detach(), run.prefix,
                    kind=TracedStep, tokens=h)


def _pool_attention(pooler: Pooler, z: torch.Tensor):
    keys, prefix = pooler.keys(z)
    q, k, v = pooler.attn.qkv(pooler.queries(keys), keys)
    return q, k, v, prefix


def pooler_step(layer: int, pooler: Pooler, z: torch.Tensor, run: Run) -> LayerStep:
    """The explained pooler on block ``layer``'s output ``z`` ``[B, N, C]``."""
    q, k, v, prefix = _pool_attention(pooler, z)
    o = pooler.attn.attend(q, k, v, key_mask=run.key_mask).detach().requires_grad_(True)
    with torch.enable_grad():
        feature = pooler.finish(pooler.attn.out(o))
    return _step(layer, run, None, pooler.attn, feature, o, v, q, k, prefix)


def pool(pooler: Pooler, z: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pooler's embedding ``[B, E]`` of block output ``z`` (no leaf)."""
    q, k, v, _ = _pool_attention(pooler, z)
    return pooler.finish(pooler.attn.out(pooler.attn.attend(q, k, v, key_mask=key_mask)))


class BlockTower(TowerAdapter):
    """A :class:`TowerAdapter` whose tower is declared: :meth:`declare` (tokens and blocks of one call),
    :meth:`head` (a layer's feature from its token mean) or :meth:`pooler` (attention-pooled towers), and
    :meth:`readout` (the model's own output; the pooler's by default). ``steps``, ``trace`` and the drift
    guard's re-run (:func:`rerun`) come from the runner."""

    def declare(self, image: ModelInput, dtype: torch.dtype) -> Run:
        """The call's :class:`Run`: tokens in ``dtype`` entering block 0, and every block."""
        raise missing(self, "declare", "the block runner")

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """A layer's feature ``[B, E]`` from the mean ``[B, C]`` of its block's output tokens."""
        raise missing(self, "head", "the block runner (towers without a pooler)")

    def pooler(self) -> Pooler | None:
        """The attention pooler explained at every layer, or None (the token mean and :meth:`head`)."""
        return None

    @property
    def uses_attention_pooler(self) -> bool:
        return self.pooler() is not None

    def steps(self, image: ModelInput, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        run = self.declare(image, self.param_dtype())
        x, blocks = run.tokens, run.blocks
        for i in range(start):
            x = plain_block(blocks[i], x, run)
        x = x.to(compute_dtype)
        pooler = self.pooler()
        for i in range(start, len(blocks)):
            if pooler is not None:
                x = plain_block(blocks[i], x, run)
                yield pooler_step(i, pooler, x, run)
            else:
                step, x = explained_block(i, blocks[i], x, run, self.head)
                yield step
                del step  # free this layer's graph before building the next one

    def readout(self, x: torch.Tensor, context: Run | None = None) -> torch.Tensor:
        """The embedding of an attention-pooled tower: its pooler on the last block's output ``x`` (with the
        context's key mask); towers without a pooler define their own."""
        pooler = self.pooler()
        if pooler is None:
            raise missing(self, "readout", "return_scores, the gradient baselines and the drift guard")
        return pool(pooler, x, None if context is None else context.key_mask)

    def trace_tokens(self, image: ModelInput, compute_dtype: torch.dtype) -> tuple[torch.Tensor, Run]:
        run = self.declare(image, compute_dtype)
        return run.tokens, run

    def trace_block(self, layer: int, x: torch.Tensor, context: Run) -> tuple[torch.Tensor, TracedStep]:
        return traced_block(layer, context.blocks[layer], x, context)


def rerun(adapter: TowerAdapter, image: ModelInput) -> torch.Tensor:
    """legrad's stateless re-run of the model's own output for ``image`` (what ``adapter.own_output`` returns:
    the un-normalised embedding, a classifier's logits, a VLM's image features), in the tower's dtype. Call it
    under ``torch.no_grad()``; the drift guard compares it with the model's forward, ``class_logits`` returns it.

    A :class:`BlockTower`: its declared blocks run plainly, then its :meth:`~BlockTower.readout`; a VLM: its
    image features (``VLMAdapter.tower_features``); any other family: its traced forward's blocks
    (``trace_tokens``, ``trace_block``) and ``readout``, without building a graph.
    """
    dtype = adapter.param_dtype()
    vlm = sys.modules.get("legrad.adapters.vlm.base")  # no VLM adapter exists unless its module was imported
    if vlm is not None and isinstance(adapter, vlm.VLMAdapter):
        return adapter.tower_features(image)
    if isinstance(adapter, BlockTower):
        run = adapter.declare(image, dtype)
        x = run.tokens
        for block in run.blocks:
            x = plain_block(block, x, run)
        return adapter.readout(x, run)
    x, context = adapter.trace_tokens(image, dtype)
    for i in range(adapter.depth):
        x, _ = adapter.trace_block(i, x, context)
    return adapter.readout(x, context)

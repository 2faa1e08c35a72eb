"""The optional part of the tower-adapter protocol: what a family may describe beyond the core of
:class:`~legrad.adapters.base.TowerAdapter` that the pipeline needs. Each member has a default, or raises
:class:`MissingCapability` (a ``TypeError`` naming the family and the member):

* how the tower pools: :attr:`~Capabilities.uses_attention_pooler`, :attr:`~Capabilities.pools_by_average`,
  :attr:`~Capabilities.readout_tokens`; and :meth:`~Capabilities.supports_config` (``list_pretrained``);
* the one readout, :meth:`~Capabilities.readout`: the model's own output from the last block's tokens;
* the traced forward of the gradient baselines: :meth:`~Capabilities.trace` from
  :meth:`~Capabilities.trace_tokens` and :meth:`~Capabilities.trace_block` (the block runner gives all three);
* the drift guard's reference: :meth:`~Capabilities.own_output` (the model's own forward),
  :meth:`~Capabilities.probe_input`, :attr:`~Capabilities.native_size`;
* reference mode: :meth:`~Capabilities.for_reference`.

What the rest of legrad does with them lives there, not in the adapters: the drift guard's and
``class_logits``' re-run (:func:`legrad.adapters.runner.rerun`), ``return_scores``' model output
(:func:`legrad.engine.scores.model_output`), the baselines' pooled row (:func:`legrad.methods.attention.readout_row`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.step import LayerStep, ModelInput

__all__ = ["Capabilities", "MissingCapability", "TracedStep", "missing"]


class MissingCapability(TypeError, NotImplementedError):
    """A family does not provide an optional capability (a ``TypeError``; also a ``NotImplementedError``,
    which callers of earlier releases catch)."""


def missing(adapter: Any, method: str, needed_by: str) -> MissingCapability:
    """The error for ``adapter`` lacking ``method``, which ``needed_by`` needs."""
    return MissingCapability(f"the {adapter.family} adapter has no {method}, which {needed_by} needs")


@dataclass
class TracedStep(LayerStep):
    """A block's step in the traced forward (:meth:`Capabilities.trace`, for the gradient baselines): ``out`` is
    a non-leaf tensor of the one graph of the whole tower, ``feature`` the model's readout.

    Attributes:
        tokens: ``[B, Nk, C]`` the explained attention's (pre-normed) input tokens, part of the graph
            (GradCAM's activations); None if the family does not give them.
    """

    tokens: torch.Tensor | None = None


class Capabilities:
    """Optional members of a tower adapter, with defaults (or :class:`MissingCapability`)."""

    family: str
    visual: nn.Module

    @classmethod
    def supports_config(cls, model_cfg: dict) -> bool:
        """Whether an OpenCLIP model config (``open_clip.get_model_config``) builds a tower of this family."""
        return False

    @property
    def uses_attention_pooler(self) -> bool:
        """Whether the embedding comes from an attention pooler (its queries are the explained rows)."""
        return False

    @property
    def pools_by_average(self) -> bool:
        """Whether the embedding is the average of the patch tokens (else: read from the leading tokens)."""
        return False

    @property
    def readout_tokens(self) -> int:
        """How many leading tokens the readout reads when it neither averages the patches nor pools with
        attention: 1 (the class token), 2 for a distilled DeiT (one head on the class token, one on the
        distillation token, averaged)."""
        return 1

    def for_reference(self, reference: str) -> Any:
        """An adapter computing the original package's maps (``LeWrapper(reference=...)``) for this tower.

        Args:
            reference: a release of legrad-torch (``"1.1"``).

        Returns:
            The adapter (``self`` where the two agree), or None if the original never supported the family.

        Raises:
            ValueError: if the family was supported but this tower has something the original never handled.
        """
        return None

    # ------------------------------------------------------------------ drift guard (legrad.adapters.drift)
    @property
    def native_size(self) -> tuple[int, int]:
        """``(H, W)`` the model's own forward accepts: the tower's ``image_size``, its config's, or its
        patch embedding's ``img_size``."""
        v = self.visual
        size = getattr(v, "image_size", None)
        if size is None:
            size = getattr(getattr(v, "config", None), "image_size", None)
        if size is None:
            size = getattr(getattr(v, "patch_embed", None), "img_size", None)
        if size is None:
            raise missing(self, "native_size", "the drift guard")
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def probe_input(self) -> ModelInput:
        """The drift guard's input: fixed-seed normal noise ``[1, C, H, W]`` at :attr:`native_size`, on the
        tower's device and in its dtype (a private generator: the global RNG is not advanced)."""
        h, w = self.native_size
        noise = torch.randn(1, self.in_chans, h, w, generator=torch.Generator().manual_seed(0))
        return noise.to(self.device(), self.param_dtype())

    def own_output(self, model: nn.Module, image: ModelInput) -> torch.Tensor:
        """The model's own output for ``image`` that legrad's re-run (:func:`~legrad.adapters.runner.rerun`)
        recomputes (open_clip's ``encode_image``, a classifier's logits, Hugging Face image features), un-normalised.

        Args:
            model: an eval-mode view of the wrapped model (never the model itself).
            image: :meth:`probe_input`.

        Raises:
            TypeError: if the family does not declare it (its re-run then cannot be checked).
        """
        raise missing(self, "own_output", "the drift guard")

    # ------------------------------------------------------------------ traced forward (gradient baselines)
    def trace(self, image: ModelInput, compute_dtype: torch.dtype) -> tuple[list[TracedStep], torch.Tensor]:
        """Runs the whole tower as ONE differentiable graph (for gradient baselines: GradCAM, CheferCAM).

        Unlike :meth:`steps`, later blocks depend on earlier ones in the graph, and the embedding is the
        model's own pooled output (what ``encode_image`` returns, un-normalised). Call it under
        ``torch.no_grad()``; the graph is built under ``enable_grad``. Families provide
        :meth:`trace_tokens`, :meth:`trace_block` and :meth:`readout`.

        Args:
            image: as for :meth:`steps`.
            compute_dtype: dtype of the graph.

        Returns:
            ``(steps, embedding)``: one :class:`TracedStep` per block (``out`` and ``tokens`` are non-leaf
            tensors of the graph, ``feature`` is the embedding) and the ``[B, E]`` embedding.

        Raises:
            NotImplementedError: if the family has no traced forward.
        """
        # The embedded tokens are the graph's only leaf: every later activation is a function of them.
        x, context = self.trace_tokens(image, compute_dtype)
        x = x.detach().requires_grad_(True)
        steps = []
        with torch.enable_grad():
            for i in range(self.depth):
                x, step = self.trace_block(i, x, context)
                steps.append(step)
            embedding = self.readout(x, context)
        for step in steps:
            step.feature = embedding
        return steps, embedding

    def trace_tokens(self, image: ModelInput, compute_dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """Tokens ``[B, N, C]`` entering the first block, in ``compute_dtype`` (the traced graph's leaf),
        and a context handed to every :meth:`trace_block` (per-call tables such as rotary embeddings)."""
        raise missing(self, "traced forward (trace_tokens, trace_block)",
                      "the gradient baselines (GradCAM, CheferCAM; LeGrad and raw attention still work)")

    def trace_block(self, layer: int, x: torch.Tensor, context: Any) -> tuple[torch.Tensor, TracedStep]:
        """Block ``layer`` in the traced graph: its output and its :class:`TracedStep` (``out``, ``tokens`` in
        the graph)."""
        raise missing(self, "trace_block", "the gradient baselines")

    def readout(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        """The model's own output from the last block's output tokens ``x`` ``[B, N, C]``: what ``encode_image``
        returns (un-normalised), a classifier's logits ``[B, K]``. ``context``: the call's context (the
        :class:`~legrad.adapters.runner.Run` of a block tower, :meth:`trace_tokens`'s second value), or None.

        The one readout of a tower: the traced forward ends in it, and :func:`~legrad.adapters.runner.rerun`
        (the drift guard, ``class_logits``) and ``return_scores`` apply it to the last block's tokens."""
        raise missing(self, "readout", "return_scores, the gradient baselines and the drift guard")

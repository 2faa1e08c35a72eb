"""transformers ``PaliGemmaForConditionalGeneration``: SigLIP vision tower (no CLS), image features =
``multi_modal_projector(post_layernorm(last block's output))`` (the installed transformers 5.x applies no
other scaling here; the Gemma language model scales all input embeddings itself). The prompt is a prefix
with bidirectional attention (``token_type_ids`` 0); the answer is the causal suffix (type 1). Every block
feeds the features; the default explains the last two.
"""

from __future__ import annotations

import torch

from ...ops.functional import layer_norm, linear
from .base import VLMAdapter

__all__ = ["PaliGemmaAdapter"]


class PaliGemmaAdapter(VLMAdapter):
    """transformers ``PaliGemmaForConditionalGeneration`` (PaliGemma, PaliGemma 2)."""

    family = "transformers PaliGemmaForConditionalGeneration (SigLIP tower, answers explained)"
    model_class = "PaliGemmaForConditionalGeneration"
    prefix_tokens = 0

    def _check(self) -> None:
        if not hasattr(self.visual, "post_layernorm") or hasattr(self.visual, "pre_layrnorm"):
            raise TypeError(f"PaliGemma with a {type(self.visual).__name__} vision tower is not supported (SigLIP only)")
        if not hasattr(self.model.model.multi_modal_projector, "linear"):
            raise TypeError("this PaliGemma's multi_modal_projector is not the single linear layer legrad supports")
        super()._check()

    def _feeding_blocks(self) -> int:
        return len(self.visual.encoder.layers)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual.embeddings(pixels)

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        return linear(self.model.model.multi_modal_projector.linear, layer_norm(self.visual.post_layernorm, y))

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
from .inputs import VLMInputs

__all__ = ["PaliGemmaAdapter"]


class PaliGemmaAdapter(VLMAdapter):
    """transformers ``PaliGemmaForConditionalGeneration`` (PaliGemma, PaliGemma 2)."""

    family = "transformers PaliGemmaForConditionalGeneration (SigLIP tower, answers explained)"
    model_class = "PaliGemmaForConditionalGeneration"
    tower_kind = "SigLIP"

    def _check(self) -> None:
        if not hasattr(self.model.model.multi_modal_projector, "linear"):
            raise TypeError("this PaliGemma's multi_modal_projector is not the single linear layer legrad supports")

    def _feeding_blocks(self) -> int:
        return len(self.visual.encoder.layers)

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        return linear(self.model.model.multi_modal_projector.linear, layer_norm(self.visual.post_layernorm, y))

    def _encoder_output(self, feats: torch.Tensor, call: VLMInputs, images: list[int]) -> torch.Tensor:
        return feats  # PaliGemma's forward takes one tensor (it does not concatenate per-image features)

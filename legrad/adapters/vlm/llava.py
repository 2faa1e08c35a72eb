"""transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5 and alike): CLIP vision tower, image features =
``multi_modal_projector(hidden_states[vision_feature_layer])`` with the CLS token dropped ("default") or kept
("full"). ``hidden_states[k]`` is the output of block ``k - 1``, so the feeding blocks are the first ``k``
(``vision_feature_layer=-2`` on L blocks: blocks 0..L-2; the default explains L-3 and L-2).
"""

from __future__ import annotations

import torch

from ...ops.functional import linear
from ..hf.common import activation
from .base import VLMAdapter
from .feature_layer import checked_feature_layer, feeding_blocks

__all__ = ["LlavaAdapter"]

_STRATEGIES = ("default", "full")


class LlavaAdapter(VLMAdapter):
    """transformers ``LlavaForConditionalGeneration`` with an int ``vision_feature_layer``."""

    family = "transformers LlavaForConditionalGeneration (CLIP tower, answers explained)"
    model_class = "LlavaForConditionalGeneration"
    tower_kind = "CLIP"

    def _check(self) -> None:
        cfg = self.model.config
        checked_feature_layer(cfg, "LLaVA")
        if cfg.vision_feature_select_strategy not in _STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not "
                             f"supported; supported: {_STRATEGIES}")
        proj = self.model.model.multi_modal_projector
        if not all(hasattr(proj, a) for a in ("linear_1", "act", "linear_2")):
            raise TypeError("this LLaVA's multi_modal_projector is not the linear-act-linear one legrad supports")

    def _feeding_blocks(self) -> int:
        return feeding_blocks(self.model.config.vision_feature_layer, len(self.visual.encoder.layers))

    def _num_image_tokens(self, call, row) -> int:
        gh, gw = self._grid()
        return gh * gw + (self.model.config.vision_feature_select_strategy == "full")

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        if self.model.config.vision_feature_select_strategy == "default":
            y = y[:, 1:]
        proj = self.model.model.multi_modal_projector
        return linear(proj.linear_2, activation(proj.act, linear(proj.linear_1, y)))

"""transformers ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision): SigLIP tower (no class token) on
any-resolution tiles as LLaVA-NeXT (``pixel_values`` ``[B, tiles, C, S, S]`` with ``image_sizes``), image features
= ``multi_modal_projector(hidden_states[vision_feature_layer])`` ("full" selection: SigLIP has no class token),
packed by the model's own ``pack_image_features``: the base tile's features first, then the tiles' grid unpadded,
bilinearly shrunk when it exceeds ``vision_aspect_ratio`` ("anyres_max_N"), a newline token per row.

Maps: as LLaVA-NeXT's (:mod:`legrad.adapters.vlm.next`): each tile's relevance on its own patch grid, the
high-resolution tiles laid out in their grid and unpadded as the model unpads its features, the base tile's map
resized onto it and added. The shrinking is part of the feature path (the gradient flows through it), so the
relevance stays on the tiles' patches.
"""

from __future__ import annotations

import torch

from .inputs import VLMInputs
from .llava import LlavaAdapter
from .next import LlavaNextAdapter

__all__ = ["LlavaOnevisionAdapter"]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """transformers ``LlavaOnevisionForConditionalGeneration`` (images, one per sequence; "full" selection, int
    feature layer)."""

    family = "transformers LlavaOnevisionForConditionalGeneration (SigLIP tower, any-resolution tiles, answers explained)"
    model_class = "LlavaOnevisionForConditionalGeneration"
    tower_kind = "SigLIP"
    modeling = "transformers.models.llava_onevision.modeling_llava_onevision"

    def _check(self) -> None:
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "full":
            raise ValueError("LLaVA-OneVision is supported with vision_feature_select_strategy='full' only (its SigLIP "
                             f"tower has no class token to drop), got {cfg.vision_feature_select_strategy!r}")
        ratio = str(getattr(cfg, "vision_aspect_ratio", ""))
        if not (ratio.startswith("anyres_max_") and ratio[len("anyres_max_"):].isdigit()):
            raise ValueError(f"vision_aspect_ratio={ratio!r} is not supported (anyres_max_N is)")
        if not hasattr(self.model.model, "image_newline") or not hasattr(self.model.model, "pack_image_features"):
            raise TypeError("this LLaVA-OneVision has no image_newline / pack_image_features legrad can use")
        LlavaAdapter._check(self)

    def _pack(self, feats: list[torch.Tensor], images: list[int], call: VLMInputs,
              newline: torch.Tensor) -> list[torch.Tensor]:
        sizes = call.image_sizes[images].to(feats[0].device)
        packed, _ = self.model.model.pack_image_features(feats, sizes, image_newline=newline,
                                                         vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return packed

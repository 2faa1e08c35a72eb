"""transformers ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 in the transformers layout): InternViT tower
(class token, layer scales, optional q/k RMSNorm), image features = the model's own ``get_image_features`` path:
the output selected by ``vision_feature_layer`` (``-1``: the last block's output through the tower's final
``layernorm``; ``k``: ``hidden_states[k]``, the output of block ``k - 1``, so the first ``k`` blocks feed),
the class token dropped ("default" selection), the patch grid pixel-shuffled by ``downsample_ratio`` (the
model's own ``pixel_shuffle``), then ``multi_modal_projector`` (LayerNorm, linear, activation, linear).

One tile per image: InternVL's processor tiles large images by default (``crop_to_patches=True``: the image
resized onto a grid of tiles plus a thumbnail), and its output does not say which grid it chose (only the tile
count reaches the model), so the tiles' maps could not be put back on the image. legrad therefore explains
the single-tile input (``processor(..., crop_to_patches=False)``: the whole image resized to the tower's size)
and refuses tiled inputs with a ValueError saying so. Maps are on the tower's patch grid (raster order; the
pixel shuffle is part of the feature path, so the relevance stays on the patches), upsampled to the tile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...ops.functional import apply_module, layer_norm, linear
from ..hf.common import activation
from .base import VLMAdapter
from .feature_layer import checked_feature_layer, feeding_blocks
from .inputs import Packed, VLMInputs

__all__ = ["InternVLAdapter"]


class InternVLAdapter(VLMAdapter):
    """transformers ``InternVLForConditionalGeneration`` (one image tile per sequence, int
    ``vision_feature_layer``, "default" selection)."""

    family = "transformers InternVLForConditionalGeneration (InternViT tower, answers explained)"
    model_class = "InternVLForConditionalGeneration"
    tower_kind = "InternViT"

    def _check(self) -> None:
        cfg = self.model.config
        checked_feature_layer(cfg, "InternVL")
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported "
                             "for InternVL (its feature path needs the class token dropped: 'default')")
        gh, gw = self._grid()
        scale = 1 / float(cfg.downsample_ratio)
        if gh != gw or scale != int(scale) or gh % int(scale):
            raise ValueError(f"InternVL with a {gh} x {gw} patch grid and downsample_ratio={cfg.downsample_ratio} is "
                             "not supported (a square grid divisible by 1 / downsample_ratio is)")
        proj = self.model.model.multi_modal_projector
        if not all(hasattr(proj, a) for a in ("layer_norm", "linear_1", "act", "linear_2")) \
                or not hasattr(self.model.model, "pixel_shuffle"):
            raise TypeError("this InternVL's feature path (pixel_shuffle, multi_modal_projector layer_norm + "
                            "linear_1 + act + linear_2) is not the one legrad supports")

    def _feeding_blocks(self) -> int:
        layers = len(self.visual.encoder.layer)
        k = self.model.config.vision_feature_layer
        if k == -1:  # last_hidden_state: every block, then the tower's final layernorm
            return layers
        return feeding_blocks(k, layers)

    # ------------------------------------------------------------------ tower facts
    def _size(self) -> tuple[int, int]:
        size = self.visual.config.image_size
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def native_size(self) -> tuple[int, int]:
        return self._size()

    def _grid(self) -> tuple[int, int]:
        (h, w), (ph, pw) = self._size(), self.patch_size
        return h // ph, w // pw

    @property
    def _ratio(self) -> float:
        return float(self.model.config.downsample_ratio)

    # ------------------------------------------------------------------ the call
    def _validate(self, image: Any, inputs: dict[str, Any], answers: Any, tokenizer: Any) -> tuple[VLMInputs, list]:
        merged = {**dict(image), **inputs} if isinstance(image, Mapping) else dict(inputs)
        pixels, ids = merged.get("pixel_values"), merged.get("input_ids")
        if isinstance(pixels, torch.Tensor) and isinstance(ids, torch.Tensor) and pixels.ndim == 4 and ids.ndim == 2 \
                and pixels.shape[0] > ids.shape[0]:
            raise ValueError(f"pixel_values holds {pixels.shape[0]} tiles for {ids.shape[0]} prompt(s): InternVL's "
                             "processor tiled the image (crop_to_patches=True, its default). legrad explains one tile "
                             "per image: call the processor with crop_to_patches=False")
        return super()._validate(image, inputs, answers, tokenizer)

    def _check_pixels(self, call: VLMInputs) -> None:
        h, w = self._size()
        c = self.visual.config.num_channels
        if tuple(call.pixel_values.shape[-3:]) != (c, h, w):
            raise ValueError(f"pixel_values must be [B, {c}, {h}, {w}] for this model, got "
                             f"{tuple(call.pixel_values.shape)}; use the model's processor with crop_to_patches=False")

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        gh, gw = self._grid()
        return round(gh * self._ratio) * round(gw * self._ratio)

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        if self.model.config.vision_feature_layer == -1:  # last_hidden_state = layernorm(last block's output)
            y = apply_module(self.visual.layernorm, y)
        y = y[:, 1:]  # "default": the class token dropped
        gh, gw = self._grid()
        y = self.model.model.pixel_shuffle(y.reshape(y.shape[0], gh, gw, -1), scale_factor=self._ratio)
        y = y.reshape(y.shape[0], -1, y.shape[-1])
        proj = self.model.model.multi_modal_projector
        return linear(proj.linear_2, activation(proj.act, linear(proj.linear_1, layer_norm(proj.layer_norm, y))))

    def _encoder_output(self, feats: torch.Tensor, call: VLMInputs, images: list[int]) -> torch.Tensor:
        return feats  # InternVL's forward takes one tensor (it does not concatenate per-image features)

    def _lm_kwargs(self, seqs: Packed, call: VLMInputs, images: list[int], device: torch.device) -> dict[str, Any]:
        return {}  # causal language model: no token types, positions from the mask

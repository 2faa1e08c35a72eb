"""transformers ``Mistral3ForConditionalGeneration`` (Mistral Small 3.1 / 3.2): Pixtral tower (2-D rotary positions,
RMSNorm, gated MLP, any image size, no class token), image features = the model's own ``get_image_features`` path:
``hidden_states[vision_feature_layer]`` (``k``: the output of block ``k - 1``, so the first ``k`` blocks feed;
``-1``: every block), then ``multi_modal_projector``: its RMSNorm, the patch merger (each ``m x m`` window of the
image's patch grid, ``m = spatial_merge_size``, concatenated and mapped by ``merging_layer``), linear, activation,
linear.

The processor resizes each image to a multiple of ``patch_size * m`` (longest edge bounded), pads the batch to its
largest image and says each image's size in ``image_sizes``; the tower runs on each image's own patch grid
``image_sizes / patch_size`` (raster order), where the maps stay, upsampled to ``image_sizes`` (the image the
processor saw). The language model (Mistral) runs its own forward with ``mm_encoder_outputs``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...ops.functional import linear
from ..hf.common import activation
from .base import VLMAdapter
from .feature_layer import checked_feature_layer, feeding_blocks
from .inputs import Packed, VLMInputs
from .towers import rms_norm_fn

__all__ = ["Mistral3Adapter"]


class Mistral3Adapter(VLMAdapter):
    """transformers ``Mistral3ForConditionalGeneration`` (one image per sequence, int ``vision_feature_layer``)."""

    family = "transformers Mistral3ForConditionalGeneration (Pixtral tower, answers explained)"
    model_class = "Mistral3ForConditionalGeneration"
    tower_kind = "Pixtral"

    def _check(self) -> None:
        checked_feature_layer(self.model.config, "Mistral 3")
        proj = self.model.model.multi_modal_projector
        merger = getattr(proj, "patch_merger", None)
        if not (all(hasattr(proj, a) for a in ("norm", "linear_1", "act", "linear_2"))
                and hasattr(proj.norm, "variance_epsilon") and hasattr(merger, "merging_layer")):
            raise TypeError("this Mistral 3's multi_modal_projector is not the norm + patch_merger + linear_1 + act + "
                            "linear_2 one legrad supports")

    def _feeding_blocks(self) -> int:
        return feeding_blocks(self.model.config.vision_feature_layer, len(self.tower.layers))

    # ------------------------------------------------------------------ tower facts
    @property
    def _merge(self) -> int:
        return int(self.model.config.spatial_merge_size)

    @property
    def _unit(self) -> int:
        """Pixels per merged token side (``patch_size * spatial_merge_size``): the processor's size step."""
        return self.tower.patch * self._merge

    @property
    def native_size(self) -> tuple[int, int]:
        return 2 * self._unit, 3 * self._unit  # a small non-square probe: 2 x 3 merged tokens

    def probe_input(self) -> dict:
        h, w = self.native_size
        noise = torch.randn(1, self.visual.config.num_channels, h, w, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": noise.to(self.device(), self.param_dtype()),
                "image_sizes": torch.tensor([[h, w]], device=self.device())}

    def _grid_of(self, call: VLMInputs, b: int) -> tuple[int, int]:
        """Image ``b``'s patch grid ``(rows, cols)``."""
        h, w = (int(v) for v in call.image_sizes[b])
        return h // self.tower.patch, w // self.tower.patch

    # ------------------------------------------------------------------ the call
    def _check_pixels(self, call: VLMInputs) -> None:
        sizes, c = call.image_sizes, self.visual.config.num_channels
        if sizes is None:
            raise ValueError("Mistral 3 needs image_sizes (each image's size): pass the processor output unchanged")
        if call.pixel_values.shape[1] != c:
            raise ValueError(f"pixel_values must be [B, {c}, H, W] for this model, got {tuple(call.pixel_values.shape)}; "
                             "use the model's processor")
        u, (hh, ww) = self._unit, call.pixel_values.shape[-2:]
        for b, (h, w) in enumerate(sizes.tolist()):
            if h % u or w % u or h > hh or w > ww:
                raise ValueError(f"image_sizes[{b}] = {(h, w)} must be multiples of patch_size * spatial_merge_size = "
                                 f"{u} within pixel_values' {(hh, ww)}; use the model's processor")

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        gh, gw = self._grid_of(call, row)
        return (gh // self._merge) * (gw // self._merge)

    def _tower_pixels(self, call: VLMInputs) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device()
        values = call.pixel_values.detach().to(device=device, dtype=self.param_dtype())
        return values.clone() if values.is_inference() else values, call.image_sizes

    def _tokens_per_tile(self, call: VLMInputs) -> int:
        return max(h * w for h, w in (self._grid_of(call, b) for b in range(call.batch)))

    def _image_features(self, y: torch.Tensor, images: list[int], counts: list[int], call: VLMInputs) -> torch.Tensor:
        """The model's projector on each row's own tokens (the padding dropped): RMSNorm, the patch merger over
        the image's grid, linear, activation, linear; ``[tokens, D]`` in order."""
        proj, m = self.model.model.multi_modal_projector, self._merge
        merged = []
        for i, b in enumerate(images):
            gh, gw = self._grid_of(call, b)
            z = rms_norm_fn(proj.norm)(y[i, : gh * gw])
            d = z.shape[-1]
            # Mistral3PatchMerger: each m x m window's channels stacked (unfold), then merging_layer.
            grid = F.unfold(z.view(gh, gw, d).permute(2, 0, 1)[None], kernel_size=m, stride=m)
            merged.append(linear(proj.patch_merger.merging_layer, grid.view(d * m * m, -1).t()))
        z = torch.cat(merged)
        return linear(proj.linear_2, activation(proj.act, linear(proj.linear_1, z)))

    def _lm_kwargs(self, seqs: Packed, call: VLMInputs, images: list[int], device: torch.device) -> dict[str, Any]:
        return {}  # causal language model: no token types, positions from the mask

    def _image_map(self, rel: torch.Tensor, b: int, call: VLMInputs) -> torch.Tensor:
        gh, gw = self._grid_of(call, b)
        rel = rel.reshape(-1)
        # A shorter image's padded columns carry no relevance (key mask), and its padded query rows none either
        # (their outputs never reach the features), but the engine's mean counted them: the mean over the image's
        # own rows is the definition's. Its own patches are in raster order.
        return (rel[: gh * gw] * (rel.numel() / (gh * gw))).reshape(gh, gw)

    def _map_size(self, b: int, call: VLMInputs) -> tuple[int, int]:
        h, w = (int(v) for v in call.image_sizes[b])
        return h, w

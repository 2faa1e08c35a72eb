"""transformers ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6): the CLIP tower runs on
any-resolution tiles (``pixel_values`` ``[B, tiles, C, S, S]``: the whole image resized to S x S, then the
tiles of the image resized into the best grid resolution and padded); the model packs the tiles' features
(unpadding, newline tokens) with its own ``pack_image_features``.

Maps: the relevance of each tile is computed as for LLaVA (one attention matrix per tile in each explained
block), then stitched back onto the image: the high-resolution tiles are laid out in their grid and the
padding is cropped exactly as the model crops its features (``unpad_image``); the base tile (the whole
image) is resized bilinearly onto that grid and added. Maps come at each image's own size
(``image_sizes``; a list when the sizes differ).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .inputs import VLMInputs
from .llava import LlavaAdapter

__all__ = ["LlavaNextAdapter"]


class LlavaNextAdapter(LlavaAdapter):
    """transformers ``LlavaNextForConditionalGeneration`` ("default" selection, int feature layer)."""

    family = "transformers LlavaNextForConditionalGeneration (CLIP tower, any-resolution tiles, answers explained)"
    model_class = "LlavaNextForConditionalGeneration"
    pixel_ndim = 5
    #: The transformers module whose any-resolution helpers (grid shape, tile count, unpadding) the model uses.
    modeling: ClassVar[str] = "transformers.models.llava_next.modeling_llava_next"

    def _helpers(self) -> Any:
        return importlib.import_module(self.modeling)

    def _check(self) -> None:
        if self.model.config.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA-NeXT is supported with vision_feature_select_strategy='default' only")
        if not hasattr(self.model.model, "image_newline") or not hasattr(self.model.model, "pack_image_features"):
            raise TypeError("this LLaVA-NeXT has no image_newline / pack_image_features legrad can use")
        super()._check()

    def _tiles(self, call: VLMInputs) -> list[int]:
        m = self._helpers()
        pins, size = self.model.config.image_grid_pinpoints, self.visual.config.image_size
        return [int(m.image_size_to_num_patches(s, pins, size)) for s in call.image_sizes.tolist()]

    def _check_call(self, call: VLMInputs) -> None:
        if call.image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes: pass the processor output unchanged")
        have = call.pixel_values.shape[1]
        for b, n in enumerate(self._tiles(call)):
            if n > have:
                raise ValueError(f"image {b} of size {call.image_sizes[b].tolist()} needs {n} tiles, pixel_values "
                                 f"holds {have}; pass the processor output unchanged")

    def _tile_rows(self, call: VLMInputs) -> list[list[int]]:
        out, lo = [], 0
        for n in self._tiles(call):
            out.append(list(range(lo, lo + n)))
            lo += n
        return out

    def _tower_pixels(self, call: VLMInputs) -> torch.Tensor:
        return torch.cat([call.pixel_values[b, :n] for b, n in enumerate(self._tiles(call))])

    def probe_input(self) -> dict:
        size = self.visual.config.image_size
        tiles = self._tiles(self._probe_call({"pixel_values": torch.zeros(1, 1), "image_sizes":
                                              torch.tensor([[size, size]])}))[0]
        noise = torch.randn(1, tiles, self.visual.config.num_channels, size, size,
                            generator=torch.Generator().manual_seed(0))
        return {"pixel_values": noise.to(self.device(), self.param_dtype()),
                "image_sizes": torch.tensor([[size, size]], device=self.device())}

    def _pack(self, feats: list[torch.Tensor], images: list[int], call: VLMInputs,
              newline: torch.Tensor) -> list[torch.Tensor]:
        sizes = call.image_sizes[images].to(feats[0].device)
        packed, _ = self.model.model.pack_image_features(feats, sizes, vision_feature_select_strategy="default",
                                                         image_newline=newline)
        return packed

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        gh, gw = self._grid()
        zeros = [torch.zeros(self._tiles(call)[row], gh * gw, 1)]
        return int(self._pack(zeros, [row], call, torch.zeros(1))[0].shape[0])

    def _image_features(self, y: torch.Tensor, images: list[int], counts: list[int], call: VLMInputs) -> torch.Tensor:
        feats = self._features(y)
        newline = self.model.model.image_newline.detach().to(feats.dtype)
        return torch.cat(self._pack(list(feats.split(counts)), images, call, newline))

    def _image_map(self, rel: torch.Tensor, b: int, call: VLMInputs) -> torch.Tensor:
        gh, gw = self._grid()
        base = rel[0].reshape(gh, gw)
        if rel.shape[0] == 1:
            return base
        m = self._helpers()
        rows, cols = m.get_anyres_image_grid_shape(call.image_sizes[b].tolist(), self.model.config.image_grid_pinpoints,
                                                   self.visual.config.image_size)
        grid = rel[1:].reshape(rows, cols, gh, gw).permute(0, 2, 1, 3).reshape(1, rows * gh, cols * gw)
        grid = m.unpad_image(grid, call.image_sizes[b].tolist())[0]
        return grid + F.interpolate(base[None, None], size=tuple(grid.shape), mode="bilinear",
                                    align_corners=False)[0, 0]

    def _map_size(self, b: int, call: VLMInputs) -> tuple[int, int]:
        h, w = call.image_sizes[b].tolist()
        return int(h), int(w)


"""transformers ``Idefics3ForConditionalGeneration`` (Idefics3) and ``SmolVLMForConditionalGeneration`` (SmolVLM,
SmolVLM2): SigLIP-style vision tower (no class token; NaViT-style position embeddings, here of whole images),
image features = the model's ``connector`` on ``post_layernorm`` of a block's output: the pixel shuffle
(``scale_factor`` x ``scale_factor`` patches into one token) and the linear modality projection. Every block
feeds the features; the default explains the last two. Maps live on the tower's patch grid in raster order (the
tower itself is raster; the pixel shuffle only groups patches for the projection).

One tile per image: the processors split an image into sub-images plus a global image by default
(``do_image_splitting=True``: ``pixel_values`` ``[B, tiles, C, S, S]``, the tiles' placement carried only by
``<row_i_col_j>`` text tokens); legrad explains the image the model sees as one tile, so the processor must be
called with ``do_image_splitting=False`` (the image squared to ``S x S``) and anything else is refused with a
``ValueError``. Several images or video in one sequence are refused too.
"""

from __future__ import annotations

from typing import Any

import torch

from ...ops.functional import layer_norm, linear
from .base import VLMAdapter
from .inputs import Packed, VLMInputs

__all__ = ["Idefics3Adapter", "SmolVLMAdapter"]


class Idefics3Adapter(VLMAdapter):
    """transformers ``Idefics3ForConditionalGeneration`` (images without splitting; one image per sequence)."""

    family = "transformers Idefics3ForConditionalGeneration (Idefics3 SigLIP tower, answers explained)"
    model_class = "Idefics3ForConditionalGeneration"
    tower_kind = "Idefics3 SigLIP"
    input_keys = ("pixel_attention_mask",)
    pixel_ndim = 5

    @staticmethod
    def _vision_module(model: Any) -> Any:
        return model.model.vision_model

    def _check(self) -> None:
        conn = getattr(self.model.model, "connector", None)
        if conn is None or not hasattr(conn, "pixel_shuffle") or not hasattr(conn.modality_projection, "proj"):
            raise TypeError(f"this {self.model_class}'s connector is not the pixel shuffle + linear one legrad "
                            "supports")
        gh, gw = self._grid()
        s = int(conn.scale_factor)
        if gh % s or gw % s:
            raise ValueError(f"the {gh} x {gw} patch grid is not a multiple of scale_factor={s}")

    def _feeding_blocks(self) -> int:
        return len(self.visual.encoder.layers)

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        gh, gw = self._grid()
        return gh * gw // int(self.model.model.connector.scale_factor) ** 2

    def _check_pixels(self, call: VLMInputs) -> None:
        tiles = call.pixel_values.shape[1]
        if tiles != 1:
            raise ValueError(f"pixel_values holds {tiles} tiles per prompt: legrad explains one image per sequence as "
                             "one tile; call the processor with do_image_splitting=False (image splitting, several "
                             "images or video in one sequence are not supported)")
        super()._check_pixels(call)
        mask = call.extra.get("pixel_attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError("pixel_attention_mask marks padded pixels: legrad explains whole images only (call the "
                             "processor with do_image_splitting=False, one image per prompt)")
        if bool((call.pixel_values == 0).flatten(1).all(-1).any()):
            raise ValueError("an image of pixel_values is all zeros, which the model drops as padding; pass the "
                             "processor output unchanged")

    def _tower_pixels(self, call: VLMInputs) -> torch.Tensor:
        return call.pixel_values[:, 0]

    def probe_input(self) -> dict:
        size = self.visual.config.image_size
        noise = torch.randn(1, 1, self.visual.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": noise.to(self.device(), self.param_dtype())}

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        """The model's connector on ``post_layernorm(y)``: ``[n, N, C]`` -> ``[n, N / s^2, D]``."""
        conn = self.model.model.connector
        z = conn.pixel_shuffle(layer_norm(self.visual.post_layernorm, y), conn.scale_factor)  # the model's own reshape
        return linear(conn.modality_projection.proj, z)

    def _lm_kwargs(self, seqs: Packed, call: VLMInputs, images: list[int], device: torch.device) -> dict[str, Any]:
        return {}  # a causal language model: no token types


class SmolVLMAdapter(Idefics3Adapter):
    """transformers ``SmolVLMForConditionalGeneration`` (SmolVLM, SmolVLM2; images without splitting)."""

    family = "transformers SmolVLMForConditionalGeneration (Idefics3 SigLIP tower, answers explained)"
    model_class = "SmolVLMForConditionalGeneration"

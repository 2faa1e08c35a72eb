"""transformers ``Gemma3ForConditionalGeneration`` (Gemma 3): SigLIP vision tower (no class token), image
features = the model's ``Gemma3MultiModalProjector`` on ``post_layernorm`` of a block's output: the patch grid
average-pooled to ``mm_tokens_per_image`` tokens (``sqrt(mm_tokens_per_image)`` per side), the soft-embedding
RMS norm (``1 + weight``, in float32), the projection. Every block feeds the features; the default explains
the last two. Maps live on the tower's patch grid (each pooled token's relevance flows back to the patches of
its pooling window through the attention of the explained block).

The language model runs its own forward: the image tokens form one bidirectional block (``token_type_ids`` 1
on the image tokens and nowhere else: rebuilt for each prompt + answer sequence, as the processor marks the
prompt); no final logit soft-capping (the model's own head applies none, whatever the text config says).
Pan-and-scan crops (several images in one sequence) are refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...ops.functional import layer_norm, param
from .base import VLMAdapter
from .inputs import Packed, VLMInputs

__all__ = ["Gemma3Adapter"]


class Gemma3Adapter(VLMAdapter):
    """transformers ``Gemma3ForConditionalGeneration`` (images; one image per sequence, no pan-and-scan)."""

    family = "transformers Gemma3ForConditionalGeneration (SigLIP tower, answers explained)"
    model_class = "Gemma3ForConditionalGeneration"
    tower_kind = "SigLIP"
    final_softcap: ClassVar[bool] = False  # Gemma3ForConditionalGeneration's head does not soft-cap its logits

    def _check(self) -> None:
        proj = self.model.model.multi_modal_projector
        if not all(hasattr(proj, a) for a in ("mm_input_projection_weight", "mm_soft_emb_norm", "avg_pool",
                                              "patches_per_image")):
            raise TypeError("this Gemma 3's multi_modal_projector is not the pool + norm + projection one legrad "
                            "supports")
        gh, gw = self._grid()
        if (gh, gw) != (proj.patches_per_image, proj.patches_per_image):
            raise ValueError(f"the projector expects a {proj.patches_per_image}-patch side, the tower has {gh} x {gw}")

    def _feeding_blocks(self) -> int:
        return len(self.visual.encoder.layers)

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        return int(self.model.config.mm_tokens_per_image)

    def _validate(self, image: Any, inputs: dict[str, Any], answers: Any, tokenizer: Any) -> tuple[VLMInputs, list]:
        merged = {**dict(image), **inputs} if hasattr(image, "keys") else inputs
        pixels, ids = merged.get("pixel_values"), merged.get("input_ids")
        if isinstance(pixels, torch.Tensor) and isinstance(ids, torch.Tensor) and pixels.ndim == 4 and ids.ndim == 2 \
                and pixels.shape[0] > ids.shape[0]:
            raise ValueError(f"pixel_values holds {pixels.shape[0]} images for {ids.shape[0]} prompts: legrad explains "
                             "one image per sequence (pan-and-scan crops and several images per prompt are not "
                             "supported; call the processor with do_pan_and_scan=False)")
        return super()._validate(image, inputs, answers, tokenizer)

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        """``Gemma3MultiModalProjector`` on ``post_layernorm(y)``: ``[n, N, C]`` -> ``[n, mm_tokens_per_image, D]``."""
        proj = self.model.model.multi_modal_projector
        z = layer_norm(self.visual.post_layernorm, y)
        n, _, c = z.shape
        side = proj.patches_per_image
        z = z.transpose(1, 2).reshape(n, c, side, side)  # raster order of the patch grid
        z = F.avg_pool2d(z, kernel_size=proj.kernel_size, stride=proj.kernel_size).flatten(2).transpose(1, 2)
        norm = proj.mm_soft_emb_norm
        zf = z.float()
        zf = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + param(norm.weight, torch.float32))
        z = zf.type_as(z)
        return (z @ param(proj.mm_input_projection_weight, z.dtype)).type_as(y)

    def _encoder_output(self, feats: torch.Tensor, call: VLMInputs, images: list[int]) -> torch.Tensor:
        return feats  # Gemma 3's forward takes one tensor of features (it does not concatenate per-image ones)

    def _lm_kwargs(self, seqs: Packed, call: VLMInputs, images: list[int], device: torch.device) -> dict[str, Any]:
        # Gemma 3's token types mark the image tokens (1: one bidirectional block), not a prefix as PaliGemma's.
        return {"token_type_ids": seqs.image.long().to(device)}

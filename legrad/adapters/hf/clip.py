"""transformers ``CLIPModel``, ``MetaClip2Model``, ``AltCLIPModel``, ``ChineseCLIPModel``: ViT towers with
a CLS token, ``post_layernorm`` and ``visual_projection``. Layer feature: ``visual_projection(
post_layernorm(mean over all tokens of block l's output))``; LeGrad differentiates block l's
self-attention (the CLS column is dropped), as for the open_clip CLIP towers.
"""

from __future__ import annotations

import torch

from ...ops.functional import layer_norm, linear
from .common import HFAdapter

__all__ = ["HFClipAdapter"]


class HFClipAdapter(HFAdapter):
    """transformers ``CLIPModel``, ``MetaClip2Model``, ``AltCLIPModel``, ``ChineseCLIPModel``."""

    family = "transformers CLIPModel / MetaClip2Model / AltCLIPModel / ChineseCLIPModel"
    entry_points = ("compute_legrad", "compute_legrad_clip")
    hf_kind = "clip"

    @property
    def embed_dim(self) -> int:
        return self.model.visual_projection.out_features

    def declare(self, image, dtype):
        return self._run(layer_norm(self.visual.pre_layrnorm, self._embed(image)).to(dtype), prefix=1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return linear(self.model.visual_projection, layer_norm(self.visual.post_layernorm, pooled))

    def readout(self, x, context=None):
        """``visual_projection(post_layernorm(CLS))``, what ``get_image_features`` returns."""
        return self.head(x[:, 0])

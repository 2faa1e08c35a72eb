"""transformers SigLIP towers:

* ``SiglipModel``: no CLS token; ``post_layernorm`` on all tokens, then the attention-pooling head
  (probe + ``nn.MultiheadAttention``, layernorm, mlp), no projection. Layer feature: the head applied
  to ``post_layernorm`` of block l's output; LeGrad differentiates the head's attention over the
  tokens of block l. The empty-prompt correction applies.
* ``Siglip2Model`` (NaFlex): same head, but the images arrive pre-patchified (``pixel_values``
  ``[B, N, C * p * p]`` with ``pixel_attention_mask`` ``[B, N]`` and ``spatial_shapes`` ``[B, 2]``, as
  the model's processor returns them). Padded patches get no relevance and each map is returned at
  its image's own size ``spatial_shapes[i] * patch_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...ops.attention import attention_ops_for
from ...ops.functional import layer_norm, linear
from ..base import ImageBatch
from ..runner import Pooler
from .common import HFAdapter, mlp_in, pooled_text_features

__all__ = ["HFSiglipAdapter", "HFSiglip2Adapter"]


class HFSiglipAdapter(HFAdapter):
    """transformers ``SiglipModel``: attention-pooling head explained at every selected layer."""

    family = "transformers SiglipModel (attention-pooling head)"
    entry_points = ("compute_legrad", "compute_legrad_siglip")
    uses_empty_prompt_correction = True
    #: How to provide the correction's prompt embedding (shown when it is missing).
    correction_hint = (
        "pass LeWrapper(model, tokenizer=processor) with the model's AutoProcessor or AutoTokenizer, or "
        "LeWrapper(model, empty_text_embedding=legrad.adapters.hf.encode_text(model, processor, 'a photo of a')[0]), "
        "or turn the correction off with apply_correction=False"
    )
    hf_kind = "siglip"

    def _check_layout(self) -> None:
        super()._check_layout()
        head = getattr(self.visual, "head", None)
        if head is None or not getattr(self.visual, "use_head", True):
            raise TypeError(
                f"{type(self.model).__name__} was built with vision_use_head=False: it has no pooled image "
                "embedding to explain"
            )

    @property
    def embed_dim(self) -> int:
        return self.visual.head.probe.shape[-1]

    def declare(self, image, dtype):
        return self._run(self._embed(image).to(dtype), prefix=0)

    def pooler(self) -> Pooler:
        """The pooling head (probe + ``nn.MultiheadAttention``, layernorm, residual mlp) on ``post_layernorm``
        of a block's output; the probe's attention is explained."""
        head = self.visual.head
        post = self.visual.post_layernorm

        def finish(y: torch.Tensor) -> torch.Tensor:
            y = y + linear(head.mlp.fc2, mlp_in(head.mlp)(layer_norm(head.layernorm, y)))
            return y[:, 0]

        return Pooler(attention_ops_for(head.attention), keys=lambda z: (layer_norm(post, z), 0),
                      queries=lambda keys: head.probe.detach().to(keys.dtype).expand(keys.shape[0], -1, -1),
                      finish=finish)


class HFSiglip2Adapter(HFSiglipAdapter):
    """transformers ``Siglip2Model`` (NaFlex): pre-patchified, padded, variable-size image batches."""

    family = "transformers Siglip2Model (NaFlex, attention-pooling head)"
    hf_kind = "siglip2"
    variable_grids = True

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, ``num_channels * patch_size ** 2``."""
        return self.visual.embeddings.patch_embedding.in_features

    def declare(self, image, dtype):
        """``image``: a ``(pixel_values [B, N, C*p*p], key_mask [B, N] bool, spatial_shapes [B, 2])`` tuple."""
        pixel_values, key_mask, spatial_shapes = image
        return self._run(self.visual.embeddings(pixel_values, spatial_shapes).to(dtype), prefix=0, key_mask=key_mask)

    def probe_input(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One noise image on the square grid of the position table (``num_patches``), no padding."""
        side = max(1, int(self.visual.config.num_patches ** 0.5))
        noise = torch.randn(1, side * side, self.patch_dim, generator=torch.Generator().manual_seed(0))
        device = self.device()
        return (noise.to(device, self.param_dtype()), torch.ones(1, side * side, dtype=torch.bool, device=device),
                torch.tensor([[side, side]], device=device))

    def own_output(self, model: nn.Module, image: Any) -> torch.Tensor:
        pixel_values, key_mask, spatial_shapes = image
        return pooled_text_features(model.get_image_features(
            pixel_values=pixel_values, pixel_attention_mask=key_mask, spatial_shapes=spatial_shapes))

    def prepare_inputs(self, image: Any, **inputs: Any) -> ImageBatch:
        """NaFlex batches: ``image`` is the processor output (a mapping with ``pixel_values``,
        ``pixel_attention_mask`` and ``spatial_shapes``) or the ``pixel_values`` tensor with the other two
        as keyword arguments. Each image's maps come at its own size ``spatial_shapes[i] * patch_size``;
        padded patches get no relevance and the empty-prompt correction acts on each image's own patches.

        Raises:
            TypeError, ValueError: naming the bad input and the fix.
        """
        pixel_values, key_mask, shapes = self._naflex_inputs(image, inputs)
        ph, pw = self.patch_size
        grids = [(int(gh), int(gw)) for gh, gw in shapes.tolist()]
        return ImageBatch((pixel_values, key_mask, shapes), grids, [(gh * ph, gw * pw) for gh, gw in grids],
                          tokens=pixel_values.shape[1])

    def _naflex_inputs(self, image: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpacks and validates ``(pixel_values, key_mask, spatial_shapes)`` before any work.

        Raises:
            TypeError, ValueError: naming the bad input and the fix.
        """
        extra = sorted(k for k in inputs if k not in ("pixel_attention_mask", "spatial_shapes"))
        if extra:
            raise TypeError(f"compute_legrad got unexpected keyword arguments {extra} for Siglip2Model")
        if image is None:
            raise ValueError("image is required: pass the processor output, e.g. image=processor(images=img, "
                             "return_tensors='pt')")
        if isinstance(image, Mapping):
            missing = [k for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes") if k not in image]
            if missing:
                raise ValueError(f"image mapping lacks {missing}; pass the Siglip2 processor output unchanged")
            pixel_values, mask, shapes = image["pixel_values"], image["pixel_attention_mask"], image["spatial_shapes"]
        else:
            pixel_values = image
            mask, shapes = inputs.get("pixel_attention_mask"), inputs.get("spatial_shapes")
            if mask is None or shapes is None:
                raise ValueError(
                    "Siglip2Model needs pixel_attention_mask and spatial_shapes: pass the processor output as "
                    "image=inputs, or compute_legrad(text, image=inputs['pixel_values'], "
                    "pixel_attention_mask=inputs['pixel_attention_mask'], spatial_shapes=inputs['spatial_shapes'])"
                )
        for name, t in (("pixel_values", pixel_values), ("pixel_attention_mask", mask), ("spatial_shapes", shapes)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (use return_tensors='pt')")
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != self.patch_dim:
            raise ValueError(
                f"Siglip2 pixel_values must be pre-patchified [B, N, {self.patch_dim}] (channels * patch_size**2), "
                f"got shape {tuple(pixel_values.shape)}; use the model's Siglip2 image processor"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor, got {pixel_values.dtype}")
        b, n = pixel_values.shape[:2]
        if b == 0 or n == 0:
            raise ValueError(f"pixel_values is empty (shape {tuple(pixel_values.shape)})")
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"pixel_attention_mask must be [B, N] = [{b}, {n}], got {tuple(mask.shape)}")
        if tuple(shapes.shape) != (b, 2) or shapes.is_floating_point():
            raise ValueError(f"spatial_shapes must be an integer [B, 2] = [{b}, 2] tensor, got "
                             f"{tuple(shapes.shape)} {shapes.dtype}")
        if bool((shapes < 1).any()):
            raise ValueError("spatial_shapes must be positive patch counts (rows, columns)")
        counts = shapes.prod(-1).to(mask.device)
        if bool((counts > n).any()):
            raise ValueError(f"spatial_shapes {shapes.tolist()} describe more patches than pixel_values holds ({n})")
        # The processor puts each image's h * w patches first, then padding; the position embeddings
        # are laid out on that assumption, so any other mask is a caller error.
        key_mask = mask.bool()
        expected = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
        if not torch.equal(key_mask, expected):
            raise ValueError(
                "pixel_attention_mask must mark the first spatial_shapes[i].prod() patches of each image as valid "
                "and the rest as padding, as the Siglip2 processor does"
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contains NaN or infinite values")
        return pixel_values, key_mask, shapes

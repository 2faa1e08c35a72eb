"""transformers ``ViTForImageClassification``, ``DeiTForImageClassification`` (+ ``WithTeacher``):
``classifier(layernorm(mean))``, the average of both classifiers for the teacher-distilled DeiT.
``transformers`` is only imported once one of its models is wrapped."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ...engine.validation import check_image
from ...ops.attention import HFSelfAttentionOps
from ...ops.functional import eval_view, layer_norm, linear
from ..base import ImageBatch
from ..hf.common import mlp_in, pixel_values
from ..runner import Block, BlockTower, Run, chain
from .base import ClassifierAdapter

__all__ = ["HFViTClassifierAdapter"]


_HF_CLASSES = {
    "ViTForImageClassification": ("vit", ("classifier",)),
    "DeiTForImageClassification": ("deit", ("classifier",)),
    "DeiTForImageClassificationWithTeacher": ("deit", ("cls_classifier", "distillation_classifier")),
}


def _hf_class_name(model: nn.Module) -> str | None:
    transformers = sys.modules.get("transformers")
    if transformers is None:  # a transformers model cannot exist unless transformers was imported
        return None
    for name in _HF_CLASSES:
        cls = getattr(transformers, name, None)
        if cls is not None and type(model) is cls:
            return name
    return None


class HFViTClassifierAdapter(ClassifierAdapter, BlockTower):
    """transformers ``ViTForImageClassification``, ``DeiTForImageClassification`` (+ ``WithTeacher``).

    Layer logits: ``classifier(layernorm(mean over all tokens of block l))`` (the average of both
    classifiers for the teacher-distilled DeiT). Positions are interpolated by the model's own
    embedding code (``interpolate_pos_encoding=True``), so any multiple of the patch size works.
    """

    family = "transformers ViT / DeiT image classifier"

    @classmethod
    def from_model(cls, model):
        name = _hf_class_name(model)
        return None if name is None else cls(model, name)

    def __init__(self, model: nn.Module, class_name: str):
        backbone_attr, heads = _HF_CLASSES[class_name]
        backbone = getattr(model, backbone_attr)
        super().__init__(backbone)
        self.model = model
        self.heads = [getattr(model, h, None) for h in heads]
        self._prefix = 2 if backbone_attr == "deit" else 1
        layer_ok = all(
            all(hasattr(layer, a) for a in ("layernorm_before", "layernorm_after", "attention", "mlp"))
            and all(isinstance(getattr(layer.attention, p, None), nn.Linear)
                    for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and isinstance(getattr(layer.mlp, "fc1", None), nn.Linear)
            for layer in getattr(backbone, "layers", [])
        )
        if not (layer_ok and hasattr(backbone, "embeddings") and hasattr(backbone, "layernorm")
                and len(getattr(backbone, "layers", [])) > 0):
            raise TypeError(
                f"{class_name} does not have the layout legrad expects (embeddings, layers[*].attention.q_proj/"
                "k_proj/v_proj/o_proj, mlp.fc1/fc2, layernorm_before/after, layernorm); this transformers "
                "version may differ, please open an issue"
            )
        if not all(isinstance(h, nn.Linear) for h in self.heads):
            raise TypeError(f"{class_name} has no classification head (num_labels=0): nothing to explain")

    def prepare_inputs(self, image: Any, **inputs: Any) -> ImageBatch:
        """The ``[B, C, H, W]`` ``pixel_values`` or the processor's output (a mapping holding them);
        ``interpolate_pos_encoding`` is accepted and ignored (positions are always interpolated)."""
        return self.image_batch(check_image(pixel_values(image, inputs, allowed=("interpolate_pos_encoding",)), self))

    @property
    def depth(self):
        return len(self.visual.layers)

    @property
    def patch_size(self):
        p = self.visual.embeddings.patch_size
        return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))

    @property
    def in_chans(self):
        return int(self.visual.config.num_channels)

    @property
    def num_classes(self):
        return self.heads[0].out_features

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        y = layer_norm(self.visual.layernorm, pooled)
        return sum(linear(h, y) for h in self.heads) / len(self.heads)

    @staticmethod
    def _block(layer: nn.Module) -> Block:
        return Block(attn=HFSelfAttentionOps(layer.attention), norm1=chain(layer.layernorm_before),
                     norm2=chain(layer.layernorm_after), mlp_in=mlp_in(layer.mlp), mlp_out=chain(layer.mlp.fc2))

    def declare(self, image, dtype):
        # The embedding module is a pure function of the pixels in eval mode (its dropout is skipped).
        tokens = eval_view(self.visual.embeddings)(image, interpolate_pos_encoding=True).to(dtype)
        return Run(tokens, [self._block(layer) for layer in self.visual.layers], prefix=self._prefix)

    @property
    def _two_heads(self) -> bool:
        return self._prefix == 2 and len(self.heads) == 2  # teacher-distilled: class + distillation token

    def readout(self, x, context=None):
        if self._two_heads:
            y = layer_norm(self.visual.layernorm, x[:, :2])
            return 0.5 * (linear(self.heads[0], y[:, 0]) + linear(self.heads[1], y[:, 1]))
        return linear(self.heads[0], layer_norm(self.visual.layernorm, x[:, 0]))

    @property
    def readout_tokens(self):
        """The class token; for the teacher-distilled DeiT the class and distillation tokens (its logits average
        one head on each)."""
        return 2 if self._two_heads else 1

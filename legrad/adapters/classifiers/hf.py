"""transformers ``ViTForImageClassification``, ``DeiTForImageClassification`` (+ ``WithTeacher``):
``classifier(layernorm(mean))``, the average of both classifiers for the teacher-distilled DeiT.
``transformers`` is only imported once one of its models is wrapped."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...engine.validation import check_image
from ...ops.attention import merge_heads
from ...ops.functional import layer_norm, linear
from ..base import ImageBatch, LayerStep
from ..hf.common import activation, pixel_values
from ..timm_blocks import eval_view
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


class HFViTClassifierAdapter(ClassifierAdapter):
    """transformers ``ViTForImageClassification``, ``DeiTForImageClassification`` (+ ``WithTeacher``).

    Layer logits: ``classifier(layernorm(mean over all tokens of block l))`` (the average of both
    classifiers for the teacher-distilled DeiT). Positions are interpolated by the model's own
    embedding code (``interpolate_pos_encoding=True``), so any multiple of the patch size works.
    """

    family = "transformers ViT / DeiT image classifier"

    @classmethod
    def matches(cls, model):
        return False  # recognised by from_model (the model, not a sub-tower)

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

    def _head(self, y: torch.Tensor) -> torch.Tensor:
        y = layer_norm(self.visual.layernorm, y)
        return sum(linear(h, y) for h in self.heads) / len(self.heads)

    def _tokens(self, image: torch.Tensor) -> torch.Tensor:
        # The embedding module is a pure function of the pixels in eval mode (its dropout is skipped).
        return eval_view(self.visual.embeddings)(image, interpolate_pos_encoding=True)

    @classmethod
    def _attention(cls, layer: nn.Module, x: torch.Tensor):
        return cls._attention_on(layer, layer_norm(layer.layernorm_before, x))

    @staticmethod
    def _attention_on(layer: nn.Module, h: torch.Tensor):
        """``(q, k, v, scale, o)`` of a layer's self-attention on its pre-normed input ``h``."""
        attn = layer.attention
        heads = attn.num_attention_heads
        q, k, v = (linear(p, h).unflatten(-1, (heads, -1)).transpose(1, 2) for p in (attn.q_proj, attn.k_proj,
                                                                                      attn.v_proj))
        scale = float(attn.scaling)
        return q, k, v, scale, F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def _mlp_hidden(layer: nn.Module, x1: torch.Tensor) -> torch.Tensor:
        return activation(layer.mlp.activation_fn, linear(layer.mlp.fc1, layer_norm(layer.layernorm_after, x1)))

    def _layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        o = self._attention(layer, x)[-1]
        x = x + linear(layer.attention.o_proj, merge_heads(o))
        return x + linear(layer.mlp.fc2, self._mlp_hidden(layer, x))

    @property
    def _two_heads(self) -> bool:
        return self._prefix == 2 and len(self.heads) == 2  # teacher-distilled: class + distillation token

    def pooled_output(self, x):
        if self._two_heads:
            y = layer_norm(self.visual.layernorm, x[:, :2])
            return 0.5 * (linear(self.heads[0], y[:, 0]) + linear(self.heads[1], y[:, 1]))
        return linear(self.heads[0], layer_norm(self.visual.layernorm, x[:, 0]))

    def pooled_row(self, mat, num_prefix_tokens):
        """The class token's row; for the teacher-distilled DeiT the mean of the class and distillation rows
        (its logits average one head on each)."""
        if self._two_heads and mat.shape[-2] == mat.shape[-1]:
            return mat[:, :2].mean(1)
        return super().pooled_row(mat, num_prefix_tokens)

    def logits(self, image):
        x = self._tokens(image)
        for layer in self.visual.layers:
            x = self._layer(layer, x)
        return self.pooled_output(x)

    def trace_tokens(self, image, compute_dtype):
        return self._tokens(image).to(compute_dtype), None

    def trace_block(self, layer, x, context):
        blk = self.visual.layers[layer]
        h = layer_norm(blk.layernorm_before, x)
        q, k, v, scale, o = self._attention_on(blk, h)
        x = x + linear(blk.attention.o_proj, merge_heads(o))
        x = x + linear(blk.mlp.fc2, self._mlp_hidden(blk, x))
        return x, LayerStep(layer=layer, feature=x, out=o, value=v.detach(), num_prefix_tokens=self._prefix,
                            query=q.detach(), key=k.detach(), scale=scale, tokens=h)

    def steps(self, image, start, compute_dtype) -> Iterator[LayerStep]:
        x = self._tokens(image)
        layers = self.visual.layers
        for i in range(start):
            x = self._layer(layers[i], x)
        x = x.to(compute_dtype)
        for i in range(start, len(layers)):
            layer = layers[i]
            q, k, v, scale, o = self._attention(layer, x)
            o = o.detach().requires_grad_(True)
            with torch.enable_grad():
                x1 = x + linear(layer.attention.o_proj, merge_heads(o))
                hidden = self._mlp_hidden(layer, x1)
                feature = self._head(x1.mean(1) + linear(layer.mlp.fc2, hidden.mean(1)))
            with torch.no_grad():
                x = x1.detach() + linear(layer.mlp.fc2, hidden.detach())
            yield LayerStep(layer=i, feature=feature, out=o, value=v, num_prefix_tokens=self._prefix, query=q,
                            key=k, scale=scale, block_output=x)

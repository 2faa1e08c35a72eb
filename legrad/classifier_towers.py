"""Adapters for ViT image classifiers (timm, torchvision, Hugging Face); see :mod:`legrad.classifiers`.

Each adapter re-runs the classifier statelessly from its modules' weights (no hooks, no writes, eval
semantics) and yields, for every explained block ``l``, the logits of the mean of all of block ``l``'s
tokens passed through the model's own final norm and head:

* timm ``VisionTransformer`` / ``Eva`` / ``VisionTransformerRelPos`` classifiers (ViT, DeiT, DeiT III,
  EVA/EVA02, registers, in21k heads): ``head(fc_norm(norm(mean)))``; ``global_pool='map'`` models
  explain their ``AttentionPoolLatent`` instead (norm -> pooler -> fc_norm -> head).
* timm ``VisionTransformerDistilled`` (two prefix tokens, two heads): ``(head(y) + head_dist(y)) / 2``
  with ``y = norm(mean)``, the average timm returns in eval mode.
* torchvision ``VisionTransformer``: ``heads(encoder.ln(mean))``, the definition torchcam uses.
* transformers ``ViTForImageClassification``, ``DeiTForImageClassification``:
  ``classifier(layernorm(mean))``; ``DeiTForImageClassificationWithTeacher``: the average of its two
  classifiers. ``transformers`` is only imported once one of its models is wrapped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiheadAttentionOps, merge_heads
from .classifiers import ClassifierAdapter
from .functional import apply_module, layer_norm, linear, param

# Importing hf here registers its adapters before ours (register_tower puts the latest first): ours must be
# tried first because the transformers CLIP/SigLIP adapters refuse every other transformers class.
from .hf import _activation
from .posembed import resampled_embedding
from .towers import LayerStep, TowerAdapter, register_tower
from .towers_timm import _TRUNKS, TimmMapAdapter, TimmViTAdapter, _trunk_problem, eval_view

__all__ = [
    "TimmClassifierAdapter",
    "TimmMapClassifierAdapter",
    "TimmDistilledClassifierAdapter",
    "TorchvisionViTAdapter",
    "HFViTClassifierAdapter",
]

_DISTILLED = ("timm.models.deit.VisionTransformerDistilled",)


# ---------------------------------------------------------------------------------------------- timm
class _TimmClassifier(ClassifierAdapter):
    """Mixin over the timm tower adapters: the model is the trunk itself and the head gives logits."""

    trunks: ClassVar[tuple[str, ...]] = _TRUNKS
    pooled_by_map: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        TowerAdapter.__init__(self, model)
        self.trunk = model

    @classmethod
    def matches(cls, model):
        return (_trunk_problem(model, cls.pooled_by_map, cls.trunks) is None
                and isinstance(getattr(model, "head", None), nn.Linear) and cls._extra_ok(model))

    @classmethod
    def _extra_ok(cls, model: nn.Module) -> bool:
        return True

    @classmethod
    def from_model(cls, model):
        return cls(model) if cls.matches(model) else None

    @property
    def num_classes(self):
        return self.trunk.head.out_features

    def _after_pool(self, y):
        t = self.trunk
        return linear(t.head, apply_module(t.fc_norm, y))

    def logits(self, image):
        x, _, _ = self._run(image, self.depth, self.param_dtype())
        return self._pooled_output(x)


@register_tower
class TimmClassifierAdapter(_TimmClassifier, TimmViTAdapter):
    """timm ViT-style classifiers pooled by class token or average (ViT, DeiT, EVA/EVA02, registers)."""

    family = "timm ViT / DeiT / EVA classifier (token/avg pool)"


@register_tower
class TimmMapClassifierAdapter(_TimmClassifier, TimmMapAdapter):
    """timm classifiers with an ``AttentionPoolLatent`` head (``global_pool='map'``); its attention is explained."""

    family = "timm ViT classifier (map attention pool)"
    pooled_by_map = True


@register_tower
class TimmDistilledClassifierAdapter(_TimmClassifier, TimmViTAdapter):
    """timm ``VisionTransformerDistilled`` (DeiT distilled): class and distillation tokens, two heads.

    Layer logits: ``(head(y) + head_dist(y)) / 2`` with ``y = norm(mean over all tokens of block l)``;
    both prefix columns are dropped from the maps.
    """

    family = "timm DeiT distilled classifier (two heads)"
    trunks = _DISTILLED
    prefix_token_names = ("cls_token", "dist_token")

    @classmethod
    def _extra_ok(cls, model):
        # timm's distilled _pos_embed ignores register tokens, so a model with them is not this layout.
        return (getattr(model, "reg_token", None) is None and int(model.num_prefix_tokens) == 2
                and isinstance(getattr(model, "head_dist", None), nn.Linear))

    def _after_pool(self, y):
        t = self.trunk
        return 0.5 * (linear(t.head, y) + linear(t.head_dist, y))  # no fc_norm: timm's distilled head skips it

    def _pooled_output(self, x):
        t = self.trunk
        x = apply_module(t.norm, x)
        return 0.5 * (linear(t.head, x[:, 0]) + linear(t.head_dist, x[:, 1]))


# ---------------------------------------------------------------------------------------------- torchvision
def _last_linear(seq: nn.Module) -> int | None:
    """Index of the last ``nn.Linear`` of a Sequential whose later children are all dropouts/identities."""
    children = list(seq.children())
    idx = max((i for i, c in enumerate(children) if isinstance(c, nn.Linear)), default=None)
    if idx is None or not all(isinstance(c, (nn.Dropout, nn.Identity)) for c in children[idx + 1:]):
        return None
    return idx


@register_tower
class TorchvisionViTAdapter(ClassifierAdapter):
    """torchvision ``VisionTransformer`` (``vit_b_16``...): ``nn.MultiheadAttention`` blocks, class token.

    Layer logits: ``heads(encoder.ln(mean over all tokens of block l))``. Inputs of another size than the
    model's ``image_size`` (which torchvision itself refuses) get the position embedding resampled
    bicubically, as for the other towers.
    """

    family = "torchvision VisionTransformer classifier"

    @classmethod
    def matches(cls, model):
        tv = sys.modules.get("torchvision.models.vision_transformer")
        if tv is None:  # such a model cannot exist unless torchvision's module was imported: no import cost
            return False
        EncoderBlock, MLPBlock, VisionTransformer = tv.EncoderBlock, tv.MLPBlock, tv.VisionTransformer  # noqa: N806
        if type(model) is not VisionTransformer or not isinstance(model.conv_proj, nn.Conv2d):
            return False
        for blk in model.encoder.layers:
            if type(blk) is not EncoderBlock or type(blk.mlp) is not MLPBlock or _last_linear(blk.mlp) is None:
                return False
            if not MultiheadAttentionOps.handles(blk.self_attention):
                return False
        heads = list(model.heads.children())
        return (bool(heads) and isinstance(heads[-1], nn.Linear)
                and all(isinstance(h, (nn.Linear, nn.Tanh, nn.Identity, nn.Dropout)) for h in heads))

    @classmethod
    def from_model(cls, model):
        return cls(model) if cls.matches(model) else None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._ops = [MultiheadAttentionOps(blk.self_attention) for blk in model.encoder.layers]

    @property
    def depth(self):
        return len(self.visual.encoder.layers)

    @property
    def patch_size(self):
        p = self.visual.patch_size
        return (p, p)

    @property
    def in_chans(self):
        return self.visual.conv_proj.in_channels

    @property
    def num_classes(self):
        return list(self.visual.heads.children())[-1].out_features

    def _tokens(self, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        m = self.visual
        conv = m.conv_proj
        grid = self.grid_size(image.shape[-2], image.shape[-1])
        x = F.conv2d(image.to(dtype), param(conv.weight, dtype), param(conv.bias, dtype), stride=conv.stride)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([param(m.class_token, dtype).expand(x.shape[0], -1, -1), x], dim=1)
        g0 = m.image_size // m.patch_size
        # Encoder dropout only acts in training mode: eval semantics skips it.
        return x + resampled_embedding(m.encoder.pos_embedding, (g0, g0), grid, 1, dtype)

    def _mlp_hidden(self, blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, nn.Linear]:
        children = list(blk.mlp.children())
        last = _last_linear(blk.mlp)
        h = apply_module(blk.ln_2, x)
        for child in children[:last]:
            h = apply_module(child, h)
        return h, children[last]

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk, ops = self.visual.encoder.layers[i], self._ops[i]
        q, k, v = ops.qkv(apply_module(blk.ln_1, x))
        x = x + ops.out(ops.attend(q, k, v))
        hidden, fc2 = self._mlp_hidden(blk, x)
        return x + linear(fc2, hidden)

    def _head(self, y: torch.Tensor) -> torch.Tensor:
        return apply_module(self.visual.heads, apply_module(self.visual.encoder.ln, y))

    def logits(self, image):
        x = self._tokens(image, self.param_dtype())
        for i in range(self.depth):
            x = self._block(i, x)
        return self._head(x[:, 0])

    def steps(self, image, start, compute_dtype) -> Iterator[LayerStep]:
        x = self._tokens(image, self.param_dtype())
        for i in range(start):
            x = self._block(i, x)
        x = x.to(compute_dtype)
        for i in range(start, self.depth):
            blk, ops = self.visual.encoder.layers[i], self._ops[i]
            q, k, v = ops.qkv(apply_module(blk.ln_1, x))
            o = ops.attend(q, k, v).detach().requires_grad_(True)
            with torch.enable_grad():
                x1 = x + ops.out(o)
                hidden, fc2 = self._mlp_hidden(blk, x1)
                # The token mean commutes with the MLP's last linear layer: the graph keeps [B, C] there.
                feature = self._head(x1.mean(1) + linear(fc2, hidden.mean(1)))
            with torch.no_grad():
                x = x1.detach() + linear(fc2, hidden.detach())
            yield LayerStep(layer=i, feature=feature, out=o, value=v, num_prefix_tokens=1, query=q, key=k)


# ---------------------------------------------------------------------------------------------- transformers
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


@register_tower
class HFViTClassifierAdapter(ClassifierAdapter):
    """transformers ``ViTForImageClassification``, ``DeiTForImageClassification`` (+ ``WithTeacher``).

    Layer logits: ``classifier(layernorm(mean over all tokens of block l))`` (the average of both
    classifiers for the teacher-distilled DeiT). Positions are interpolated by the model's own
    embedding code (``interpolate_pos_encoding=True``), so any multiple of the patch size works.
    """

    family = "transformers ViT / DeiT image classifier"
    accepts_pixel_mapping = True

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

    @staticmethod
    def _attention(layer: nn.Module, x: torch.Tensor):
        attn = layer.attention
        h = layer_norm(layer.layernorm_before, x)
        heads = attn.num_attention_heads
        q, k, v = (linear(p, h).unflatten(-1, (heads, -1)).transpose(1, 2) for p in (attn.q_proj, attn.k_proj,
                                                                                      attn.v_proj))
        scale = float(attn.scaling)
        return q, k, v, scale, F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def _mlp_hidden(layer: nn.Module, x1: torch.Tensor) -> torch.Tensor:
        return _activation(layer.mlp.activation_fn, linear(layer.mlp.fc1, layer_norm(layer.layernorm_after, x1)))

    def _layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        o = self._attention(layer, x)[-1]
        x = x + linear(layer.attention.o_proj, merge_heads(o))
        return x + linear(layer.mlp.fc2, self._mlp_hidden(layer, x))

    def logits(self, image):
        x = self._tokens(image)
        for layer in self.visual.layers:
            x = self._layer(layer, x)
        if self._prefix == 2 and len(self.heads) == 2:  # teacher-distilled: class token + distillation token
            y = layer_norm(self.visual.layernorm, x[:, :2])
            return 0.5 * (linear(self.heads[0], y[:, 0]) + linear(self.heads[1], y[:, 1]))
        return linear(self.heads[0], layer_norm(self.visual.layernorm, x[:, 0]))

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
                            key=k, scale=scale)

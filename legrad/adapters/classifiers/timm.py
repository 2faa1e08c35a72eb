"""timm ViT classifiers: ``VisionTransformer`` / ``Eva`` / ``VisionTransformerRelPos`` (ViT, DeiT, DeiT III,
EVA/EVA02, registers, in21k heads): ``head(fc_norm(norm(mean)))``; ``global_pool='map'`` models explain
their ``AttentionPoolLatent`` instead (norm -> pooler -> fc_norm -> head); ``VisionTransformerDistilled``
(two prefix tokens, two heads): ``(head(y) + head_dist(y)) / 2`` with ``y = norm(mean)``, the average
timm returns in eval mode. Each re-runs the classifier statelessly from its weights (no hooks, no
writes, eval semantics).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ...ops.functional import apply_module, linear
from ..base import TowerAdapter
from ..timm import TimmMapAdapter, TimmViTAdapter
from ..timm_blocks import TRUNKS, trunk_problem
from .base import ClassifierAdapter

__all__ = ["TimmClassifierAdapter", "TimmMapClassifierAdapter", "TimmDistilledClassifierAdapter"]

_DISTILLED = ("timm.models.deit.VisionTransformerDistilled",)


class _TimmClassifier(ClassifierAdapter):
    """Mixin over the timm tower adapters: the model is the trunk itself and the head gives logits."""

    trunks: ClassVar[tuple[str, ...]] = TRUNKS
    pooled_by_map: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        TowerAdapter.__init__(self, model)
        self.trunk = model

    @classmethod
    def matches(cls, model):
        return (trunk_problem(model, cls.pooled_by_map, cls.trunks) is None
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


class TimmClassifierAdapter(_TimmClassifier, TimmViTAdapter):
    """timm ViT-style classifiers pooled by class token or average (ViT, DeiT, EVA/EVA02, registers)."""

    family = "timm ViT / DeiT / EVA classifier (token/avg pool)"


class TimmMapClassifierAdapter(_TimmClassifier, TimmMapAdapter):
    """timm classifiers with an ``AttentionPoolLatent`` head (``global_pool='map'``); its attention is explained."""

    family = "timm ViT classifier (map attention pool)"
    pooled_by_map = True


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

    def readout(self, x, context=None):
        t = self.trunk
        x = apply_module(t.norm, x)
        return 0.5 * (linear(t.head, x[:, 0]) + linear(t.head_dist, x[:, 1]))

    @property
    def readout_tokens(self):
        return 2  # the class and distillation tokens: the logits average one head on each

"""torchvision ``VisionTransformer`` classifiers (``vit_b_16``...): ``heads(encoder.ln(mean))``, the
definition torchcam uses; re-run statelessly from the weights."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.attention import MultiheadAttentionOps
from ...ops.functional import apply_module, param
from ...ops.posembed import resampled_embedding
from ..runner import Block, BlockTower, Run, chain
from .base import ClassifierAdapter

__all__ = ["TorchvisionViTAdapter"]


def _last_linear(seq: nn.Module) -> int | None:
    """Index of the last ``nn.Linear`` of a Sequential whose later children are all dropouts/identities."""
    children = list(seq.children())
    idx = max((i for i, c in enumerate(children) if isinstance(c, nn.Linear)), default=None)
    if idx is None or not all(isinstance(c, (nn.Dropout, nn.Identity)) for c in children[idx + 1:]):
        return None
    return idx


class TorchvisionViTAdapter(ClassifierAdapter, BlockTower):
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

    @staticmethod
    def _block(blk: nn.Module) -> Block:
        children = list(blk.mlp.children())
        last = _last_linear(blk.mlp)
        return Block(attn=MultiheadAttentionOps(blk.self_attention), norm1=chain(blk.ln_1), norm2=chain(blk.ln_2),
                     mlp_in=chain(*children[:last]), mlp_out=chain(children[last]))

    def declare(self, image, dtype):
        return Run(self._tokens(image, dtype), [self._block(b) for b in self.visual.encoder.layers], prefix=1)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return apply_module(self.visual.heads, apply_module(self.visual.encoder.ln, pooled))

    def readout(self, x, context=None):
        return self.head(x[:, 0])

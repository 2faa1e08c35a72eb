"""torchvision ``VisionTransformer`` classifiers (``vit_b_16``...): ``heads(encoder.ln(mean))``, the
definition torchcam uses; re-run statelessly from the weights."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.attention import MultiheadAttentionOps
from ...ops.functional import apply_module, linear, param
from ...ops.posembed import resampled_embedding
from ..base import LayerStep
from .base import ClassifierAdapter

__all__ = ["TorchvisionViTAdapter"]


def _last_linear(seq: nn.Module) -> int | None:
    """Index of the last ``nn.Linear`` of a Sequential whose later children are all dropouts/identities."""
    children = list(seq.children())
    idx = max((i for i, c in enumerate(children) if isinstance(c, nn.Linear)), default=None)
    if idx is None or not all(isinstance(c, (nn.Dropout, nn.Identity)) for c in children[idx + 1:]):
        return None
    return idx


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

    def pooled_output(self, x):
        return self._head(x[:, 0])

    def logits(self, image):
        x = self._tokens(image, self.param_dtype())
        for i in range(self.depth):
            x = self._block(i, x)
        return self.pooled_output(x)

    def trace_tokens(self, image, compute_dtype):
        return self._tokens(image, compute_dtype), None

    def trace_block(self, layer, x, context):
        blk, ops = self.visual.encoder.layers[layer], self._ops[layer]
        h = apply_module(blk.ln_1, x)
        q, k, v = ops.qkv(h)
        o = ops.attend(q, k, v)
        x = x + ops.out(o)
        hidden, fc2 = self._mlp_hidden(blk, x)
        x = x + linear(fc2, hidden)
        return x, LayerStep(layer=layer, feature=x, out=o, value=v.detach(), num_prefix_tokens=1,
                            query=q.detach(), key=k.detach(), tokens=h)

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
            yield LayerStep(layer=i, feature=feature, out=o, value=v, num_prefix_tokens=1, query=q, key=k,
                            block_output=x)

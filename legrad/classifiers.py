"""LeGrad for ViT image classifiers: a class logit is explained instead of a text cosine.

The engine is the one used for CLIP towers (:mod:`legrad.engine`); only the per-layer score changes.
For each explained block ``l`` the classifier adapters (:mod:`legrad.adapters.classifiers`) compute the
layer's logits: the model's own final norm and classification head (with its ``fc_norm`` or
attention-pooling path where it has one) applied to the **mean of all of block l's tokens**. The score
of a target class is its logit (not a softmax probability):

    s_{l,c} = logits_l[c],     G = d s_{l,c} / d A_l,     m_{l,c} = mean over heads and query rows of relu(G)

with prefix (class, distillation, register) key columns dropped, summed over layers, upsampled
bilinearly and min-max normalised per (image, target), exactly as for CLIP. For attention-pooled heads
(timm ``global_pool='map'``) the pooler's attention is explained, as for SigLIP. Two-head distilled
DeiTs (timm ``VisionTransformerDistilled``, transformers ``DeiTForImageClassificationWithTeacher``)
score the average of the class and distillation heads, the logits those models return in eval mode.

The baselines (:mod:`legrad.eval.baselines`) take the same ``target=``; GradCAM and CheferCAM
differentiate the target's logit of the model's own output, and the perturbation test
(:func:`legrad.eval.metrics.perturbation_curve`) scores the target's logit of the perturbed image.

Usage::

    maps = LeWrapper(classifier).compute_legrad(image=x, target=[281, 285])   # [B, 2, H, W]
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters.runner import rerun
from .engine.targets import Logits

__all__ = ["class_logits"]


def class_logits(wrapper: Any, image: Any) -> torch.Tensor:
    """The classifier's eval-mode logits ``[B, K]`` for an image batch, recomputed statelessly.

    Equal to the model's own eval-mode output (for two-head distilled DeiTs: the average of both heads),
    whatever ``model.training`` says; handy to pick targets, e.g. ``class_logits(w, x).topk(5).indices``.

    Args:
        wrapper: a :class:`~legrad.LeWrapper` of an image classifier.
        image: ``[B, C, H, W]`` preprocessed images (Hugging Face models: also the processor's output).

    Raises:
        TypeError: if the wrapped model is not an image classifier.
    """
    adapter = wrapper.adapter
    if not isinstance(adapter.readout_space, Logits):
        raise TypeError(f"class_logits needs an image classifier; this model's tower is {adapter.family}")
    batch = adapter.prepare_inputs(image)
    x = batch.pixels
    with torch.inference_mode(False), torch.no_grad():
        x = x.to(device=adapter.device(), dtype=adapter.param_dtype())
        return rerun(adapter, x.clone() if x.is_inference() else x).float().to(batch.device)

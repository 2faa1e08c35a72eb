"""LeGrad for ViT image classifiers: a class logit is explained instead of a text cosine.

The engine is the one used for CLIP towers (:mod:`legrad.heatmap`); only the per-layer score changes.
For each explained block ``l`` the classifier adapters (:mod:`legrad.classifier_towers`) compute the
layer's logits: the model's own final norm and classification head (with its ``fc_norm`` or
attention-pooling path where it has one) applied to the **mean of all of block l's tokens**. The score
of a target class is its logit (not a softmax probability):

    s_{l,c} = logits_l[c],     G = d s_{l,c} / d A_l,     m_{l,c} = mean over heads and query rows of relu(G)

with prefix (class, distillation, register) key columns dropped, summed over layers, upsampled
bilinearly and min-max normalised per (image, target), exactly as for CLIP. For attention-pooled heads
(timm ``global_pool='map'``) the pooler's attention is explained, as for SigLIP. Two-head distilled
DeiTs (timm ``VisionTransformerDistilled``, transformers ``DeiTForImageClassificationWithTeacher``)
score the average of the class and distillation heads, the logits those models return in eval mode.

Usage::

    maps = LeWrapper(classifier).compute_legrad(image=x, target=[281, 285])   # [B, 2, H, W]
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .towers import TowerAdapter

__all__ = ["ClassifierAdapter", "logit_scores", "checked_targets", "classifier_legrad", "class_logits"]


def logit_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target logits ``[B, P]`` from layer logits ``[B, K]`` and class indices ``[P]`` or ``[B, P]``.

    The :data:`~legrad.heatmap.Scorer` of classifiers.
    """
    target = target.to(logits.device)
    if target.ndim == 1:
        return logits[:, target]
    return logits.gather(1, target)


class ClassifierAdapter(TowerAdapter):
    """Base of the image-classifier adapters: the layer feature is the ``[B, num_classes]`` logits.

    ``LeWrapper.compute_legrad`` sends models whose adapter has ``scores_classes`` to
    :func:`classifier_legrad` (targets are class indices, no text embeddings).
    """

    scores_classes: ClassVar[bool] = True
    entry_points: ClassVar[tuple[str, ...]] = ("compute_legrad",)
    uses_empty_prompt_correction: ClassVar[bool] = False
    #: Whether ``image`` may be a mapping holding ``pixel_values`` (a Hugging Face processor output).
    accepts_pixel_mapping: ClassVar[bool] = False

    @classmethod
    def supports_config(cls, model_cfg: dict) -> bool:
        return False  # OpenCLIP configs build CLIP towers, never classifiers

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        return self.num_classes

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """The model's own eval-mode logits ``[B, K]`` recomputed statelessly (no grad)."""
        raise NotImplementedError

    def trace(self, image, compute_dtype):
        raise NotImplementedError(
            f"gradient baselines (GradCAM, CheferCAM) are not available for image classifiers ({self.family}) yet"
        )


def checked_targets(target: Any, batch: int, num_classes: int) -> torch.Tensor:
    """Validates class targets and returns them as a CPU LongTensor ``[P]`` or ``[B, P]``.

    Args:
        target: an int, a sequence of ints, or an integer tensor ``[]``, ``[P]`` or ``[B, P]``.
        batch: the image batch size ``B``.
        num_classes: number of classes of the model.

    Raises:
        TypeError: for a non-integer target.
        ValueError: for an empty target, a wrong shape or a class index outside ``[0, num_classes)``.
    """
    if target is None:
        raise ValueError(
            "target is required for an image classifier: the class indices to explain, e.g. target=281, "
            "target=[281, 285] (shared by the batch) or a LongTensor [B, P] (per image)"
        )
    if isinstance(target, bool) or (isinstance(target, torch.Tensor) and target.dtype == torch.bool):
        raise TypeError("target must hold class indices (ints), got a bool")
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype} (use .long())")
        t = target.detach().to("cpu", torch.long)
    elif hasattr(target, "__array__") and not isinstance(target, (str, bytes)):  # numpy arrays and scalars
        t = torch.as_tensor(target)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"target must hold class indices (ints), got an array of {t.dtype}")
        t = t.long()
    elif isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        try:
            t = torch.tensor([operator.index(c) for c in target], dtype=torch.long)
        except TypeError:
            raise TypeError(
                "target must be an int, a sequence of ints or an integer tensor [P] / [B, P]; for per-image "
                "targets pass torch.tensor([[...], [...]])"
            ) from None
    else:
        try:
            t = torch.tensor([operator.index(target)], dtype=torch.long)
        except TypeError:
            raise TypeError(
                f"target must be an int, a sequence of ints or an integer tensor, got {type(target).__name__}"
            ) from None
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim not in (1, 2):
        raise ValueError(f"target must be [P] or [B, P], got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError("target holds no class index; pass at least one")
    if t.ndim == 2 and t.shape[0] != batch:
        raise ValueError(
            f"per-image target [B, P] has B={t.shape[0]} but the image batch has B={batch}; pass a 1-D target to "
            "share the classes across images"
        )
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"target class {bad} is out of range: this model has {num_classes} classes (0..{num_classes - 1})")
    return t


def _pixel_values(adapter: ClassifierAdapter, image: Any, inputs: dict[str, Any]) -> Any:
    extra = sorted(k for k in inputs if not (adapter.accepts_pixel_mapping and k == "interpolate_pos_encoding"))
    if extra:
        raise TypeError(f"compute_legrad got unexpected keyword arguments {extra} for {adapter.family}")
    if isinstance(image, Mapping) and adapter.accepts_pixel_mapping:
        if "pixel_values" not in image:
            raise ValueError(f"image mapping has no 'pixel_values' (keys: {sorted(image)}); pass the processor output")
        return image["pixel_values"]
    return image


def classifier_legrad(wrapper: Any, text_embedding: Any, image: Any, target: Any, *, layer_index: int | None,
                      prompt_chunk: int | None, output_size: Any, **inputs: Any) -> torch.Tensor:
    """LeGrad maps of class logits; the implementation of ``LeWrapper.compute_legrad`` for classifiers.

    Args:
        wrapper: the :class:`~legrad.LeWrapper` of an image classifier.
        text_embedding: must be None (classifiers take ``target``).
        image: ``[B, C, H, W]`` float images, preprocessed (Hugging Face models: also the processor's
            output mapping); H and W multiples of the patch size.
        target: class indices, see :func:`checked_targets`.
        layer_index, prompt_chunk, output_size: as for ``compute_legrad`` (``prompt_chunk`` counts targets).

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1] (or at ``output_size``) on ``image``'s device.

    Raises:
        TypeError, ValueError: on invalid inputs, before any computation.
    """
    from .wrapper import _checked_output_size

    adapter: ClassifierAdapter = wrapper.adapter
    if text_embedding is not None:
        hint = ""
        if isinstance(text_embedding, torch.Tensor) and text_embedding.ndim == 4 and image is None:
            hint = " (the image goes in image=...: compute_legrad(image=x, target=...))"
        raise TypeError(
            f"this model is an image classifier ({adapter.family}): it explains class logits, not text; pass "
            f"target=class indices instead of text_embedding{hint}"
        )
    image = wrapper._validate_image(_pixel_values(adapter, image, inputs))
    out_hw = _checked_output_size(output_size)
    targets = checked_targets(target, image.shape[0], adapter.num_classes)
    if prompt_chunk is not None and (isinstance(prompt_chunk, bool) or not isinstance(prompt_chunk, int)
                                     or prompt_chunk < 1):
        raise ValueError(f"prompt_chunk must be a positive int or None, got {prompt_chunk!r}")
    li = wrapper.layer_index if layer_index is None else wrapper._checked_layer_index(layer_index)
    start = li % adapter.depth
    return wrapper._legrad(adapter, image, targets, start, prompt_chunk, output_size=out_hw, scorer=logit_scores)


def class_logits(wrapper: Any, image: Any) -> torch.Tensor:
    """The classifier's eval-mode logits ``[B, K]`` for an image batch, recomputed statelessly.

    Equal to the model's own eval-mode output (for two-head distilled DeiTs: the average of both heads),
    whatever ``model.training`` says; handy to pick targets, e.g. ``class_logits(w, x).topk(5).indices``.

    Raises:
        TypeError: if the wrapped model is not an image classifier.
    """
    adapter = wrapper.adapter
    if not getattr(adapter, "scores_classes", False):
        raise TypeError(f"class_logits needs an image classifier; this model's tower is {adapter.family}")
    image = wrapper._validate_image(_pixel_values(adapter, image, {}))
    with torch.inference_mode(False), torch.no_grad():
        x = image.to(device=adapter.device(), dtype=adapter.param_dtype())
        return adapter.logits(x.clone() if x.is_inference() else x).float().to(image.device)

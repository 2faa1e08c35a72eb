"""A Quantus ``explain_func`` backed by any registered method (:mod:`legrad.methods.registry`).

Quantus calls ``explain_func(model=..., inputs=x [B, C, H, W] numpy, targets=y [B] numpy, **kwargs)``
and expects numpy attributions it can broadcast over the channels: here ``[B, 1, H, W]``.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from ..methods.base import Method
from ..methods.registry import make_method
from ..methods.targets import Classes, Text, is_classifier

__all__ = ["quantus_explain"]

# Methods already built per model (Quantus calls explain_func for every batch and perturbation: the
# model is wrapped, and the drift guard run, once per model, method and options).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _method(model: Any, method: str, options: dict[str, Any]) -> Method:
    key = (method, tuple(sorted(options.items())))
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: no cache
        return make_method(method, model, **options)
    if key not in per_model:
        per_model[key] = make_method(method, model, **options)
    return per_model[key]


def quantus_explain(model: Any, inputs: Any, targets: Any, method: str = "legrad", *,
                    text_embedding: torch.Tensor | None = None, normalize: bool = True,
                    method_options: dict[str, Any] | None = None, device: Any = None,
                    **call_options: Any) -> np.ndarray:
    """Maps of ``method`` in Quantus's ``explain_func`` contract: ``targets[i]`` explains image ``i``.

    Args:
        model: the model Quantus evaluates (anything :class:`~legrad.LeWrapper` accepts, or a LeWrapper).
        inputs: ``[B, C, H, W]`` preprocessed images (numpy or tensor).
        targets: ``[B]`` ints: a class index per image (classifiers), or a row of ``text_embedding``
            (CLIP-like models).
        method: a registry name (``"legrad"``, ``"gradcam"``, ``"rollout@3"``...).
        text_embedding: ``[K, D]`` normalised text embeddings, for CLIP-like models.
        normalize: min-max normalise each map (False: raw relevance).
        method_options: options of the method's constructor.
        device: where the images go (Quantus passes its ``device``); None: the model's device.
        **call_options: per-call options of :meth:`~legrad.methods.Method.attribute`.

    Returns:
        ``[B, 1, H, W]`` float32 numpy maps.

    Raises:
        TypeError, ValueError: for bad targets or inputs, before any work.
    """
    m = _method(model, method, dict(method_options or {}))
    images = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    if images.ndim != 4:
        raise ValueError(f"inputs must be a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    images = images.to(m.wrapper.adapter.device() if device is None else device)
    idx = torch.as_tensor(np.asarray(targets)).reshape(-1)
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.numel() != images.shape[0]:
        raise ValueError(f"targets must hold one int per image ({images.shape[0]}), got {np.asarray(targets)!r}")
    idx = idx.long()
    if is_classifier(m.wrapper.adapter):
        if text_embedding is not None:
            raise TypeError("text_embedding= is for CLIP-like models; a classifier's targets are class indices")
        target: Any = Classes(idx[:, None])  # [B, 1]: one class per image
    else:
        if text_embedding is None:
            raise TypeError("a CLIP-like model needs text_embedding= [K, D]: targets[i] is a row of it")
        if int(idx.min()) < 0 or int(idx.max()) >= text_embedding.shape[0]:
            raise ValueError(f"targets index rows of text_embedding [{text_embedding.shape[0]}, D], got {idx.tolist()}")
        target = Text(text_embedding[idx.to(text_embedding.device)][:, None])  # [B, 1, D]
    maps = m.attribute(images, target=target, normalize=normalize, **call_options)
    return maps.detach().float().cpu().numpy()

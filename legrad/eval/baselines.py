"""Baseline explainability methods with LeGrad's contract, for side-by-side comparisons.

Every method takes ``(model, text_embedding, image)`` -- an OpenCLIP model or a
:class:`~legrad.LeWrapper`, ``[P, D]`` (or ``[B, P, D]``) normalised text embeddings and a
``[B, C, H, W]`` preprocessed image batch -- or, for a ViT image classifier (timm, torchvision,
transformers; see :mod:`legrad.classifiers`), ``(model, image=x, target=classes)`` with ``target`` an
int, a sequence of ints or a LongTensor ``[P]`` / ``[B, P]`` checked exactly as
:meth:`~legrad.LeWrapper.compute_legrad` checks it. Each returns ``[B, P, H, W]`` float32 maps in [0, 1]
(patch-grid relevance, bilinearly upsampled, min-max normalised per (image, prompt), exactly as
LeGrad's maps are). They run the image tower through the same stateless tower adapters as LeGrad
(:mod:`legrad.adapters`) and the same pipeline (:mod:`legrad.engine.pipeline`: validation, prologue,
grids, upsampling and normalisation): the model is never modified and calls are thread-safe.

Notation: ``A_l`` is block ``l``'s post-softmax attention ``[heads, N, N]`` (``N`` tokens, the
prefix/CLS token first), ``E_h`` the mean over heads, ``s = <t, normalize(f(x))>`` the cosine
similarity of the model's own image embedding ``f(x)`` with the prompt embedding ``t`` -- for a
classifier ``s = f(x)[c]``, the target class's logit of the model's own eval-mode output -- and the
"CLS row" the row of the token the model pools (row 0 for CLS pooling, the mean of the patch rows
for average pooling, the mean of the class and distillation rows for two-head distilled DeiTs, the
pooler queries for attention-pooled towers and ``map``-pooled classifiers). Prefix columns are
dropped from every map.

* :func:`raw_attention` -- ``E_h A_L[cls, :]`` of the last block; prompt-independent.
* :func:`attention_rollout` -- Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers":
  ``R = prod_l (0.5 E_h A_l + 0.5 I)`` (later blocks on the left), map ``R[cls, :]``;
  prompt-independent.
* :func:`gradcam` -- Selvaraju et al. (2017), "Grad-CAM", on the last block's tokens ``T``
  ``[N, C]`` (the input of its attention, after the block's pre-norm): ``w_c = mean_n ds/dT[n, c]``
  over patch tokens, map ``relu(sum_c w_c T[n, c])``.
* :func:`chefercam` -- Chefer, Gur & Wolf (2021), "Generic Attention-model Explainability for
  Interpreting Bi-Modal and Encoder-Decoder Transformers": ``R = I``, then for each block
  ``R <- R + E_h[relu(ds/dA_l * A_l)] R``; map ``R[cls, :]``.
* :func:`legrad` -- LeGrad itself (:meth:`legrad.LeWrapper.compute_legrad`).

The gradient methods differentiate the model's real image embedding (a classifier's real logits)
through the whole tower (:meth:`~legrad.adapters.base.TowerAdapter.trace`), with
``ds/dA = (ds/dO) V^T`` as in LeGrad. Attention-pooled models (SigLIP towers, timm ``map``
classifiers) pool with a latent query, not a token: raw attention is the pooler's attention, GradCAM
works, rollout and CheferCAM refuse (there is no pooled token's row of the block attentions).

The computations live in :mod:`legrad.methods` (:class:`~legrad.methods.RawAttention`,
:class:`~legrad.methods.AttentionRollout`, :class:`~legrad.methods.GradCAM`,
:class:`~legrad.methods.CheferCAM`, :class:`~legrad.methods.LeGrad`): these functions are thin calls of
them, kept for their 3-argument signature. A method object wraps the model once; these functions wrap
a bare model at every call.

Example::

    from legrad.eval.baselines import METHODS
    maps = {name: fn(model, text_embedding, images) for name, fn in METHODS.items()}
    maps = {name: fn(classifier, image=images, target=[281, 285]) for name, fn in METHODS.items()}
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..methods.attention import AttentionRollout, RawAttention
from ..methods.base import Method as MethodBase
from ..methods.gradients import CheferCAM, GradCAM
from ..methods.legrad import LeGrad
from ..methods.targets import Classes, Target, Text

__all__ = [
    "METHODS",
    "Method",
    "attention_rollout",
    "chefercam",
    "get_method",
    "gradcam",
    "legrad",
    "raw_attention",
]

#: A baseline: ``(model, text_embedding [P, D] or [B, P, D], image [B, C, H, W]) -> [B, P, H, W]``; for
#: classifiers ``(model, image=..., target=...)``.
Method = Callable[..., torch.Tensor]


def _target(text_embedding: Any, target: Any) -> Target:
    """The old pair of arguments as one target (``target=`` wins; the engine refuses both given)."""
    if target is not None and text_embedding is not None:
        raise TypeError("give text_embedding or target=, not both")
    return Classes(target) if target is not None else Text(text_embedding)


def _call(cls: type[MethodBase], model: Any, text_embedding: Any, image: Any, target: Any,
          **options: Any) -> torch.Tensor:
    return cls(model, **options).maps(image, _target(text_embedding, target), True)


def raw_attention(model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
                  target: Any = None) -> torch.Tensor:
    """Raw attention (:class:`legrad.methods.RawAttention`): ``E_h A_L[cls, patches]``, prompt-independent.

    Args:
        model: OpenCLIP model, ViT image classifier or :class:`~legrad.LeWrapper` with a supported tower.
        text_embedding: ``[P, D]`` or ``[B, P, D]`` normalised text embeddings; None for a classifier.
        image: ``[B, C, H, W]`` preprocessed images.
        target: class indices for an image classifier (int, ints, LongTensor ``[P]`` / ``[B, P]``).

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1].
    """
    return _call(RawAttention, model, text_embedding, image, target)


def attention_rollout(
    model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
    target: Any = None, start_layer: int = 0
) -> torch.Tensor:
    """Attention rollout (:class:`legrad.methods.AttentionRollout`), prompt-independent.

    Args: as :func:`raw_attention`, and ``start_layer``: first block of the product (0 = all blocks).

    Raises:
        NotImplementedError: for towers whose adapter explains layers through an attention pooler.
    """
    return _call(AttentionRollout, model, text_embedding, image, target, start_layer=start_layer)


def gradcam(model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
            target: Any = None) -> torch.Tensor:
    """GradCAM (:class:`legrad.methods.GradCAM`) on the last block's tokens, for each prompt.

    Args: as :func:`raw_attention`.

    Raises:
        NotImplementedError: if the tower adapter has no traced forward.
    """
    return _call(GradCAM, model, text_embedding, image, target)


def chefercam(
    model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
    target: Any = None, start_layer: int = 0
) -> torch.Tensor:
    """CheferCAM (:class:`legrad.methods.CheferCAM`), for each prompt.

    Args: as :func:`raw_attention`, and ``start_layer``: first block used (0 = all blocks).

    Raises:
        NotImplementedError: if the tower adapter has no traced forward, or pools with attention.
    """
    return _call(CheferCAM, model, text_embedding, image, target, start_layer=start_layer)


def legrad(
    model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
    target: Any = None, layer_index: int | None = None
) -> torch.Tensor:
    """LeGrad (:meth:`legrad.LeWrapper.compute_legrad`) through the same interface as the baselines.

    Args: as :func:`raw_attention`, and ``layer_index``: overrides the wrapper's first explained block
    (a bare OpenCLIP model is wrapped with its default).
    """
    return LeGrad(model).maps(image, _target(text_embedding, target), True, layer_index=layer_index)


#: Every method by name, for user loops (``legrad bench`` reads :data:`legrad.methods.METHODS`).
METHODS: dict[str, Method] = {
    "legrad": legrad,
    "raw_attention": raw_attention,
    "rollout": attention_rollout,
    "gradcam": gradcam,
    "chefercam": chefercam,
}


#: Keyword that ``"name@K"`` sets for the functions that have a first block.
_LAYER_KEYWORD = {"legrad": "layer_index", "rollout": "start_layer", "chefercam": "start_layer"}


def get_method(name: str) -> Method:
    """Looks a function up in :data:`METHODS`; ``"name@K"`` fixes its first block to ``K``.

    ``legrad@-2`` is LeGrad with ``layer_index=-2``, ``rollout@3``/``chefercam@3`` start at block 3.

    Raises:
        TypeError: if ``name`` is not a str.
        ValueError: naming the known methods when ``name`` is not one of them, or for an invalid ``"@K"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    base, sep, layer = name.partition("@")
    fn = METHODS.get(base)
    if fn is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if not sep:
        return fn
    keyword = _LAYER_KEYWORD.get(base)
    try:
        value = int(layer)
    except ValueError:
        value = None
    if keyword is None or value is None:
        options = ", ".join(f"{k}@K" for k in _LAYER_KEYWORD)
        raise ValueError(f"invalid method {name!r}: a first block can be given as {options} (K an integer)")
    return functools.partial(fn, **{keyword: value})

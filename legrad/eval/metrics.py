"""Localization metrics for heatmaps, on batched tensors.

Maps are ``[..., H, W]`` float tensors (e.g. ``[B, P, H, W]`` in [0, 1] from any method of
:mod:`legrad.eval.baselines`); masks are boolean tensors of the same shape (True on the object).

* :func:`pointing_game` -- Zhang et al. (2016), "Top-down Neural Attention by Excitation Backprop":
  a hit when the map's maximum lies inside the mask.
* :func:`miou`, :func:`pixel_accuracy` -- the map binarised at a threshold (``map >= t``) against
  the mask, as in the ImageNet-Segmentation protocol of Chefer et al. (2021) used by the LeGrad
  paper: per class (object, background) ``IoU = TP / (TP + FP + FN)``, mIoU their mean; pixel
  accuracy the fraction of correctly labelled pixels. :func:`confusion` gives the counts so that a
  dataset-level score (counts summed over images first) can be accumulated batch by batch.
* :func:`perturbation_curve`, :func:`perturbation_auc` -- the perturbation test of Chefer et al.
  (2021): pixels are replaced by the dataset mean in order of relevance (most relevant first:
  "positive", lower AUC is better; least relevant first: "negative", higher is better) at
  0, 10, ..., 90 % of the pixels, and the model's image-text cosine similarity is recorded (for an
  image classifier: the target class's logit of the model's own forward).

OpenImagesV7's point-based p-mIoU, also reported in the LeGrad paper, is not implemented: its exact
definition (binarisation and how point counts are aggregated) could not be established here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .scoring import class_scorer, text_scorer

__all__ = [
    "DEFAULT_FRACTIONS",
    "binarize",
    "check_fractions",
    "check_threshold",
    "check_tolerance",
    "confusion",
    "miou",
    "miou_from_confusion",
    "perturb",
    "perturbation_auc",
    "perturbation_curve",
    "pixel_accuracy",
    "pixel_accuracy_from_confusion",
    "pointing_game",
]

#: Fractions of pixels removed by the perturbation test: 0, 10, ..., 90 %.
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(i / 10 for i in range(10))


def _check_map(maps: Any, name: str = "maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [..., H, W], got {type(maps).__name__}")
    if maps.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims [..., H, W], got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {maps.dtype} (convert with .float())")
    if maps.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(maps.shape)})")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return maps


def _check_pair(maps: Any, masks: Any) -> tuple[torch.Tensor, torch.Tensor]:
    maps = _check_map(maps)
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor of the maps' shape, got {type(masks).__name__}")
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks shape {tuple(masks.shape)} differs from maps shape {tuple(maps.shape)}; resize the masks to "
            "the preprocessed image (nearest neighbour) and give one mask per (image, prompt)"
        )
    if masks.dtype != torch.bool:
        if masks.is_floating_point() or not bool(((masks == 0) | (masks == 1)).all()):
            raise TypeError(f"masks must be boolean (or 0/1 integers), got {masks.dtype}; use mask > 0")
        masks = masks.bool()
    return maps, masks.to(maps.device)


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within Euclidean distance ``radius`` of a mask pixel, ``[..., H, W]`` bool."""
    r = torch.arange(-radius, radius + 1, device=masks.device, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return (F.conv2d(flat, disk, padding=radius) > 0.5).reshape(masks.shape)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Pointing game: whether the map's maximum falls inside the mask.

    Ties at the maximum count as a random pick among them: the result is the fraction of the maximal
    pixels that lie in the mask (so a constant map scores the mask's area fraction, i.e. chance).

    Args:
        maps: ``[..., H, W]`` float maps.
        masks: ``[..., H, W]`` boolean masks.
        tolerance: also a hit within this many pixels (Euclidean) of the mask; Zhang et al. use 15 px
            at ImageNet resolution. 0 (default): strictly inside.

    Returns:
        ``[...]`` float64 hit scores in [0, 1]; NaN where the mask is empty (no object to point at),
        to be skipped by ``nanmean``.

    Raises:
        TypeError, ValueError: on invalid inputs.
    """
    maps, masks = _check_pair(maps, masks)
    check_tolerance(tolerance)
    target = _dilate(masks, tolerance) if tolerance else masks
    flat, inside = maps.flatten(-2), target.flatten(-2)
    top = flat == flat.max(dim=-1, keepdim=True).values
    hits = (top & inside).sum(-1).double() / top.sum(-1).double()
    return torch.where(masks.flatten(-2).any(-1), hits, torch.full_like(hits, math.nan))


def binarize(maps: torch.Tensor, threshold: float | str = 0.5) -> torch.Tensor:
    """Foreground prediction ``map >= threshold``.

    Args:
        maps: ``[..., H, W]`` float maps.
        threshold: a number, or ``"mean"`` for each map's own mean (Chefer et al.'s segmentation code).

    Returns:
        ``[..., H, W]`` bool.

    Raises:
        ValueError: for an unknown threshold string.
    """
    maps = _check_map(maps)
    check_threshold(threshold)
    if threshold == "mean":
        return maps >= maps.mean(dim=(-2, -1), keepdim=True)
    return maps >= threshold


def check_tolerance(tolerance: Any) -> None:
    """Raises a ValueError unless ``tolerance`` is a non-negative int (pixels)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative int (pixels), got {tolerance!r}")


def check_threshold(threshold: Any) -> None:
    """Raises a ValueError/TypeError unless ``threshold`` is a number or ``"mean"``."""
    if isinstance(threshold, str):
        if threshold != "mean":
            raise ValueError(f"threshold must be a number or 'mean', got {threshold!r}")
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number or 'mean', got {type(threshold).__name__}")


def confusion(maps: torch.Tensor, masks: torch.Tensor, threshold: float | str = 0.5) -> torch.Tensor:
    """Pixel counts of the binarised map against the mask.

    Args:
        maps: ``[..., H, W]`` float maps.
        masks: ``[..., H, W]`` boolean masks.
        threshold: see :func:`binarize`.

    Returns:
        ``[..., 4]`` int64 counts ``(TP, FP, FN, TN)`` (positive = object).
    """
    maps, masks = _check_pair(maps, masks)
    pred = binarize(maps, threshold).flatten(-2)
    gt = masks.flatten(-2)
    tp = (pred & gt).sum(-1)
    fp = (pred & ~gt).sum(-1)
    fn = (~pred & gt).sum(-1)
    tn = (~pred & ~gt).sum(-1)
    return torch.stack([tp, fp, fn, tn], dim=-1)


def _check_counts(counts: Any) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.ndim < 1 or counts.shape[-1] != 4:
        raise ValueError("counts must be a tensor [..., 4] of (TP, FP, FN, TN), as confusion() returns")
    return counts.double()


def miou_from_confusion(counts: torch.Tensor) -> torch.Tensor:
    """Mean of the object and background IoUs from ``(TP, FP, FN, TN)`` counts ``[..., 4]``.

    A class absent from both prediction and ground truth (zero union) is left out of the mean.

    Returns:
        ``[...]`` float64 in [0, 1].
    """
    tp, fp, fn, tn = _check_counts(counts).unbind(-1)
    wrong = fp + fn
    ious = torch.stack([tp / (tp + wrong), tn / (tn + wrong)], dim=-1)  # 0/0 -> NaN: class absent
    return ious.nanmean(dim=-1)


def pixel_accuracy_from_confusion(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of correctly labelled pixels from ``(TP, FP, FN, TN)`` counts ``[..., 4]``."""
    tp, fp, fn, tn = _check_counts(counts).unbind(-1)
    return (tp + tn) / (tp + fp + fn + tn)


def _reduce(counts: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], reduction: str) -> torch.Tensor:
    if reduction == "none":
        return fn(counts)
    if reduction == "dataset":
        return fn(counts.reshape(-1, 4).sum(0))
    if reduction == "mean":
        return fn(counts).nanmean()
    raise ValueError(f"reduction must be 'dataset', 'mean' or 'none', got {reduction!r}")


def miou(maps: torch.Tensor, masks: torch.Tensor, threshold: float | str = 0.5, reduction: str = "dataset") -> torch.Tensor:
    """Mean IoU (object and background) of the binarised maps.

    Args:
        maps: ``[..., H, W]`` float maps.
        masks: ``[..., H, W]`` boolean masks.
        threshold: see :func:`binarize`.
        reduction: ``"dataset"``: counts summed over all maps, then IoUs (the segmentation-benchmark
            convention); ``"mean"``: mean of per-map mIoUs; ``"none"``: ``[...]`` per-map values.

    Returns:
        float64 scalar (or ``[...]``) in [0, 1].
    """
    return _reduce(confusion(maps, masks, threshold), miou_from_confusion, reduction)


def pixel_accuracy(
    maps: torch.Tensor, masks: torch.Tensor, threshold: float | str = 0.5, reduction: str = "dataset"
) -> torch.Tensor:
    """Pixel accuracy of the binarised maps; arguments as in :func:`miou`."""
    return _reduce(confusion(maps, masks, threshold), pixel_accuracy_from_confusion, reduction)


# ----------------------------------------------------------------------------- perturbation
def check_fractions(fractions: Sequence[float]) -> list[float]:
    """The fractions as floats; ValueError unless they increase within [0, 1]."""
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 <= f <= 1.0 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise ValueError(f"fractions must be increasing values in [0, 1], got {list(fractions)}")
    return fr


def _fill_tensor(fill: float | torch.Tensor, channels: int, like: torch.Tensor) -> torch.Tensor:
    fill_t = torch.as_tensor(fill, dtype=like.dtype, device=like.device)
    if fill_t.ndim == 0:
        return fill_t.reshape(1, 1)
    if fill_t.shape != (channels,):
        raise ValueError(f"fill must be a number or a [{channels}] per-channel tensor, got shape {tuple(fill_t.shape)}")
    return fill_t.reshape(channels, 1)


def _check_image_maps(image: Any, maps: Any) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or not image.is_floating_point():
        raise ValueError("image must be a float tensor [B, C, H, W]")
    _check_map(maps)
    if maps.ndim != 4 or maps.shape[0] != image.shape[0] or maps.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"maps must be [B, P, H, W] matching the image batch {tuple(image.shape)}, got {tuple(maps.shape)}"
        )


def perturb(
    image: torch.Tensor, maps: torch.Tensor, fraction: float, *, positive: bool = True,
    fill: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Images with a fraction of their pixels replaced, in order of relevance.

    The ``round(fraction * H * W)`` most relevant pixels (``positive=True``) or least relevant ones are
    set to ``fill`` in every channel; equal map values are taken in raster order.

    Args:
        image: ``[B, C, H, W]`` preprocessed images.
        maps: ``[B, P, H, W]`` relevance maps.
        fraction: in [0, 1].
        positive: remove the most relevant pixels first.
        fill: replacement value, a number or a ``[C]`` tensor in the preprocessed space (0 is the
            normalisation mean, i.e. the dataset mean pixel for CLIP-style preprocessing).

    Returns:
        ``[B, P, C, H, W]`` perturbed copies.
    """
    _check_image_maps(image, maps)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    b, c, h, w = image.shape
    n = h * w
    k = int(math.floor(fraction * n + 0.5))
    flat = maps.reshape(b, -1, n)
    order = torch.argsort(flat, dim=-1, descending=positive, stable=True)
    removed = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order[..., :k], True)  # [B, P, N]
    pixels = image.reshape(b, 1, c, n).expand(-1, flat.shape[1], -1, -1)
    fill_t = _fill_tensor(fill, c, image)
    out = torch.where(removed[:, :, None, :], fill_t.expand(c, n), pixels)
    return out.reshape(b, flat.shape[1], c, h, w)


def perturbation_curve(
    model: Any,
    image: torch.Tensor,
    text_embedding: torch.Tensor | None = None,
    maps: torch.Tensor | None = None,
    *,
    target: Any = None,
    positive: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    fill: float | torch.Tensor = 0.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """The model's score of each map's prompt or class as pixels are removed in order of relevance.

    For each (image b, prompt p) and fraction f, with ``x' = perturb(x_b, map_bp, f)``: the image-text
    similarity ``cos(encode_image(x'), t_p)``, or for an image classifier (``target=``) the target's
    logit ``model(x')[c_bp]`` of the model's own forward (not a softmax).

    Args:
        model: an OpenCLIP model / :class:`~legrad.LeWrapper` (its ``encode_image`` is used, so put it
            in eval mode) or a callable ``images [N, C, H, W] -> embeddings [N, D]``; with ``target``: an
            image classifier (or its wrapper, or a callable) whose forward gives logits ``[N, K]`` (or an
            output with ``.logits``, as transformers models return).
        image: ``[B, C, H, W]`` preprocessed images.
        text_embedding: ``[P, D]`` or ``[B, P, D]`` normalised prompt embeddings (None with ``target``).
        maps: ``[B, P, H, W]`` relevance maps of those prompts or classes.
        target: class indices ``[P]`` / ``[B, P]`` (an int, ints or a LongTensor, checked as
            :meth:`~legrad.LeWrapper.compute_legrad` checks them) instead of ``text_embedding``.
        positive: remove the most relevant pixels first (else the least relevant).
        fractions: increasing fractions of removed pixels (default 0, 0.1, ..., 0.9).
        fill: replacement value, see :func:`perturb`.
        batch_size: perturbed images per forward pass.

    Returns:
        ``[B, P, F]`` float64 cosine similarities (or target logits).

    Raises:
        TypeError, ValueError: on invalid inputs, before any forward pass (a class index beyond the
            logits of a model whose class count is not known up front: after the first one).
    """
    if maps is None:
        raise ValueError("maps is required: the [B, P, H, W] relevance maps to perturb by")
    _check_image_maps(image, maps)
    b, p = maps.shape[:2]
    if target is not None:
        if text_embedding is not None:
            raise TypeError("give text_embedding (CLIP-style models) or target (image classifiers), not both")
        forward, score = class_scorer(model, target, b, p)
    else:
        forward, score = text_scorer(model, text_embedding, b, p, image.device)
    fr = check_fractions(fractions)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _fill_tensor(fill, image.shape[1], image)
    if getattr(model, "training", False):
        warnings.warn("perturbation_curve: the model is in train mode; call model.eval() for deterministic scores",
                      stacklevel=2)

    out = torch.empty(b, p, len(fr), dtype=torch.float64)
    with torch.no_grad():
        pending: list[torch.Tensor] = []
        where: list[tuple[int, int, int]] = []

        def flush() -> None:
            scores = score(forward(torch.cat(pending)), where)
            for (bi, pi, fi), value in zip(where, scores.cpu().unbind()):
                out[bi, pi, fi] = value
            pending.clear()
            where.clear()

        # Every (image, prompt, fraction) perturbation, scored in forward passes of batch_size images.
        for f_idx, frac in enumerate(fr):
            batch = perturb(image, maps.to(image.device), frac, positive=positive, fill=fill)  # [B, P, C, H, W]
            for bi in range(b):
                for pi in range(p):
                    pending.append(batch[bi, pi][None])
                    where.append((bi, pi, f_idx))
                    if len(pending) == batch_size:
                        flush()
        if pending:
            flush()
    return out


def perturbation_auc(curve: torch.Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> torch.Tensor:
    """Trapezoidal area under perturbation curves ``[..., F]`` over the removed fraction.

    With the default fractions the x-range is 0..0.9, so a constant score ``y`` gives ``0.9 * y``.

    Returns:
        ``[...]`` float64.
    """
    fr = check_fractions(fractions)
    if not isinstance(curve, torch.Tensor) or curve.shape[-1] != len(fr):
        raise ValueError(f"curve must be a tensor [..., {len(fr)}] (one value per fraction)")
    y = curve.double()
    x = torch.tensor(fr, dtype=torch.float64, device=y.device)
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * (x[1:] - x[:-1])).sum(-1)

"""Localization benchmark: every explainability method x every metric, as plain numbers and a Markdown table.

Data come from :mod:`legrad.eval.datasets` (the bundled synthetic scenes or a user folder), the methods
from the registry :data:`legrad.methods.METHODS`, the scores from :mod:`legrad.eval.metrics`: pointing game (mean over
pairs), mIoU and pixel accuracy of the maps binarised at ``threshold`` (counts summed over the dataset,
then IoU), and the AUCs of the positive and negative perturbation curves (pixels replaced by the
dataset mean, i.e. 0 after normalisation, 0..90 % in 10 % steps, scored by the image-text cosine
similarity, or for an image classifier by the target class's logit).

Image classifiers (timm, torchvision, transformers ViTs) are benchmarked on class targets: each
sample's prompts are class indices or class names, resolved by the ``labels`` given in the tokenizer's
place (:class:`~legrad.frontend.classifier_models.ClassLabels`, the third item of ``load_model``; with
None, the prompts must be class indices).

Python: :func:`evaluate` then :func:`format_table`; command line: ``legrad bench`` (:mod:`legrad.cli.bench`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..engine.validation import check_targets
from ..methods.base import Method
from ..methods.registry import METHODS, make_method, method_class
from ..methods.targets import is_classifier
from ..wrapper import LeWrapper
from .datasets import Sample
from .metrics import (
    DEFAULT_FRACTIONS,
    check_fractions,
    check_threshold,
    check_tolerance,
    confusion,
    miou_from_confusion,
    perturbation_auc,
    perturbation_curve,
    pixel_accuracy_from_confusion,
    pointing_game,
)

__all__ = ["MethodResult", "class_targets", "evaluate", "format_table"]

logger = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """Accumulated scores of one method."""

    hits: list[float] = field(default_factory=list)
    counts: Any = None  # [4] (TP, FP, FN, TN) summed over pairs
    pos_auc: list[float] = field(default_factory=list)
    neg_auc: list[float] = field(default_factory=list)
    pos_curve: Any = None  # [F] sum over pairs
    neg_curve: Any = None
    seconds: float = 0.0
    images: int = 0
    error: str | None = None

    def summary(self, fractions: Sequence[float]) -> dict[str, Any]:
        """Means and dataset-level scores as plain numbers (NaN where not measured)."""
        valid = [h for h in self.hits if not math.isnan(h)]
        n_pairs = len(self.hits)
        out: dict[str, Any] = {
            "pairs": n_pairs,
            "pointing_game": sum(valid) / len(valid) if valid else math.nan,
            "miou": float(miou_from_confusion(self.counts)) if self.counts is not None else math.nan,
            "pixel_accuracy": float(pixel_accuracy_from_confusion(self.counts)) if self.counts is not None else math.nan,
            "pos_auc": sum(self.pos_auc) / len(self.pos_auc) if self.pos_auc else math.nan,
            "neg_auc": sum(self.neg_auc) / len(self.neg_auc) if self.neg_auc else math.nan,
            "seconds_per_image": self.seconds / self.images if self.images else math.nan,
        }
        if self.pos_curve is not None and self.pos_auc:
            out["pos_curve"] = {f"{f:g}": float(v) / len(self.pos_auc) for f, v in zip(fractions, self.pos_curve)}
            out["neg_curve"] = {f"{f:g}": float(v) / len(self.neg_auc) for f, v in zip(fractions, self.neg_curve)}
        if self.error:
            out["error"] = self.error
        return out


def evaluate(
    model: Any,
    tokenizer: Callable | None,
    samples: Sequence[Sample],
    methods: Sequence[str] | None = None,
    *,
    layer_index: int = -2,
    threshold: float | str = 0.5,
    pointing_tolerance: int = 0,
    perturbation: bool = True,
    fractions: Sequence[float] | None = None,
    fill: float = 0.0,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Scores every method on every (image, prompt, mask) of ``samples``.

    Args:
        model: OpenCLIP model or ViT image classifier (or a :class:`~legrad.LeWrapper`) in eval mode, on
            ``device``.
        tokenizer: list of str -> token tensor, for ``model.encode_text``; for a classifier, list of str ->
            ``[P]`` class indices (its ``ClassLabels``), or None when the prompts are class indices.
        samples: sequence of :class:`Sample` (e.g. :class:`ToyScenes`, :class:`FolderDataset`).
        methods: names in the registry :data:`legrad.methods.METHODS`, or ``"name@K"`` (see
            :func:`legrad.methods.registry.method_class`); default: all.
        layer_index: LeGrad's first explained block.
        threshold: binarisation threshold for mIoU / pixel accuracy (a number or ``"mean"``).
        pointing_tolerance: pointing-game tolerance in pixels (0: the maximum must be inside the mask).
        perturbation: also compute the perturbation curves (the slow part).
        fractions: removed-pixel fractions (default 0, 0.1, ..., 0.9).
        fill: replacement value of removed pixels in the preprocessed space (0 = the dataset mean).
        batch_size: images per forward pass in the perturbation test.
        device: where the images and text go.
        progress: show a tqdm progress bar (on stderr).

    Returns:
        ``{method: summary}`` with ``pointing_game``, ``miou``, ``pixel_accuracy`` (fractions in [0, 1]),
        ``pos_auc``, ``neg_auc``, ``seconds_per_image``, ``pairs`` and the mean curves. A method that
        cannot run on this model (e.g. no traced forward) gets NaNs and an ``error`` entry.

    Raises:
        ValueError, TypeError: for unknown method names, an empty sample set, bad options or (classifiers)
            prompts that are not classes of the model, before any work where the samples can list their
            prompts up front (:meth:`FolderDataset.prompt_lists`), else at the sample.
    """
    names = list(methods) if methods is not None else list(METHODS)
    for name in names:
        method_class(name)  # unknown names fail before any work
    if len(samples) == 0:
        raise ValueError("no samples to evaluate")
    fr = tuple(check_fractions(DEFAULT_FRACTIONS if fractions is None else fractions))
    check_threshold(threshold)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_tolerance(pointing_tolerance)
    wrapper = _own_wrapper(model, layer_index, tokenizer)
    classifier = is_classifier(wrapper.adapter)
    if classifier:
        listed = samples.prompt_lists() if hasattr(samples, "prompt_lists") else []
        for where, prompts in listed:  # resolve every class up front: a bad one fails before any work
            class_targets(tokenizer, prompts, wrapper.adapter.num_classes, where)
    results = {name: MethodResult() for name in names}
    # Each method bound once to our wrapper (no re-wrapping, no drift guard per call).
    fns = {name: make_method(name, wrapper) for name in names}
    scoring = _Scoring(threshold, pointing_tolerance, perturbation, fr, fill, batch_size)
    indices: Any = range(len(samples))
    if progress:
        indices = tqdm(indices, desc="legrad bench", unit="image", file=sys.stderr)
    for i in indices:
        sample = samples[i]
        image = sample.image[None].to(device)
        masks = sample.masks.to(device)
        if classifier:
            text, target = None, class_targets(tokenizer, sample.prompts, wrapper.adapter.num_classes, sample.name)
        else:
            with torch.no_grad():
                text, target = wrapper.encode_text(tokenizer(sample.prompts).to(device), normalize=True).float(), None
        for name, fn in fns.items():
            if not results[name].error:
                _run_method(name, fn, results[name], wrapper, image, masks, text, target, scoring)
    return {name: res.summary(fr) for name, res in results.items()}


def _own_wrapper(model: Any, layer_index: int, tokenizer: Callable | None) -> LeWrapper:
    """A wrapper of our own: setting ``layer_index`` on the caller's wrapper would change their object. The
    tokenizer lets towers that need the empty-prompt correction (SigLIP-style) build it."""
    if isinstance(model, LeWrapper):
        return LeWrapper(model.model, layer_index=layer_index, tokenizer=tokenizer,
                         apply_correction=model.apply_correction, correction_threshold=model.correction_threshold)
    return LeWrapper(model, layer_index=layer_index, tokenizer=tokenizer)


@dataclass(frozen=True)
class _Scoring:
    threshold: float | str
    pointing_tolerance: int
    perturbation: bool
    fractions: tuple[float, ...]
    fill: float
    batch_size: int


def _run_method(name: str, fn: Method, res: MethodResult, wrapper: LeWrapper, image: torch.Tensor,
                masks: torch.Tensor, text: torch.Tensor | None, target: torch.Tensor | None, sc: _Scoring) -> None:
    """One method on one image ``[1, 3, H, W]`` with its masks ``[P, H, W]``: the maps, then their scores."""
    t0 = time.perf_counter()
    try:
        maps = fn.attribute(image, target=target if target is not None else text)
    except NotImplementedError as exc:  # [1, P, H, W] above; a method this model cannot run
        res.error = str(exc)
        logger.warning("%s skipped: %s", name, exc)
        return
    res.seconds += time.perf_counter() - t0
    res.images += 1
    res.hits.extend(pointing_game(maps[0], masks, sc.pointing_tolerance).tolist())
    counts = confusion(maps[0], masks, sc.threshold).sum(0)
    res.counts = counts if res.counts is None else res.counts + counts
    if not sc.perturbation:
        return
    for positive, aucs in ((True, res.pos_auc), (False, res.neg_auc)):
        curve = perturbation_curve(wrapper, image, text, maps, target=target, positive=positive,
                                   fractions=sc.fractions, fill=sc.fill, batch_size=sc.batch_size)[0]  # [P, F]
        aucs.extend(perturbation_auc(curve, sc.fractions).tolist())
        total = curve.sum(0)
        if positive:
            res.pos_curve = total if res.pos_curve is None else res.pos_curve + total
        else:
            res.neg_curve = total if res.neg_curve is None else res.neg_curve + total


def class_targets(labels: Callable | None, prompts: Sequence[str], num_classes: int, where: str) -> Any:
    """A sample's prompts as class indices ``[P]`` of a classifier.

    Args:
        labels: prompts -> class indices (e.g. :class:`~legrad.frontend.classifier_models.ClassLabels`,
            which takes indices and class names), or None (the prompts must then be class indices).
        prompts: the sample's prompts.
        num_classes: the model's class count.
        where: the sample's name, for messages.

    Returns:
        ``[P]`` LongTensor, checked by :func:`legrad.engine.validation.check_targets`.

    Raises:
        ValueError, TypeError: naming the sample and the prompt that is not a class of the model.
    """
    try:
        if labels is None:
            bad = [p for p in prompts if not str(p).strip().lstrip("+-").isdigit()]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a class index; pass the model's class labels (the third item "
                                 "of load_model) to resolve class names")
            target = [int(p) for p in prompts]
        else:
            target = labels(list(prompts))
        return check_targets(target, 1, num_classes)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


_COLUMNS = (
    ("pointing_game", "pointing game ↑", True),
    ("miou", "mIoU ↑", True),
    ("pixel_accuracy", "pixel acc. ↑", True),
    ("pos_auc", "pos. AUC ↓", False),
    ("neg_auc", "neg. AUC ↑", False),
    ("seconds_per_image", "s / image", False),
)


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown table of :func:`evaluate`'s output: percentages for the localization scores."""
    head = "| method | " + " | ".join(label for _, label, _ in _COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(_COLUMNS)
    lines = [head, rule]
    for name, s in summaries.items():
        cells = []
        for key, _, percent in _COLUMNS:
            v = s.get(key, math.nan)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("n/a")
            elif percent:
                cells.append(f"{100 * v:.1f}")
            elif key == "seconds_per_image":
                cells.append(f"{v:.3f}")
            else:
                cells.append(f"{v:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""What ``legrad bench`` does once its arguments are parsed (imported by :func:`legrad.cli.bench.run`, so that
``legrad --help`` loads no torch): check the methods, load the model and the samples, evaluate, print the
table and write the JSON results."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..eval.benchmark import evaluate, format_table
from ..eval.datasets import FolderDataset, ToyScenes
from ..frontend.classifier_models import is_classifier_name
from ..frontend.models import load_model, model_layer_index, native_image_size
from ..io.errors import ImageLoadError, ModelLoadError
from ..io.files import atomic_writer
from ..methods.registry import METHODS, method_class
from .bench import DEFAULT_TOY_LIMIT
from .options import Stop

__all__ = ["run"]

PROG = "legrad bench"


def _methods(args: argparse.Namespace) -> list[str]:
    methods = args.methods or list(METHODS)
    for m in methods:
        try:
            method_class(m)
        except ValueError as exc:
            raise Stop(str(exc), 2) from None
    if is_classifier_name(args.model) and not args.data:
        raise Stop("an image classifier is benchmarked on class targets: give --data DIR, a dataset whose prompts "
                   "are class indices or names (the synthetic scenes are for the CLIP demo model)", 2)
    return methods


def _samples(args: argparse.Namespace, model: Any, preprocess: Any) -> Any:
    """The user's dataset (``--data``) or the synthetic scenes at the model's input size."""
    try:
        if args.data:
            samples: Any = FolderDataset(args.data, preprocess, args.annotations)
            if args.limit:
                samples.entries = samples.entries[: args.limit]
            return samples
        h, w = native_image_size(model)
        if h != w:
            raise Stop(f"synthetic scenes are square; the model expects {h}x{w} (use --data)", 2)
        return ToyScenes(args.limit or DEFAULT_TOY_LIMIT, args.seed, preprocess, h)
    except (FileNotFoundError, ValueError) as exc:
        raise Stop(str(exc), 1) from None


def _strict_json(obj: Any) -> Any:
    """NaN (not measured) -> null, so that the file is standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _write_json(path: Path, config: dict[str, Any], summaries: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_strict_json({"config": config, "methods": summaries}), indent=2, allow_nan=False) + "\n"
    with atomic_writer(path) as fh:
        fh.write(text.encode("utf-8"))


def _benchmark(args: argparse.Namespace) -> int:
    methods = _methods(args)
    classifier = is_classifier_name(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, preprocess, tokenizer = load_model(args.model, args.pretrained, args.device)
    except (ModelLoadError, ValueError) as exc:
        raise Stop(str(exc), 1) from None
    device = str(next(model.parameters()).device)
    layer_index = args.layer_index if args.layer_index is not None else model_layer_index(model, args.model)
    samples = _samples(args, model, preprocess)
    t0 = time.perf_counter()
    try:
        summaries = evaluate(model, tokenizer, samples, methods, layer_index=layer_index, threshold=args.threshold,
                             pointing_tolerance=args.pointing_tolerance, perturbation=not args.no_perturbation,
                             batch_size=args.batch_size, device=device, progress=not args.no_progress)
    except (ImageLoadError, ValueError, TypeError) as exc:
        raise Stop(str(exc), 1) from None
    elapsed = time.perf_counter() - t0
    pairs = next(iter(summaries.values()))["pairs"]
    pretrained = args.pretrained or ("bundled" if args.model == "toy" else "default")
    kind = "class" if classifier else "prompt"
    print(f"{samples.describe()}, {pairs} (image, {kind}, mask) pairs; model {args.model} ({pretrained}), "
          f"layer_index {layer_index}, threshold {args.threshold}, pointing tolerance {args.pointing_tolerance} px, "
          f"{elapsed:.0f} s\n")
    print(format_table(summaries))
    if args.json and args.json != "-":
        config = {
            "data": args.data or "synthetic", "model": args.model, "pretrained": args.pretrained,
            "layer_index": layer_index, "images": len(samples), "pairs": pairs, "seed": None if args.data else args.seed,
            "threshold": args.threshold, "pointing_tolerance": args.pointing_tolerance,
            "perturbation": not args.no_perturbation, "device": device,
            "perturbation_score": "target logit" if classifier else "image-text cosine",
            "seconds": round(elapsed, 1),
        }
        out = Path(args.json)
        _write_json(out, config, summaries)
        print(f"\nresults written to {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark from parsed arguments; prints the table, writes JSON. Returns the exit status
    (0 ok, 1 failed, 2 usage error)."""
    try:
        return _benchmark(args)
    except Stop as stop:
        print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.code

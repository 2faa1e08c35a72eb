"""Localization benchmark: every explainability method x every metric, as a Markdown table and JSON.

Data:

* the bundled synthetic scenes (default, offline): fresh scenes from :func:`legrad.toy.make_scenes`
  drawn at the model's input size, one (prompt, mask) pair per object, on the bundled demo model;
* a user dataset (``--data DIR``): images, one binary mask per object, and a JSON file of prompts::

      DIR/prompts.json
      [
        {"image": "images/0001.jpg",
         "masks": [{"mask": "masks/0001_dog.png", "prompt": "a photo of a dog"},
                   {"mask": "masks/0001_ball.png", "prompt": "a red ball"}]},
        ...
      ]

  Paths are relative to ``DIR``. A mask is any image file of the image's size whose non-zero pixels
  are the object. Images and masks go through the model's own preprocess (masks with the same
  resize/crop, re-binarised), so the maps are compared at the preprocessed resolution.

Metrics (:mod:`legrad.metrics`): pointing game (mean over pairs), mIoU and pixel accuracy of the maps
binarised at ``--threshold`` (counts summed over the dataset, then IoU), and the AUCs of the positive
and negative perturbation curves (pixels replaced by the dataset mean, i.e. 0 after normalisation,
0..90 % in 10 % steps, scored by the image-text cosine similarity).

Command line: ``legrad bench`` (or ``python bench/localization.py``); Python: :func:`evaluate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legrad.commands.argtypes import non_negative_int, positive_int

__all__ = [
    "DEFAULT_SEED",
    "FolderDataset",
    "MethodResult",
    "Sample",
    "ToyScenes",
    "add_parser",
    "evaluate",
    "format_table",
    "main",
    "preprocess_mask",
    "run",
]

logger = logging.getLogger(__name__)

#: Seed of the default synthetic scenes (not used to train or tune the demo model).
DEFAULT_SEED = 2025
#: Default number of synthetic scenes (a few minutes on 2 CPU cores).
DEFAULT_TOY_LIMIT = 100


@dataclass
class Sample:
    """One image with its prompts and their masks, already preprocessed.

    Attributes:
        name: identifier used in messages.
        image: ``[3, H, W]`` preprocessed image.
        prompts: ``P`` prompts.
        masks: ``[P, H, W]`` bool masks aligned with ``image``.
    """

    name: str
    image: Any
    prompts: list[str]
    masks: Any


def preprocess_mask(preprocess: Callable, mask: Any) -> Any:
    """Applies an image preprocess's geometry (resize, crop, pad) to a boolean mask.

    The mask is drawn as a black/white RGB image and passed through ``preprocess`` itself; black and
    white reference images give the per-channel values of "off" and "on", and the mask is the
    interpolated value's side of their midpoint. This needs only a preprocess that is geometric
    plus a per-channel affine normalisation (OpenCLIP's are).

    Args:
        preprocess: PIL image -> ``[3, H, W]`` tensor.
        mask: ``[h, w]`` bool numpy array (or anything ``numpy.asarray`` accepts).

    Returns:
        ``[H, W]`` bool tensor.
    """
    import numpy as np
    from PIL import Image

    arr = np.asarray(mask).astype(bool)
    img = Image.fromarray(np.where(arr, 255, 0).astype(np.uint8), mode="L").convert("RGB")
    on = preprocess(Image.new("RGB", img.size, (255, 255, 255)))[0]
    off = preprocess(Image.new("RGB", img.size, (0, 0, 0)))[0]
    got = preprocess(img)[0]
    # Padding (resize_mode "longest") fills with black: outside the mask, as it should be.
    mid = 0.5 * (on.max() + off.min())
    return got > mid if on.max() > off.min() else got < mid


class ToyScenes:
    """Fresh synthetic scenes (:mod:`legrad.toy`) as benchmark samples, drawn at the model's input size.

    Args:
        n: number of scenes.
        seed: scene seed.
        preprocess: the model's image preprocess.
        size: scene side in pixels (the model's input size).
    """

    def __init__(self, n: int, seed: int, preprocess: Callable, size: int):
        from legrad.toy import make_scenes

        self._scenes = make_scenes(n, seed=seed, size=size)
        self._preprocess = preprocess
        self.seed = seed

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, i: int) -> Sample:
        import torch

        scene = self._scenes[i]
        masks = torch.stack([preprocess_mask(self._preprocess, o.mask) for o in scene.objects])
        return Sample(f"scene {i}", self._preprocess(scene.image), [o.phrase for o in scene.objects], masks)

    def describe(self) -> str:
        return f"{len(self)} synthetic scenes (legrad.toy.make_scenes, seed {self.seed})"


class FolderDataset:
    """A user dataset: a folder of images and masks with a JSON file of prompts (format in the module doc).

    The JSON is read and checked up front; images and masks are read when a sample is requested.

    Args:
        root: dataset folder.
        preprocess: the model's image preprocess.
        annotations: JSON file (relative to ``root`` unless absolute).

    Raises:
        FileNotFoundError: if the folder or the JSON file is missing.
        ValueError: naming the entry and the problem for a malformed JSON file or a missing file.
    """

    def __init__(self, root: str | os.PathLike, preprocess: Callable, annotations: str = "prompts.json"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} not found")
        path = Path(annotations)
        path = path if path.is_absolute() else self.root / path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the dataset needs a JSON file of prompts (see `legrad bench --help`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "images" in data:
            data = data["images"]
        if not isinstance(data, list) or not data:
            raise ValueError(f"{path} must hold a non-empty list of {{'image': ..., 'masks': [...]}} entries")
        self.entries: list[tuple[Path, list[tuple[Path, str]]]] = []
        for i, entry in enumerate(data):
            where = f"{path.name} entry {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise ValueError(f"{where}: expected an object with an 'image' path")
            masks = entry.get("masks")
            if not isinstance(masks, list) or not masks:
                raise ValueError(f"{where}: 'masks' must be a non-empty list of {{'mask': path, 'prompt': text}}")
            image = self.root / entry["image"]
            if not image.is_file():
                raise ValueError(f"{where}: image {image} not found")
            pairs = []
            for j, m in enumerate(masks):
                if not isinstance(m, dict) or not isinstance(m.get("mask"), str) or not isinstance(m.get("prompt"), str):
                    raise ValueError(f"{where}, mask {j}: expected {{'mask': path, 'prompt': text}}")
                if not m["prompt"].strip():
                    raise ValueError(f"{where}, mask {j}: empty prompt")
                mask = self.root / m["mask"]
                if not mask.is_file():
                    raise ValueError(f"{where}, mask {j}: {mask} not found")
                pairs.append((mask, m["prompt"]))
            self.entries.append((image, pairs))
        self._preprocess = preprocess

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Sample:
        import numpy as np
        import torch
        from PIL import Image

        from legrad.loading import load_image

        image_path, pairs = self.entries[i]
        image = load_image(image_path)
        masks = []
        for mask_path, _ in pairs:
            with Image.open(mask_path) as im:
                arr = np.asarray(im.convert("L")) > 0
            if arr.shape != (image.height, image.width):
                raise ValueError(
                    f"mask {mask_path} is {arr.shape[1]}x{arr.shape[0]} but image {image_path} is "
                    f"{image.width}x{image.height}; masks must have their image's size"
                )
            masks.append(preprocess_mask(self._preprocess, arr))
        name = str(image_path.relative_to(self.root))
        return Sample(name, self._preprocess(image), [p for _, p in pairs], torch.stack(masks))

    def describe(self) -> str:
        return f"{len(self)} images from {self.root}"


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
        from legrad.metrics import miou_from_confusion, pixel_accuracy_from_confusion

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
    tokenizer: Callable,
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
        model: OpenCLIP model (or :class:`~legrad.LeWrapper`) in eval mode, on ``device``.
        tokenizer: list of str -> token tensor, for ``model.encode_text``.
        samples: sequence of :class:`Sample` (e.g. :class:`ToyScenes`, :class:`FolderDataset`).
        methods: names in :data:`legrad.baselines.METHODS`, or ``"name@K"`` (see
            :func:`legrad.baselines.get_method`); default: all.
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
        ValueError, TypeError: for unknown method names, an empty sample set or bad options, before any work.
    """
    import torch

    from legrad import LeWrapper
    from legrad.baselines import get_method
    from legrad.metrics import (
        DEFAULT_FRACTIONS,
        check_fractions,
        check_threshold,
        check_tolerance,
        confusion,
        perturbation_auc,
        perturbation_curve,
        pointing_game,
    )

    names = list(methods) if methods is not None else _all_methods()
    fns = {name: get_method(name) for name in names}
    if len(samples) == 0:
        raise ValueError("no samples to evaluate")
    fr = tuple(check_fractions(DEFAULT_FRACTIONS if fractions is None else fractions))
    check_threshold(threshold)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_tolerance(pointing_tolerance)
    # A wrapper of our own: setting layer_index on the caller's wrapper would change their object. The
    # tokenizer lets towers that need the empty-prompt correction (SigLIP-style) build it.
    if isinstance(model, LeWrapper):
        wrapper = LeWrapper(model.model, layer_index=layer_index, tokenizer=tokenizer,
                            apply_correction=model.apply_correction, correction_threshold=model.correction_threshold)
    else:
        wrapper = LeWrapper(model, layer_index=layer_index, tokenizer=tokenizer)
    results = {name: MethodResult() for name in names}

    indices: Any = range(len(samples))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="legrad bench", unit="image", file=sys.stderr)
    for i in indices:
        sample = samples[i]
        image = sample.image[None].to(device)
        masks = sample.masks.to(device)
        with torch.no_grad():
            text = wrapper.encode_text(tokenizer(sample.prompts).to(device), normalize=True).float()
        for name, fn in fns.items():
            res = results[name]
            if res.error:
                continue
            t0 = time.perf_counter()
            try:
                maps = fn(wrapper, text, image)  # [1, P, H, W]
            except NotImplementedError as exc:
                res.error = str(exc)
                logger.warning("%s skipped: %s", name, exc)
                continue
            res.seconds += time.perf_counter() - t0
            res.images += 1
            res.hits.extend(pointing_game(maps[0], masks, pointing_tolerance).tolist())
            counts = confusion(maps[0], masks, threshold).sum(0)
            res.counts = counts if res.counts is None else res.counts + counts
            if perturbation:
                for positive, aucs in ((True, res.pos_auc), (False, res.neg_auc)):
                    curve = perturbation_curve(wrapper, image, text, maps, positive=positive, fractions=fr,
                                               fill=fill, batch_size=batch_size)[0]  # [P, F]
                    aucs.extend(perturbation_auc(curve, fr).tolist())
                    total = curve.sum(0)
                    if positive:
                        res.pos_curve = total if res.pos_curve is None else res.pos_curve + total
                    else:
                        res.neg_curve = total if res.neg_curve is None else res.neg_curve + total
    return {name: res.summary(fr) for name, res in results.items()}


def _all_methods() -> list[str]:
    from legrad.baselines import METHODS

    return list(METHODS)


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


# ----------------------------------------------------------------------------- command line
_EPILOG = """\
examples:
  legrad bench                                   # bundled demo model, 100 fresh synthetic scenes
  legrad bench --limit 20 --methods legrad rollout --no-perturbation
  legrad bench --data my_dataset --model ViT-B-16 --pretrained laion2b_s34b_b88k --device cuda

user dataset (--data DIR): DIR/prompts.json lists the images with one binary mask (non-zero pixels =
object, same size as the image) and one prompt per mask, paths relative to DIR:
  [{"image": "images/0001.jpg",
    "masks": [{"mask": "masks/0001_dog.png", "prompt": "a photo of a dog"}]}, ...]

Prints a Markdown table (percentages; AUCs of the image-text cosine similarity over 0..0.9 of the
pixels removed) and writes the full results, mean curves included, as JSON.
"""


def _threshold(text: str) -> float | str:
    if text.strip().lower() == "mean":
        return "mean"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'mean', got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``legrad bench``."""
    p = subparsers.add_parser(
        "bench",
        help="compare LeGrad with baseline explainability methods on localization metrics",
        description="Method x metric table (pointing game, mIoU, pixel accuracy, perturbation AUCs) for LeGrad "
        "and the baselines (raw attention, rollout, GradCAM, CheferCAM) on synthetic scenes or your dataset.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", help="user dataset folder (default: bundled synthetic scenes)")
    p.add_argument("--annotations", default="prompts.json", metavar="FILE",
                   help="prompts JSON inside DIR (default: prompts.json)")
    p.add_argument("--model", default="toy", help="'toy' (bundled demo model, default) or an OpenCLIP model name")
    p.add_argument("--pretrained", default=None,
                   help="OpenCLIP pretrained tag or checkpoint path ('none': random weights)")
    p.add_argument("--layer-index", type=int, default=None,
                   help="LeGrad's first explained block (default: the demo model's tuned value, else -2)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="methods to compare (default: all of legrad raw_attention rollout gradcam chefercam); "
                   "legrad@K, rollout@K, chefercam@K start at block K")
    p.add_argument("--limit", type=positive_int, default=None,
                   help=f"number of images (default: {DEFAULT_TOY_LIMIT} synthetic scenes, or the whole dataset)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the synthetic scenes")
    p.add_argument("--threshold", type=_threshold, default=0.5,
                   help="binarisation threshold for mIoU/pixel accuracy, or 'mean' (default: 0.5)")
    p.add_argument("--pointing-tolerance", type=non_negative_int, default=0, metavar="PX",
                   help="pointing game: also a hit within PX pixels of the mask (default: 0, strictly inside)")
    p.add_argument("--no-perturbation", action="store_true", help="skip the perturbation test (much faster)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward in the perturbation test")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=os.path.join("outputs", "bench_localization.json"), metavar="PATH",
                   help="where to write the results (default: outputs/bench_localization.json; '-' to skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark from parsed arguments; prints the table, writes JSON. Returns the exit status."""
    import torch

    from legrad.baselines import METHODS, get_method
    from legrad.loading import (
        ImageLoadError,
        ModelLoadError,
        default_layer_index,
        load_model,
        native_image_size,
    )

    methods = args.methods or list(METHODS)
    for m in methods:
        try:
            get_method(m)
        except ValueError as exc:
            print(f"legrad bench: {exc}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, preprocess, tokenizer = load_model(args.model, args.pretrained, args.device)
    except (ModelLoadError, ValueError) as exc:
        print(f"legrad bench: {exc}", file=sys.stderr)
        return 1
    device = str(next(model.parameters()).device)
    layer_index = args.layer_index if args.layer_index is not None else default_layer_index(args.model)
    try:
        if args.data:
            samples: Any = FolderDataset(args.data, preprocess, args.annotations)
            if args.limit:
                samples.entries = samples.entries[: args.limit]
        else:
            h, w = native_image_size(model)
            if h != w:
                print(f"legrad bench: synthetic scenes are square; the model expects {h}x{w} (use --data)",
                      file=sys.stderr)
                return 2
            samples = ToyScenes(args.limit or DEFAULT_TOY_LIMIT, args.seed, preprocess, h)
    except (FileNotFoundError, ValueError) as exc:
        print(f"legrad bench: {exc}", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    try:
        summaries = evaluate(
            model, tokenizer, samples, methods, layer_index=layer_index, threshold=args.threshold,
            pointing_tolerance=args.pointing_tolerance, perturbation=not args.no_perturbation,
            batch_size=args.batch_size, device=device,
            progress=not args.no_progress,
        )
    except (ImageLoadError, ValueError) as exc:
        print(f"legrad bench: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    pairs = next(iter(summaries.values()))["pairs"]
    pretrained = args.pretrained or ("bundled" if args.model == "toy" else "default")
    print(f"{samples.describe()}, {pairs} (image, prompt, mask) pairs; model {args.model} ({pretrained}), "
          f"layer_index {layer_index}, threshold {args.threshold}, pointing tolerance {args.pointing_tolerance} px, "
          f"{elapsed:.0f} s\n")
    print(format_table(summaries))
    if args.json and args.json != "-":
        payload = {
            "config": {
                "data": args.data or "synthetic", "model": args.model, "pretrained": args.pretrained,
                "layer_index": layer_index, "images": len(samples), "pairs": pairs, "seed": None if args.data else args.seed,
                "threshold": args.threshold, "pointing_tolerance": args.pointing_tolerance,
                "perturbation": not args.no_perturbation, "device": device,
                "seconds": round(elapsed, 1),
            },
            "methods": summaries,
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(_strict_json(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        tmp.replace(out)
        print(f"\nresults written to {out}")
    return 0


def _strict_json(obj: Any) -> Any:
    """NaN (not measured) -> null, so that the file is standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """``legrad bench`` as a standalone program (``python -m legrad.benchmark`` / ``bench/localization.py``)."""
    parser = argparse.ArgumentParser(prog="legrad bench", description=__doc__.splitlines()[0], epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

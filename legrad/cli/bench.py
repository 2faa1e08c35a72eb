"""Localization benchmark: every explainability method x every metric, as a Markdown table and JSON.

``legrad bench`` (also ``python bench/localization.py``, :func:`main`): the command line of
:func:`legrad.eval.benchmark.evaluate`. Data: the bundled synthetic scenes (default, offline: fresh
scenes from :func:`legrad.toy.make_scenes` drawn at the model's input size, one (prompt, mask) pair per
object, on the bundled demo model) or a user dataset (``--data DIR``, format in
:mod:`legrad.eval.datasets`). Image classifiers (``--model timm:NAME`` / ``torchvision:NAME`` /
``hf:REPO_OR_DIR``) need a user dataset whose prompts are class indices or class names. Metrics:
:mod:`legrad.eval.metrics`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from legrad.cli.options import non_negative_int, positive_int
from legrad.eval.datasets import DEFAULT_SEED

__all__ = ["DEFAULT_TOY_LIMIT", "add_parser", "main", "run"]

#: Default number of synthetic scenes (a few minutes on 2 CPU cores).
DEFAULT_TOY_LIMIT = 100

# ----------------------------------------------------------------------------- command line
_EPILOG = """\
examples:
  legrad bench                                   # bundled demo model, 100 fresh synthetic scenes
  legrad bench --limit 20 --methods legrad rollout --no-perturbation
  legrad bench --data my_dataset --model ViT-B-16 --pretrained laion2b_s34b_b88k --device cuda
  legrad bench --data my_classes --model timm:vit_base_patch16_224.augreg_in1k   # an image classifier

user dataset (--data DIR): DIR/prompts.json lists the images with one binary mask (non-zero pixels =
object, same size as the image) and one prompt per mask, paths relative to DIR:
  [{"image": "images/0001.jpg",
    "masks": [{"mask": "masks/0001_dog.png", "prompt": "a photo of a dog"}]}, ...]

For an image classifier each prompt is a class: an index ("prompt": 281) or a class name of the model
("prompt": "tabby"); "class" may be written instead of "prompt".

Prints a Markdown table (percentages; AUCs of the image-text cosine similarity, or of the target
class's logit for a classifier, over 0..0.9 of the pixels removed) and writes the full results, mean
curves included, as JSON.
"""


def _threshold(text: str) -> float | str:
    """``'mean'`` or a number in (0, 1]: maps are min-max normalised to [0, 1] and binarised as
    ``map >= threshold``, so 0 (or less) marks every pixel, above 1 (or NaN) none, and every method
    would score the same."""
    if text.strip().lower() == "mean":
        return "mean"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'mean', got {text!r}") from None
    if not 0.0 < value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1] or 'mean', got {text!r} (maps lie in [0, 1]; outside (0, 1] every "
            "pixel or none is foreground, and every method scores the same)")
    return value


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
    p.add_argument("--data", "--dataset", metavar="DIR",
                   help="user dataset folder (default: bundled synthetic scenes; required for classifiers)")
    p.add_argument("--annotations", default="prompts.json", metavar="FILE",
                   help="prompts JSON inside DIR (default: prompts.json)")
    p.add_argument("--model", default="toy",
                   help="'toy' (bundled demo model, default), an OpenCLIP model name, or an image classifier "
                   "timm:NAME, torchvision:NAME, hf:REPO_OR_DIR")
    p.add_argument("--pretrained", default=None,
                   help="pretrained tag or checkpoint path ('none': random weights)")
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
    # The body loads torch and the models: imported here so that `legrad --help` stays fast.
    from legrad.cli.bench_run import run as run_bench

    return run_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``legrad bench`` as a standalone program (``python -m legrad.cli.bench`` / ``bench/localization.py``).

    Returns:
        The exit status (0 ok, 1 failed, 2 usage error).
    """
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

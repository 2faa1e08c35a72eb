"""What ``legrad explain`` does once its arguments are parsed (imported by :func:`legrad.cli.explain.run`, so
that ``legrad --help`` loads no torch): check the arguments, claim ``--out``, load the model, then the one
folder loop (:func:`legrad.frontend.loop.run_folder`) with this command's writer (:class:`Outputs`: an
overlay PNG, optionally the ``.npy`` map, and a ``scores.csv`` row per image and prompt). Local VLMs
(``--answer``) go through the same steps in :mod:`legrad.cli.vlm`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..frontend.classifier_models import is_classifier_name
from ..frontend.explainer import Explainer, clean_prompts, clean_targets
from ..frontend.loop import run_folder
from ..io import images
from ..io.errors import ModelLoadError
from ..io.outdir import FolderLock, write_in_folder
from ..methods.registry import method_class
from ..viz import colorize, overlay
from .explain import claim_output_folder, discover, prompt_name
from .options import Stop
from .scores import ScoresFile

__all__ = ["PROG", "Outputs", "check_colormap", "explain_items", "find_items", "run"]

PROG = "legrad explain"


class Outputs:
    """``OUT/``: one overlay (and with ``--save-maps`` one ``.npy`` map) per image and prompt, and ``scores.csv``.

    Args:
        args: the parsed command line (``out``, ``alpha``, ``colormap``, ``save_maps``).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out_dir = Path(args.out)
        self.lock = FolderLock(self.out_dir)
        self.scores: ScoresFile | None = None
        self.written = 0
        self.scores_failed = False

    def check(self) -> None:
        """Before any work: a file given as ``--out``, a read-only folder, a folder in use by another run or
        holding someone else's ``scores.csv`` are refused (exit status 2). A new folder is created only by
        :meth:`open`, once the model and settings are known to be good."""
        try:
            claim_output_folder(self.lock, self.out_dir, create=False)
            ScoresFile(self.out_dir / "scores.csv")
        except ValueError as exc:
            raise Stop(str(exc), 2) from None

    def open(self) -> None:
        """Creates and locks the folder; reads ``scores.csv`` again under the lock (earlier rows are kept)."""
        try:
            claim_output_folder(self.lock, self.out_dir, create=True)
            self.scores = ScoresFile(self.out_dir / "scores.csv")
        except ValueError as exc:
            raise Stop(str(exc), 2) from None

    def write(self, key: str, source: str, image: Any, labels: Sequence[str], names: Sequence[str], maps: Any,
              similarity: Sequence[float], probability: Sequence[float]) -> None:
        """One image's overlays ``OUT/<key>__<name>.png`` (maps ``[P, H, W]``) and their ``scores.csv`` rows."""
        for p, (name, label) in enumerate(zip(names, labels)):
            base = f"{key}__{name}"
            # Never through a link planted in OUT (a sub-folder link would send the overlay elsewhere). The map
            # first: the overlay marks the pair as done, so an interrupted run never leaves one without its map.
            if self.args.save_maps:
                with write_in_folder(self.out_dir, f"{base}.npy") as fh:
                    np.save(fh, maps[p].astype(np.float32))
            with write_in_folder(self.out_dir, f"{base}.png") as fh:
                overlay(image, maps[p], alpha=self.args.alpha, colormap=self.args.colormap).save(fh, "PNG")
            self.written += 1
            # Row per overlay as soon as it exists: scores.csv then describes every overlay.
            self.scores.add(source, label, float(similarity[p]), float(probability[p]), f"{base}.png")

    def flush(self) -> None:
        """Writes ``scores.csv``; a failure is reported once and makes the exit status 1."""
        if self.scores is None:
            return
        try:
            self.scores.flush()
        except OSError as exc:
            if not self.scores_failed:
                print(f"{PROG}: could not write {self.scores.path}: {exc}", file=sys.stderr)
            self.scores_failed = True


def check_colormap(name: str) -> None:
    """Refuses an unknown colormap before any work."""
    try:
        colorize(np.zeros((1, 1)), name)
    except (TypeError, ValueError) as exc:
        raise Stop(str(exc), 2) from None


def find_items(inputs: list[str]) -> tuple[list[Any], list[str]]:
    """The images of the inputs (see :func:`legrad.cli.explain.discover`); problems are reported here."""
    items, problems = discover(inputs)
    for msg in problems:
        print(f"{PROG}: skipped {msg}", file=sys.stderr)
    if not items:
        raise Stop("no images to explain", 1)
    return items, problems


def explain_items(args: argparse.Namespace, outputs: Outputs, items: list[Any], problems: list[str],
                  explain: Callable[[list[Any]], Sequence[Any]], labels: Sequence[str], batch_size: int) -> int:
    """The folder loop with ``legrad explain``'s writer; prints the summary line and returns the exit status.

    Args:
        explain: loaded images -> ``(maps [P, H, W], similarity [P], probability [P])`` per image.
        labels: the prompt (class, answer) of each map, as ``scores.csv`` names it.
    """
    outputs.open()
    # Stable names per (image, prompt): a later run into OUT never overwrites another pair's overlay.
    names = [prompt_name(label) for label in labels]

    def write(item: Any, image: Any, result: Any) -> None:
        outputs.write(item.key, item.source, image, labels, names, *result)

    # images.load_image looked up per call: tests (and users) may stand in their own reader.
    done = run_folder(items, load=lambda item: images.load_image(item.source), explain=explain, write=write,
                      prefix=PROG, batch_size=batch_size, progress=not args.quiet, source=lambda item: item.source,
                      after_batch=outputs.flush)
    failed = done.failed + len(problems)
    print(f"{PROG}: {done.ok} of {done.ok + failed} images explained, {failed} failed; {outputs.written} overlays "
          f"written to {outputs.out_dir}/")
    return 1 if failed or outputs.scores_failed else 0


def _checked_prompts(args: argparse.Namespace) -> list[Any]:
    """The cleaned prompts (CLIP models) or class targets (classifiers) of the command line."""
    classifier = is_classifier_name(args.model)
    if classifier and args.prompts:
        raise Stop(f"{args.model} is an image classifier: give class targets with --target (an index or a class "
                   "name), not text prompts with -p", 2)
    if not classifier and args.targets:
        raise Stop(f"--target is for image classifiers (--model timm:..., torchvision:..., hf:...); {args.model} "
                   "takes text prompts with -p", 2)
    if not (args.targets if classifier else args.prompts):
        raise Stop("give class targets with --target" if classifier else
                   "give text prompts with -p (or, with a classifier --model such as timm:vit_base_patch16_224, "
                   "class targets with --target)", 2)
    try:
        return clean_targets(args.targets) if classifier else clean_prompts(args.prompts)
    except (TypeError, ValueError) as exc:
        raise Stop(str(exc), 2) from None


def _load(args: argparse.Namespace, prompts: list[Any]) -> tuple[Explainer, Any, Any, list[str], Any]:
    """The model and what it makes of the command line: ``(explainer, size, layer, labels, text)``."""
    try:
        method_class(args.method)  # an unknown name fails before the model loads
    except (TypeError, ValueError) as exc:
        raise Stop(str(exc), 2) from None
    try:
        explainer = Explainer.load(args.model, args.pretrained, args.device)
    except (ModelLoadError, ValueError) as exc:
        raise Stop(str(exc), 1) from None
    try:
        size = explainer.check_size(args.size)
        layer_index = explainer.check_layer_index(args.layer_index)
        text = explainer.encode_prompts(prompts)  # classifiers: unknown class names end here
    except (TypeError, ValueError) as exc:
        raise Stop(str(exc), 2) from None
    labels = explainer.target_labels(text) if explainer.is_classifier else list(prompts)
    # A prompt (or class) given twice is one (image, prompt) pair: one overlay and one row.
    keep = sorted({label: i for i, label in reversed(list(enumerate(labels)))}.values())
    if len(keep) < len(labels):
        labels, text = [labels[i] for i in keep], text[keep]
    return explainer, size, layer_index, labels, text


def run(args: argparse.Namespace) -> int:
    """Explains every image; returns 0 if all succeeded, 1 if any failed, 2 for bad arguments."""
    outputs = Outputs(args)
    try:
        prompts = _checked_prompts(args)
        check_colormap(args.colormap)
        outputs.check()
        items, problems = find_items(args.inputs)
        explainer, size, layer_index, labels, text = _load(args, prompts)

        def explain(batch: list[Any]) -> list[tuple[Any, Any, Any]]:
            maps = explainer.heatmaps(batch, text, size, layer_index, method=args.method).numpy()
            cos, prob = explainer.similarity(batch, text)
            return list(zip(maps, cos.numpy(), prob.numpy()))

        return explain_items(args, outputs, items, problems, explain, labels, args.batch_size)
    except Stop as stop:
        print(f"{PROG}: error: {stop}", file=sys.stderr)
        return stop.code
    finally:
        outputs.lock.release()

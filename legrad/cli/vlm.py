"""``legrad explain IMG --model hf:DIR --prompt QUESTION --answer A --answer B``: where in each image a
local VLM found each candidate answer. One overlay per (image, answer), ``scores.csv`` rows with the
answer as ``prompt``, its summed log-probability as ``similarity`` and ``exp`` of it as ``probability``.
The same steps and folder loop as the other models (:mod:`legrad.cli.explain_run`), one image at a time."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..frontend.vlm import VLMExplainer, check_answer_text, image_token_texts
from ..io.errors import ModelLoadError
from .explain_run import PROG, Outputs, check_colormap, explain_items, find_items
from .options import Stop

__all__ = ["run_vlm"]


def _checked_answers(args: argparse.Namespace) -> list[str]:
    if args.targets:
        raise Stop("--target is for image classifiers; with --answer, give the question with --prompt", 2)
    if not args.prompts or len(args.prompts) != 1 or not args.prompts[0].strip():
        raise Stop("with --answer, give exactly one question with --prompt (e.g. --prompt 'What is in the "
                   "picture?')", 2)
    if any(not a.strip() for a in args.answers):
        raise Stop("--answer must not be empty", 2)
    if args.size is not None or args.pretrained is not None:
        raise Stop("--size and --pretrained do not apply to a VLM (its processor sizes the image; the weights are "
                   "DIR's)", 2)
    try:
        # The image token read from DIR's files: refused before the model loads (rechecked once it has).
        check_answer_text(args.answers, image_token_texts(args.model))
    except ValueError as exc:
        raise Stop(f"--{exc}", 2) from None
    return list(dict.fromkeys(args.answers))  # an answer given twice is one overlay and one row


def run_vlm(args: argparse.Namespace) -> int:
    """Explains the answers for every image; 0 if all succeeded, 1 if any failed, 2 for bad arguments."""
    outputs = Outputs(args)
    try:
        answers = _checked_answers(args)
        check_colormap(args.colormap)
        outputs.check()  # same rules as the other models: --out checked and locked before any work
        items, problems = find_items(args.inputs)
        try:
            explainer = VLMExplainer.load(args.model, args.device, args.layer_index)
        except (ModelLoadError, ValueError) as exc:
            raise Stop(str(exc), 1) from None
        try:
            explainer.check_answers(answers)  # what the files did not tell: before any image is explained
        except (TypeError, ValueError) as exc:
            raise Stop(f"--{exc}", 2) from None
        question = args.prompts[0]

        def explain(images: list[Any]) -> list[tuple[Any, Any, Any]]:
            out = []
            for image in images:
                maps, logp = explainer.explain(image, question, answers)
                out.append((maps, logp, np.exp(logp.astype(np.float64))))
            return out

        return explain_items(args, outputs, items, problems, explain, answers, batch_size=1)
    except Stop as stop:
        print(f"{PROG}: error: {stop}", file=sys.stderr)
        return stop.code
    finally:
        outputs.lock.release()

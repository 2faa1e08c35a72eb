"""``legrad explain IMG --model hf:DIR --prompt QUESTION --answer A --answer B``: where in each image a
local VLM found each candidate answer. One overlay per (image, answer), ``scores.csv`` rows with the
answer as ``prompt``, its summed log-probability as ``similarity`` and ``exp`` of it as ``probability``.
The same steps and folder loop as the other models (:mod:`legrad.cli.explain_run`), one image at a time.

``--generate`` instead explains the model's own greedy answer: per image a figure of every token's map
(``OUT/<image>__answer-tokens.png``), an overlay of the whole answer (``__answer.png``) and one per token
(``__answer-token000.png``, ...), each with its ``scores.csv`` row (the answer or the token as ``prompt``, its
log-probability as ``similarity``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..frontend.loop import run_folder
from ..frontend.vlm import VLMExplainer, check_answer_text, image_token_texts
from ..io import images
from ..io.errors import ModelLoadError
from .explain_run import PROG, Outputs, check_colormap, explain_items, find_items
from .options import Stop

__all__ = ["run_vlm"]


def _checked_generate(args: argparse.Namespace) -> int | None:
    """``--max-new-tokens`` with ``--generate`` (None without it); usage errors before any work."""
    from ..answers import MAX_NEW_TOKENS

    if args.generate and args.answers:
        raise Stop("--generate explains the model's own answer; give either --generate or --answer, not both", 2)
    if not args.generate:
        if args.max_new_tokens is not None:
            raise Stop("--max-new-tokens applies to --generate", 2)
        return None
    if args.max_new_tokens is not None and args.max_new_tokens > MAX_NEW_TOKENS:
        raise Stop(f"--max-new-tokens must be at most {MAX_NEW_TOKENS} (one map per token)", 2)
    return 32 if args.max_new_tokens is None else args.max_new_tokens


def _checked_answers(args: argparse.Namespace) -> list[str]:
    if args.targets:
        raise Stop("--target is for image classifiers; with --answer or --generate, give the question with --prompt",
                   2)
    if not args.prompts or len(args.prompts) != 1 or not args.prompts[0].strip():
        raise Stop("with --answer or --generate, give exactly one question with --prompt (e.g. --prompt 'What is in "
                   "the picture?')", 2)
    if any(not a.strip() for a in args.answers or ()):
        raise Stop("--answer must not be empty", 2)
    if args.size is not None or args.pretrained is not None:
        raise Stop("--size and --pretrained do not apply to a VLM (its processor sizes the image; the weights are "
                   "DIR's)", 2)
    try:
        # The image token read from DIR's files: refused before the model loads (rechecked once it has).
        check_answer_text(args.answers or (), image_token_texts(args.model))
    except ValueError as exc:
        raise Stop(f"--{exc}", 2) from None
    return list(dict.fromkeys(args.answers or ()))  # an answer given twice is one overlay and one row


def run_vlm(args: argparse.Namespace) -> int:
    """Explains the answers for every image; 0 if all succeeded, 1 if any failed, 2 for bad arguments."""
    outputs = Outputs(args)
    try:
        max_new_tokens = _checked_generate(args)
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
        if max_new_tokens is not None:
            return _generate_items(args, outputs, items, problems, explainer, question, max_new_tokens)

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


def _generate_items(args: argparse.Namespace, outputs: Outputs, items: list[Any], problems: list[str],
                    explainer: VLMExplainer, question: str, max_new_tokens: int) -> int:
    """``--generate``: the folder loop, one image at a time, with the answer's own labels per image."""
    from ..viz import answer_figure  # matplotlib: only once a figure is drawn

    outputs.open()

    def explain(images: list[Any]) -> list[Any]:
        return [explainer.explain_answer(image, question, max_new_tokens, args.layer_index) for image in images]

    def write(item: Any, image: Any, result: Any) -> None:
        tokens, logp = result.tokens[0], result.logprobs[0].double().numpy()
        total = float(result.answer_logprob[0])
        maps = np.concatenate([result.answer_map[0][None].numpy(), result.maps[0].numpy()])
        labels = [result.text[0], *tokens]
        names = ["answer", *(f"answer-token{t:03d}" for t in range(len(tokens)))]
        similarity = np.concatenate([[total], logp])
        outputs.write(item.key, item.source, image, labels, names, maps, similarity, np.exp(similarity))
        titles = [f"{t + 1}: {tok!r}\nlog-prob {lp:.2f}" for t, (tok, lp) in enumerate(zip(tokens, logp))]
        answer_figure(image, maps[0], f"answer: {result.text[0]!r}\nlog-prob {total:.2f}", maps[1:], titles,
                      outputs.out_dir / f"{item.key}__answer-tokens.png", alpha=args.alpha, colormap=args.colormap)

    done = run_folder(items, load=lambda item: images.load_image(item.source), explain=explain, write=write,
                      prefix=PROG, batch_size=1, progress=not args.quiet, source=lambda item: item.source,
                      after_batch=outputs.flush)
    failed = done.failed + len(problems)
    print(f"{PROG}: {done.ok} of {done.ok + failed} images explained, {failed} failed; {outputs.written} overlays "
          f"written to {outputs.out_dir}/")
    return 1 if failed or outputs.scores_failed else 0

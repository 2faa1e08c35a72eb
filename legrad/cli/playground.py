"""``legrad playground``: explain one image for a few prompts and save a figure (also ``playground.py``).

    legrad playground                         # offline: bundled demo model and a bundled scene
    legrad playground --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --image http://images.cocodataset.org/val2017/000000039769.jpg \\
        --prompt "a photo of a cat" --prompt "a remote control" --size 448
    legrad playground --model timm:vit_base_patch16_224 --image cat.jpg --target tabby --target 285
    legrad playground --model hf:llava-dir --image cat.jpg --prompt "What is in the picture?" --generate

Prints each prompt with its image-text similarity and writes ``outputs/playground.png`` (the image,
then one heatmap overlay per prompt). Image classifiers (``timm:``, ``torchvision:``, ``hf:`` models) take
``--target`` (a class index or name) instead of ``--prompt`` and print each target's logit and probability.
The demo scenes ship inside the package (:data:`legrad.frontend.scenes.SCENES_DIR`), so this runs offline
from a wheel install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from legrad.frontend.models import TOY_NAME
from legrad.frontend.options import parse_size
from legrad.frontend.scenes import absent_phrase, sample_scenes
from legrad.frontend.vlm import VLMExplainer, check_answer_text, image_token_texts
from legrad.io.errors import ImageLoadError, ModelLoadError
from legrad.io.images import load_image
from legrad.io.outdir import prepare_output_folder
from legrad.toy.scenes import make_scenes

__all__ = ["DEFAULT_OUT", "add_options", "add_parser", "default_scene", "run"]

#: Where the figure goes by default (relative to the working directory).
DEFAULT_OUT = Path("outputs") / "playground.png"


def add_options(p: argparse.ArgumentParser, default_out: Path = DEFAULT_OUT, out_label: str | None = None) -> None:
    """Adds the playground's options to ``p`` (the ``legrad playground`` subparser or ``playground.py``'s parser).

    Args:
        p: the parser.
        default_out: the default of ``--out``.
        out_label: how ``--help`` shows that default (None: ``default_out`` itself).
    """
    p.add_argument("--model", default="toy", help="'toy' (bundled demo model, default), an OpenCLIP model name, or "
                   "an image classifier timm:ARCH[.TAG], torchvision:NAME, hf:REPO_OR_DIR")
    p.add_argument("--pretrained", default=None, metavar="TAG_OR_PATH",
                   help="pretrained tag or checkpoint path (default: the model's first tag; 'none': random)")
    p.add_argument("--image", default=None, metavar="URL_OR_PATH",
                   help="image to explain (default: a bundled demo scene)")
    p.add_argument("--scene", type=int, default=0, metavar="K",
                   help="which bundled demo scene (legrad/assets/scenes/scenes.json) to use without --image "
                        "(default 0)")
    p.add_argument("--prompt", "-p", dest="prompts", action="append", metavar="TEXT",
                   help="a prompt (repeat for several; default: the demo scene's objects plus an absent one)")
    p.add_argument("--target", dest="targets", action="append", metavar="CLASS",
                   help="a class index or class name of an image classifier --model (repeat for several)")
    p.add_argument("--answer", dest="answers", action="append", metavar="TEXT",
                   help="a candidate answer to the question --prompt, for a local VLM --model hf:DIR (repeat)")
    p.add_argument("--generate", action="store_true",
                   help="explain a local VLM's own (greedy) answer to the question --prompt, token by token")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="with --generate: the most answer tokens generated (1 to 512, default 32)")
    p.add_argument("--size", default=None, metavar="N|HxW",
                   help="explained size, a multiple of the patch size (default: the model's native size)")
    p.add_argument("--layer-index", type=int, default=None, help="first explained block (default: the model's)")
    p.add_argument("--alpha", type=float, default=0.6, help="overlay opacity (default 0.6)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--out", type=Path, default=default_out,
                   help=f"output PNG (default: {default_out if out_label is None else out_label})")
    p.add_argument("--show", action="store_true", help="also open a window with the figure")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``legrad playground``."""
    p = subparsers.add_parser(
        "playground",
        help="one figure of heatmaps and similarities (offline by default: demo model and scene)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p)
    return p


def default_scene(index: int = 0):
    """A bundled demo scene: ``(PIL image, phrases of its objects, a phrase of an absent object, label)``.

    Reads the bundled ``scenes.json``; without it, draws a scene with the demo generator (index 0 only).

    Raises:
        ValueError: if ``index`` is not one of the bundled scenes.
    """
    scenes = sample_scenes()
    count = len(scenes) if scenes else 1
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"--scene must be between 0 and {count - 1} (the bundled demo scenes), got {index!r}")
    if scenes:
        scene = scenes[index]
        phrases = list(scene.phrases)
        return load_image(scene.path), phrases, absent_phrase(phrases), f"bundled demo scene {index} ({scene.path.name})"
    drawn = make_scenes(1, seed=3, n_objects=3)[0]
    phrases = [o.phrase for o in drawn.objects]
    return drawn.image, phrases, absent_phrase(phrases), "demo scene (legrad.toy.make_scenes, seed 3)"


def run(args: argparse.Namespace, prog: str = "legrad playground") -> int:
    """Runs the playground on parsed options; returns the exit status.

    Args:
        args: the options of :func:`add_options`.
        prog: the program name that starts error messages.
    """
    err = f"{prog}: error:"
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 2
    if not 0.0 <= args.alpha <= 1.0:
        print(f"{err} --alpha must be in [0, 1], got {args.alpha}", file=sys.stderr)
        return 2
    try:
        # Before any work: the figure must have somewhere to go.
        if args.out.is_dir():
            raise ValueError(f"--out {str(args.out)!r} is a folder; give the figure's file name, e.g. "
                             f"{str(args.out / 'playground.png')!r}")
        prepare_output_folder(args.out.parent, "the folder of --out")
    except ValueError as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 2

    # torch and matplotlib: only once the options are known to be good (`legrad --help` stays fast).
    from legrad.frontend.classifier_models import is_classifier_name
    from legrad.frontend.explainer import Explainer
    from legrad.viz import visualize

    if args.answers or args.generate:
        return _run_vlm(args, err)

    classifier = is_classifier_name(args.model)
    if classifier and args.prompts:
        print(f"{err} {args.model} is an image classifier: give class targets with --target, not --prompt",
              file=sys.stderr)
        return 2
    if not classifier and args.targets:
        print(f"{err} --target is for image classifiers (--model timm:..., torchvision:..., hf:...); use --prompt",
              file=sys.stderr)
        return 2
    if classifier and not args.targets:
        print(f"{err} give at least one --target (a class index or name) for {args.model}", file=sys.stderr)
        return 2
    prompts = args.targets if classifier else args.prompts
    absent = None
    if args.image is None:
        try:
            image, phrases, absent, label = default_scene(args.scene)
        except ValueError as exc:
            print(f"{err} {exc}", file=sys.stderr)
            return 2
        if not prompts:
            prompts = [*phrases, absent]
    else:
        if not prompts:
            print(f"{err} give at least one --prompt for your image", file=sys.stderr)
            return 2
        try:
            image = load_image(args.image)
        except ImageLoadError as exc:
            print(f"{err} {exc}", file=sys.stderr)
            return 1
        label = args.image

    try:
        explainer = Explainer.load(args.model, args.pretrained, args.device, layer_index=args.layer_index)
    except (ModelLoadError, ValueError, TypeError) as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 1
    try:
        # Checked first: a size over the explainer's bound must not start any work.
        h, w = explainer.check_size(size)
        result = explainer.explain(image, prompts, size=size, layer_index=args.layer_index)
    except (TypeError, ValueError) as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 2

    model_label = "toy (bundled demo model)" if explainer.name == TOY_NAME else explainer.name
    print(f"model: {model_label}, layer_index {explainer.check_layer_index(args.layer_index)}, size {h}x{w}")
    print(f"image: {label}")
    head, score = ("target", "logit") if explainer.is_classifier else ("prompt", "similarity")
    width = max(len(head), *(len(p) for p in result.prompts))
    print(f"  {head:<{width}}  {score:>10}  probability")
    for p, prompt in enumerate(result.prompts):
        print(f"  {prompt:<{width}}  {result.similarity[0, p]:>10.3f}  {result.probability[0, p]:>11.3f}")

    # The similarity sits beside each map: a map is min-max normalised, so only the similarity
    # tells a present object from an absent one.
    titles = [f"{prompt}\n{score} {result.similarity[0, p]:.2f}" + ("\n(not in the image)" if prompt == absent else "")
              for p, prompt in enumerate(result.prompts)]
    visualize(image, result.maps[0], alpha=args.alpha, text_prompts=titles, save_path=args.out,
              show=True if args.show else False)
    print(f"wrote {args.out}")
    return 0


def _run_vlm(args: argparse.Namespace, err: str) -> int:
    """``--answer``: where a local VLM found each candidate answer to the question ``--prompt``; ``--generate``:
    the model's own answer, token by token."""
    from legrad.answers import MAX_NEW_TOKENS
    from legrad.viz import visualize  # matplotlib: only once a figure is drawn

    if args.generate and args.answers:
        print(f"{err} give either --generate (the model's own answer) or --answer, not both", file=sys.stderr)
        return 2
    if not args.prompts or len(args.prompts) != 1:
        print(f"{err} with --answer or --generate, give exactly one question with --prompt", file=sys.stderr)
        return 2
    if args.generate and not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        print(f"{err} --max-new-tokens must be between 1 and {MAX_NEW_TOKENS}", file=sys.stderr)
        return 2
    if args.generate and args.show:  # the answer's figure is written, not shown in a window
        print(f"{err} --show does not apply to --generate; open the figure written to --out", file=sys.stderr)
        return 2
    try:
        check_answer_text(args.answers or (), image_token_texts(args.model))  # before the model loads
    except ValueError as exc:
        print(f"{err} --{exc}", file=sys.stderr)
        return 2
    try:
        image = load_image(args.image) if args.image else default_scene(args.scene)[0]
        explainer = VLMExplainer.load(args.model, args.device, args.layer_index)
    except (ImageLoadError, ModelLoadError, ValueError) as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 1
    if args.generate:
        return _print_generated(args, err, explainer, image)
    try:
        explainer.check_answers(args.answers)  # what the model's files did not tell: before any compute
    except (TypeError, ValueError) as exc:
        print(f"{err} --{exc}", file=sys.stderr)
        return 2
    try:
        maps, logp = explainer.explain(image, args.prompts[0], args.answers)
    except (TypeError, ValueError) as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 2
    print(f"model: {args.model} ({explainer.wrapper.tower_family})\nquestion: {args.prompts[0]}")
    width = max(len("answer"), *(len(a) for a in args.answers))
    print(f"  {'answer':<{width}}  log-prob")
    for a, lp in zip(args.answers, logp):
        print(f"  {a:<{width}}  {lp:>8.3f}")
    titles = [f"{a}\nlog-prob {lp:.2f}" for a, lp in zip(args.answers, logp)]
    visualize(image, maps, alpha=args.alpha, text_prompts=titles, save_path=args.out, show=bool(args.show))
    print(f"wrote {args.out}")
    return 0


def _print_generated(args: argparse.Namespace, err: str, explainer: VLMExplainer, image: Any) -> int:
    """Prints the model's answer, each token's log-probability, and writes the token maps' figure."""
    from legrad.viz import answer_figure

    try:
        r = explainer.explain_answer(image, args.prompts[0], args.max_new_tokens)
    except (TypeError, ValueError) as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 2
    tokens, logp, total = r.tokens[0], r.logprobs[0].tolist(), float(r.answer_logprob[0])
    print(f"model: {args.model} ({explainer.wrapper.tower_family})\nquestion: {args.prompts[0]}")
    print(f"answer: {r.text[0]!r}  log-prob {total:.3f}")
    width = max(len("token"), *(len(repr(t)) for t in tokens))
    print(f"  {'token':<{width}}  log-prob")
    for tok, lp in zip(tokens, logp):
        print(f"  {tok!r:<{width}}  {lp:>8.3f}")
    titles = [f"{t + 1}: {tok!r}\nlog-prob {lp:.2f}" for t, (tok, lp) in enumerate(zip(tokens, logp))]
    answer_figure(image, r.answer_map[0], f"answer: {r.text[0]!r}\nlog-prob {total:.2f}", r.maps[0], titles,
                  args.out, alpha=args.alpha)
    print(f"wrote {args.out}")
    return 0

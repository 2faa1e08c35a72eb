"""LeGrad playground: explain one image for a few prompts and save a figure.

    python playground.py                      # offline: bundled demo model and a bundled scene
    python playground.py --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --image http://images.cocodataset.org/val2017/000000039769.jpg \\
        --prompt "a photo of a cat" --prompt "a remote control" --size 448
    python playground.py --model timm:vit_base_patch16_224 --image cat.jpg --target tabby --target 285
    python playground.py --model hf:llava-dir --image cat.jpg --prompt "What is in the picture?" \
        --answer "a cat" --answer "a dog"        # a local VLM: where it found each answer (docs/vlm.md)

Prints each prompt with its image-text similarity and writes ``outputs/playground.png`` (the image,
then one heatmap overlay per prompt). Image classifiers (``timm:``, ``torchvision:``, ``hf:`` models) take
``--target`` (a class index or name) instead of ``--prompt`` and print each target's logit and probability.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
DEFAULT_OUT = REPO / "outputs" / "playground.png"
ASSETS = REPO / "assets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="'toy' (bundled demo model, default), an OpenCLIP model name, or "
                   "an image classifier timm:ARCH[.TAG], torchvision:NAME, hf:REPO_OR_DIR")
    p.add_argument("--pretrained", default=None, metavar="TAG_OR_PATH",
                   help="pretrained tag or checkpoint path (default: the model's first tag; 'none': random)")
    p.add_argument("--image", default=None, metavar="URL_OR_PATH",
                   help="image to explain (default: a bundled demo scene from assets/)")
    p.add_argument("--scene", type=int, default=0, metavar="K",
                   help="which bundled scene (assets/scenes.json) to use without --image (default 0)")
    p.add_argument("--prompt", "-p", dest="prompts", action="append", metavar="TEXT",
                   help="a prompt (repeat for several; default: the demo scene's objects plus an absent one)")
    p.add_argument("--target", dest="targets", action="append", metavar="CLASS",
                   help="a class index or class name of an image classifier --model (repeat for several)")
    p.add_argument("--answer", dest="answers", action="append", metavar="TEXT",
                   help="a candidate answer to the question --prompt, for a local VLM --model hf:DIR (repeat)")
    p.add_argument("--size", default=None, metavar="N|HxW",
                   help="explained size, a multiple of the patch size (default: the model's native size)")
    p.add_argument("--layer-index", type=int, default=None, help="first explained block (default: the model's)")
    p.add_argument("--alpha", type=float, default=0.6, help="overlay opacity (default 0.6)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output PNG (default: {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--show", action="store_true", help="also open a window with the figure")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    return p.parse_args(argv)


def default_scene(index: int = 0):
    """A bundled demo scene: ``(PIL image, phrases of its objects, a phrase of an absent object, label)``.

    Reads ``assets/scenes.json``; without it, draws a scene with the bundled generator (index 0 only).

    Raises:
        ValueError: if ``index`` is not one of the bundled scenes.
    """
    from legrad.frontend.images import load_image
    from legrad.frontend.scenes import absent_phrase, sample_scenes

    scenes = sample_scenes(ASSETS)
    count = len(scenes) if scenes else 1
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"--scene must be between 0 and {count - 1} (the bundled demo scenes), got {index!r}")
    if scenes:
        scene = scenes[index]
        phrases = list(scene.phrases)
        return load_image(scene.path), phrases, absent_phrase(phrases), str(scene.path.relative_to(REPO))
    from legrad.toy.scenes import make_scenes

    drawn = make_scenes(1, seed=3, n_objects=3)[0]
    phrases = [o.phrase for o in drawn.objects]
    return drawn.image, phrases, absent_phrase(phrases), "demo scene (legrad.toy.make_scenes, seed 3)"


def main(argv: list[str] | None = None) -> int:
    """Runs the playground; returns the exit status."""
    args = parse_args(argv)
    from legrad.frontend.errors import ImageLoadError, ModelLoadError
    from legrad.frontend.images import load_image
    from legrad.frontend.logs import configure_logging
    from legrad.frontend.models import TOY_NAME
    from legrad.frontend.options import parse_size

    configure_logging(args.verbose)
    err = f"{Path(sys.argv[0]).name}: error:"
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 2
    if not 0.0 <= args.alpha <= 1.0:
        print(f"{err} --alpha must be in [0, 1], got {args.alpha}", file=sys.stderr)
        return 2

    from legrad.frontend.classifier_models import is_classifier_name
    from legrad.frontend.explainer import Explainer
    from legrad.viz import visualize

    if args.answers:
        return _main_vlm(args, err)

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


def _main_vlm(args: argparse.Namespace, err: str) -> int:
    """``--answer``: where a local VLM found each candidate answer to the question ``--prompt``."""
    from legrad.frontend.errors import ImageLoadError, ModelLoadError
    from legrad.frontend.images import load_image
    from legrad.frontend.vlm import VLMExplainer
    from legrad.viz import visualize

    if not args.prompts or len(args.prompts) != 1:
        print(f"{err} with --answer, give exactly one question with --prompt", file=sys.stderr)
        return 2
    try:
        image = load_image(args.image) if args.image else default_scene(args.scene)[0]
        explainer = VLMExplainer.load(args.model, args.device, args.layer_index)
    except (ImageLoadError, ModelLoadError, ValueError) as exc:
        print(f"{err} {exc}", file=sys.stderr)
        return 1
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


if __name__ == "__main__":
    sys.exit(main())

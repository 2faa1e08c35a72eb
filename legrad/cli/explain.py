"""``legrad explain``: heatmap overlays (and optionally raw maps) for images and prompts (or, for image
classifiers, class targets)."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from legrad.cli.options import add_device_option, add_model_options, add_quiet_option, unit_float
from legrad.io.errors import one_line
from legrad.io.fetch import is_url
from legrad.io.images import IMAGE_EXTENSIONS

_EPILOG = """\
examples:
  legrad explain assets/ -p "a red circle" -p "a blue square"
  legrad explain cat.jpg -p "a cat" -p "a remote control" --model ViT-B-16 \\
      --pretrained laion2b_s34b_b88k --size 448 --out outputs/cats --save-maps
  legrad explain cat.jpg --model timm:vit_base_patch16_224 --target 281 --target "tiger cat"
  legrad explain cat.jpg --model hf:llava-dir --prompt "What is in the picture?" --answer "a cat" --answer "a dog"

Image classifiers (--model timm:ARCH[.TAG], torchvision:NAME, hf:REPO_OR_DIR) take --target (a class
index or a class name from the model's metadata) instead of -p; their scores.csv similarity is the
target's logit and probability its softmax probability over all classes.

Outputs are OUT/<image>-<hash>__<prompt>-<hash>.png (and .npy with --save-maps: the [H, W] float32 map
in [0, 1] at the explained size), plus OUT/scores.csv with one row per overlay (image, prompt,
similarity, probability, overlay). The hashes (of the image's real path or URL, and of the exact prompt)
make each name stable and distinct: a later run into OUT redraws only its own pairs' overlays and
replaces only their rows. Images found by walking a directory keep their sub-folder under OUT.
Unreadable images, and images that cannot be explained (e.g. out of memory), are reported and skipped;
the exit status is 1 if any image failed. One run per OUT at a time (lock file OUT/.legrad.lock); SIGTERM
stops like Ctrl-C, keeping the rows of the overlays written (exit status 143).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``legrad explain``."""
    p = subparsers.add_parser(
        "explain",
        help="write LeGrad heatmap overlays for images and text prompts",
        description="Explain which image regions match each text prompt (one overlay PNG per image and prompt).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, http(s) URLs, or directories (walked recursively for images)")
    p.add_argument("-p", "--prompt", dest="prompts", action="append", metavar="PROMPT",
                   help="a text prompt (repeat for several); CLIP models")
    p.add_argument("--target", dest="targets", action="append", metavar="CLASS",
                   help="a class index or class name (repeat for several); image classifiers (timm:, "
                        "torchvision:, hf: models)")
    p.add_argument("--answer", dest="answers", action="append", metavar="ANSWER",
                   help="a candidate answer to the question given with --prompt (repeat for several); local "
                        "vision-language models --model hf:DIR (see docs/vlm.md)")
    add_model_options(p)
    add_device_option(p)
    p.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default: outputs)")
    p.add_argument("--save-maps", action="store_true", help="also save the raw maps as .npy")
    p.add_argument("--alpha", type=unit_float, default=0.6, help="heatmap opacity in the overlays (default 0.6)")
    p.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    add_quiet_option(p)
    return p


@dataclass
class _Item:
    source: str  # path or URL as given / found
    key: str  # output path stem relative to --out: stable per image, distinct for distinct images


def slugify(text: str, max_len: int = 60) -> str:
    """A filesystem-safe name: lowercase ASCII letters, digits and single dashes (may be empty)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-")


def short_hash(text: str) -> str:
    """8 hex digits of the SHA-256 of ``text``: what keeps two names that slug alike apart."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def prompt_name(prompt: str) -> str:
    """The output-name part of a prompt: its slug and the hash of the exact prompt (``a-red-circle-1a2b3c4d``).

    ``"a red/circle"`` and ``"a red circle"`` slug alike but get different names; a prompt always gets the
    same name, whatever the other prompts of the run.
    """
    return f"{slugify(prompt, 48) or 'prompt'}-{short_hash(prompt)}"


def image_identity(source: str) -> str:
    """What names an image across runs: its URL, or the real absolute path of its file."""
    return source if is_url(source) else os.path.realpath(source)


def discover(inputs: list[str]) -> tuple[list[_Item], list[str]]:
    """Expands the inputs to images with stable output keys.

    A key is the image's slug (under its sub-folder for images found in a directory) and the hash of the
    image's identity (:func:`image_identity`): it does not depend on the other inputs or their order, so
    a later run into the same ``--out`` redraws an image's own overlays and never another's. An image
    given twice (the same file by two paths) is explained once.

    Returns:
        ``(items, problems)``: images to process, and messages for inputs that are missing or for
        directories without images.
    """
    items: list[_Item] = []
    problems: list[str] = []
    used: set[str] = set()

    def add(source: str, stem: str) -> None:
        parts = [slugify(part) or "image" for part in Path(stem).parts] or ["image"]
        parts[-1] = f"{parts[-1]}-{short_hash(image_identity(source))}"
        key = "/".join(parts)
        if key not in used:
            used.add(key)
            items.append(_Item(source, key))

    for raw in inputs:
        if is_url(raw):
            name = raw.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
            add(raw, Path(name).stem or "url")
        elif os.path.isdir(raw):
            root = Path(raw)
            found = sorted(
                f for f in root.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(root).parts)
            )
            if not found:
                problems.append(f"{raw}: no images found in this directory")
            for f in found:
                add(str(f), str(f.relative_to(root).with_suffix("")))
        elif os.path.isfile(raw):
            add(raw, Path(raw).stem)
        elif os.path.exists(raw):
            # A FIFO would block the loader and a device stream forever: regular files only.
            problems.append(f"{raw}: not a regular file")
        else:
            problems.append(f"{raw}: no such file or directory")
    return items, problems


def _is_memory_error(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", ())
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or (oom and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError)
        and any(s in text for s in ("out of memory", "not enough memory", "can't allocate")))


def _describe(exc: BaseException) -> str:
    text = one_line(exc, 200)
    return f"out of memory ({text})" if _is_memory_error(exc) and "memory" not in text.lower() else text


def _release_memory(exc: BaseException) -> None:
    """After an out-of-memory error, hands cached blocks back so that smaller retries can fit."""
    if _is_memory_error(exc):
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# What explaining one batch may raise for reasons of its images (size, memory), not of the program.
# Anything: a degenerate image may overflow a size computation (OverflowError) as well as run out of memory.
# KeyboardInterrupt and SystemExit are not Exceptions: they still stop the run.
_EXPLAIN_ERRORS = (Exception,)


def _explain_isolated(explainer, loaded: list, text, size, layer_index) -> list:
    """Explains a batch; if it fails, each image alone, so that one bad image costs only itself.

    Returns:
        ``(item, image, (maps [P, H, W], cos [P], prob [P]) or None, error or None)`` per image.
    """
    images = [im for _, im in loaded]
    try:
        maps = explainer.heatmaps(images, text, size, layer_index).numpy()
        cos, prob = explainer.similarity(images, text)
    except _EXPLAIN_ERRORS as exc:
        _release_memory(exc)
        if len(loaded) == 1:
            return [(loaded[0][0], loaded[0][1], None, _describe(exc))]
        return [r for pair in loaded for r in _explain_isolated(explainer, [pair], text, size, layer_index)]
    cos, prob = cos.numpy(), prob.numpy()
    return [(item, image, (maps[b], cos[b], prob[b]), None) for b, (item, image) in enumerate(loaded)]


def run(args: argparse.Namespace) -> int:
    """Explains every image; returns 0 if all succeeded, 1 if any failed."""
    import numpy as np

    from legrad.cli.scores import ScoresFile
    from legrad.extract.outdir import FolderLock
    from legrad.frontend.classifier_models import is_classifier_name
    from legrad.frontend.explainer import clean_prompts, clean_targets
    from legrad.viz import colorize

    prog = "legrad explain"

    def error(msg: str) -> None:
        print(f"{prog}: error: {msg}", file=sys.stderr)

    if getattr(args, "answers", None):
        from legrad.cli.vlm import run_vlm

        return run_vlm(args)
    classifier = is_classifier_name(args.model)
    if classifier and args.prompts:
        error(f"{args.model} is an image classifier: give class targets with --target (an index or a class "
              "name), not text prompts with -p")
        return 2
    if not classifier and args.targets:
        error(f"--target is for image classifiers (--model timm:..., torchvision:..., hf:...); {args.model} "
              "takes text prompts with -p")
        return 2
    if not (args.targets if classifier else args.prompts):
        error("give class targets with --target" if classifier else
              "give text prompts with -p (or, with a classifier --model such as timm:vit_base_patch16_224, "
              "class targets with --target)")
        return 2
    try:
        prompts = clean_targets(args.targets) if classifier else clean_prompts(args.prompts)
        colorize(np.zeros((1, 1)), args.colormap)
    except (TypeError, ValueError) as exc:
        error(str(exc))
        return 2
    out_dir = Path(args.out)
    lock = FolderLock(out_dir)
    try:
        # Before any work: a file given as --out, a read-only folder, a folder in use by another run or
        # holding someone else's scores.csv are refused here. A new folder is created only later, once the
        # model and settings are known to be good.
        claim_output_folder(lock, out_dir, create=False)
        ScoresFile(out_dir / "scores.csv")
    except ValueError as exc:
        lock.release()
        error(str(exc))
        return 2
    try:
        return _explain_all(args, prompts, out_dir, lock, error)
    finally:
        lock.release()


def claim_output_folder(lock, out_dir: Path, create: bool) -> None:
    """Checks that ``out_dir`` is a writable folder and locks it for this run (only if it exists, unless
    ``create``). Raises the ValueError of :mod:`legrad.extract.outdir`."""
    from legrad.extract.outdir import prepare_output_folder

    if create or os.path.lexists(out_dir):
        prepare_output_folder(out_dir)
        lock.acquire()


def _explain_all(args: argparse.Namespace, prompts: list, out_dir: Path, lock, error) -> int:
    import numpy as np
    from tqdm import tqdm

    from legrad.cli.scores import ScoresFile
    from legrad.frontend.explainer import Explainer
    from legrad.io.errors import ImageLoadError, ModelLoadError
    from legrad.io.files import atomic_writer
    from legrad.io.images import load_image
    from legrad.viz import overlay

    prog = "legrad explain"
    items, problems = discover(args.inputs)
    for msg in problems:
        print(f"{prog}: skipped {msg}", file=sys.stderr)
    if not items:
        error("no images to explain")
        return 1

    try:
        explainer = Explainer.load(args.model, args.pretrained, args.device)
    except (ModelLoadError, ValueError) as exc:
        error(str(exc))
        return 1
    try:
        size = explainer.check_size(args.size)
        layer_index = explainer.check_layer_index(args.layer_index)
        text = explainer.encode_prompts(prompts)  # classifiers: unknown class names end here
    except (TypeError, ValueError) as exc:
        error(str(exc))
        return 2
    if explainer.is_classifier:
        prompts = explainer.target_labels(text)
    # A prompt (or class) given twice is one (image, prompt) pair: one overlay and one row.
    first = {prompt: i for i, prompt in reversed(list(enumerate(prompts)))}
    keep = sorted(first.values())
    if len(keep) < len(prompts):
        prompts, text = [prompts[i] for i in keep], text[keep]
    try:
        claim_output_folder(lock, out_dir, create=True)
        # Read again under the lock: the rows of earlier runs into this folder are kept.
        scores = ScoresFile(out_dir / "scores.csv")
    except ValueError as exc:
        error(str(exc))
        return 2

    names = [prompt_name(prompt) for prompt in prompts]
    ok = failed = written = 0
    scores_failed = False

    def flush_scores() -> None:
        nonlocal scores_failed
        try:
            scores.flush()
        except OSError as exc:
            if not scores_failed:
                bar.write(f"{prog}: could not write {scores.path}: {exc}", file=sys.stderr)
            scores_failed = True

    bar = tqdm(total=len(items), unit="img", disable=args.quiet, file=sys.stderr, desc="explain")
    try:
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            loaded = []
            for item in chunk:
                try:
                    loaded.append((item, load_image(item.source)))
                except Exception as exc:  # any failure of one image costs only that image
                    msg = str(exc) if isinstance(exc, ImageLoadError) else f"{item.source}: {_describe(exc)}"
                    bar.write(f"{prog}: skipped {msg}", file=sys.stderr)
                    failed += 1
            results = _explain_isolated(explainer, loaded, text, size, layer_index) if loaded else []
            for item, image, result, err in results:
                if result is None:
                    bar.write(f"{prog}: failed {item.source}: {err}", file=sys.stderr)
                    failed += 1
                    continue
                maps, cos, prob = result
                try:
                    for p, (name, prompt) in enumerate(zip(names, prompts)):
                        base = out_dir / f"{item.key}__{name}"
                        with atomic_writer(base.with_suffix(".png")) as fh:
                            overlay(image, maps[p], alpha=args.alpha, colormap=args.colormap).save(fh, "PNG")
                        written += 1
                        if args.save_maps:
                            with atomic_writer(base.with_suffix(".npy")) as fh:
                                np.save(fh, maps[p].astype(np.float32))
                        # Row per overlay as soon as it exists: scores.csv then describes every overlay.
                        scores.add(item.source, prompt, float(cos[p]), float(prob[p]),
                                   base.with_suffix(".png").relative_to(out_dir).as_posix())
                    ok += 1
                except Exception as exc:
                    bar.write(f"{prog}: failed to write outputs for {item.source}: {_describe(exc)}",
                              file=sys.stderr)
                    failed += 1
            flush_scores()  # after every batch, so that a killed run keeps the rows of what it finished
            bar.update(len(chunk))
    finally:
        bar.close()
        flush_scores()  # also on Ctrl-C and SIGTERM: rows of the overlays written so far

    failed += len(problems)
    total = ok + failed
    print(f"{prog}: {ok} of {total} images explained, {failed} failed; {written} overlays written to {out_dir}/")
    return 1 if failed or scores_failed else 0

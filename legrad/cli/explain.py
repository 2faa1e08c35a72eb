"""``legrad explain``: heatmap overlays (and optionally raw maps) for images and prompts (or, for image
classifiers, class targets; for local VLMs, candidate answers).

This module is the command's parser and its output names (light: ``legrad --help`` imports it); what the
command does is :mod:`legrad.cli.explain_run` (and :mod:`legrad.cli.vlm` for ``--answer`` and ``--generate``)."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from legrad.cli.options import (
    add_device_option,
    add_model_options,
    add_quiet_option,
    positive_int,
    unit_float,
)
from legrad.io.fetch import is_url
from legrad.io.images import find_images
from legrad.io.outdir import FolderLock, prepare_output_folder

_EPILOG = """\
examples:
  legrad explain assets/scenes/ -p "a purple cross" -p "a cyan circle"
  legrad explain cat.jpg -p "a cat" -p "a remote control" --model ViT-B-16 \\
      --pretrained laion2b_s34b_b88k --size 448 --out outputs/cats --save-maps
  legrad explain cat.jpg --model timm:vit_base_patch16_224 --target 281 --target "tiger cat"
  legrad explain cat.jpg --model hf:llava-dir --prompt "What is in the picture?" --answer "a cat" --answer "a dog"
  legrad explain cat.jpg --model hf:llava-dir --prompt "What is in the picture?" --generate

Image classifiers (--model timm:ARCH[.TAG], torchvision:NAME, hf:REPO_OR_DIR) take --target (a class
index or a class name from the model's metadata) instead of -p; their scores.csv similarity is the
target's logit and probability its softmax probability over all classes.

Outputs are OUT/<image>-<hash>__<prompt>-<hash>.png (and .npy with --save-maps: the [H, W] float32 map
in [0, 1] at the explained size), plus OUT/scores.csv with one row per overlay (image, prompt,
similarity, probability, overlay; a text cell a spreadsheet would run as a formula, e.g. starting with
=, +, - or @, gets a ' in front) and OUT/scores.jsonl with the same rows, raw. The hashes (of the image's real path or URL, and of the exact prompt)
make each name stable and distinct: a later run into OUT redraws only its own pairs' overlays and
replaces only their rows. Images found by walking a directory keep their sub-folder under OUT.
Unreadable images, and images that cannot be explained (e.g. out of memory), are reported and skipped;
the exit status is 1 if any image failed. One run per OUT at a time (lock file OUT/.legrad.lock); no
symbolic link inside OUT is followed (docs/cli.md). SIGTERM stops like Ctrl-C, keeping the rows of the
overlays written (exit status 143).
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
    p.add_argument("--generate", action="store_true",
                   help="explain the model's own (greedy) answer to the question --prompt, token by token; local "
                        "vision-language models --model hf:DIR")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help="with --generate: the most answer tokens generated (1 to 512, default 32)")
    add_model_options(p)
    add_device_option(p)
    p.add_argument("--method", default="legrad", metavar="NAME",
                   help="explanation method, a name of the registry legrad.methods.METHODS (legrad, gradcam, "
                        "chefercam, rollout, raw_attention; 'rollout@3' sets the first block); default legrad")
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
            found = find_images(raw)
            if not found:
                problems.append(f"{raw}: no images found in this directory")
            for rel in found:
                add(str(Path(raw) / rel), str(Path(rel).with_suffix("")))
        elif os.path.isfile(raw):
            add(raw, Path(raw).stem)
        elif os.path.exists(raw):
            # A FIFO would block the loader and a device stream forever: regular files only.
            problems.append(f"{raw}: not a regular file")
        else:
            problems.append(f"{raw}: no such file or directory")
    return items, problems


def claim_output_folder(lock: FolderLock, out_dir: Path, create: bool) -> None:
    """Checks that ``out_dir`` is a writable folder and locks it for this run (only if it exists, unless
    ``create``). Raises the ValueError of :mod:`legrad.io.outdir`."""
    if create or os.path.lexists(out_dir):
        prepare_output_folder(out_dir)
        lock.acquire()


def run(args: argparse.Namespace) -> int:
    """Explains every image; returns 0 if all succeeded, 1 if any failed, 2 for bad arguments."""
    # The command's body loads torch and the models: imported here so that `legrad --help` stays fast.
    if getattr(args, "answers", None) or getattr(args, "generate", False):
        from legrad.cli.vlm import run_vlm

        if getattr(args, "method", "legrad") != "legrad":
            raise SystemExit(f"legrad explain: error: --method {args.method} does not explain answers; "
                             "vision-language models are explained by legrad")

        return run_vlm(args)
    from legrad.cli.explain_run import run as run_explain

    return run_explain(args)

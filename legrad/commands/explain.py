"""``legrad explain``: heatmap overlays (and optionally raw maps) for images and prompts."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from legrad.commands.argtypes import unit_float
from legrad.commands.options import add_device_option, add_model_options, add_quiet_option
from legrad.loading import IMAGE_EXTENSIONS

_EPILOG = """\
examples:
  legrad explain assets/ -p "a red circle" -p "a blue square"
  legrad explain cat.jpg -p "a cat" -p "a remote control" --model ViT-B-16 \\
      --pretrained laion2b_s34b_b88k --size 448 --out outputs/cats --save-maps

Outputs are OUT/<image>__<prompt>.png (and .npy with --save-maps: the [H, W] float32 map in [0, 1] at
the explained size), plus OUT/scores.csv with each image-prompt similarity. Images found by walking a
directory keep their sub-folder under OUT. Unreadable images are reported and skipped; the exit status
is 1 if any image failed.
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
    p.add_argument("-p", "--prompt", dest="prompts", action="append", required=True, metavar="PROMPT",
                   help="a text prompt (repeat for several)")
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
    key: str  # output path stem relative to --out, unique per run


def slugify(text: str, max_len: int = 60) -> str:
    """A filesystem-safe name: lowercase ASCII letters, digits and single dashes (may be empty)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-")


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def discover(inputs: list[str]) -> tuple[list[_Item], list[str]]:
    """Expands the inputs to images with unique output keys.

    Returns:
        ``(items, problems)``: images to process, and messages for inputs that are missing or for
        directories without images.
    """
    items: list[_Item] = []
    problems: list[str] = []
    used: set[str] = set()

    def add(source: str, stem: str) -> None:
        parts = [slugify(part) or "image" for part in Path(stem).parts]
        items.append(_Item(source, _unique("/".join(parts), used)))

    for raw in inputs:
        if re.match(r"^https?://", raw, flags=re.IGNORECASE):
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
        elif os.path.exists(raw):
            add(raw, Path(raw).stem)
        else:
            problems.append(f"{raw}: no such file or directory")
    return items, problems


def run(args: argparse.Namespace) -> int:
    """Explains every image; returns 0 if all succeeded, 1 if any failed."""
    import numpy as np
    from tqdm import tqdm

    from legrad.explainer import Explainer, clean_prompts
    from legrad.loading import ImageLoadError, ModelLoadError, load_image
    from legrad.viz import atomic_writer, colorize, overlay

    prog = "legrad explain"

    def error(msg: str) -> None:
        print(f"{prog}: error: {msg}", file=sys.stderr)

    try:
        prompts = clean_prompts(args.prompts)
        colorize(np.zeros((1, 1)), args.colormap)
    except (TypeError, ValueError) as exc:
        error(str(exc))
        return 2
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
    except (TypeError, ValueError) as exc:
        error(str(exc))
        return 2

    out_dir = Path(args.out)
    slugs: list[str] = []
    used: set[str] = set()
    for i, prompt in enumerate(prompts):
        slugs.append(_unique(slugify(prompt, 48) or f"prompt{i + 1}", used))

    text = explainer.encode_prompts(prompts)

    ok = failed = written = 0
    score_rows: list[tuple[str, str, float, float]] = []
    bar = tqdm(total=len(items), unit="img", disable=args.quiet, file=sys.stderr, desc="explain")
    try:
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            loaded = []
            for item in chunk:
                try:
                    loaded.append((item, load_image(item.source)))
                except ImageLoadError as exc:
                    bar.write(f"{prog}: skipped {exc}", file=sys.stderr)
                    failed += 1
            if loaded:
                images = [im for _, im in loaded]
                try:
                    maps = explainer.heatmaps(images, text, size, layer_index).numpy()
                    cos, prob = explainer.similarity(images, text)
                except (RuntimeError, ValueError) as exc:  # e.g. out of memory: report, go on with the next batch
                    for item, _ in loaded:
                        bar.write(f"{prog}: failed {item.source}: {' '.join(str(exc).split())[:200]}",
                                  file=sys.stderr)
                    failed += len(loaded)
                    bar.update(len(chunk))
                    continue
                for b, (item, image) in enumerate(loaded):
                    try:
                        for p, slug in enumerate(slugs):
                            base = out_dir / f"{item.key}__{slug}"
                            with atomic_writer(base.with_suffix(".png")) as fh:
                                overlay(image, maps[b, p], alpha=args.alpha, colormap=args.colormap).save(fh, "PNG")
                            written += 1
                            if args.save_maps:
                                with atomic_writer(base.with_suffix(".npy")) as fh:
                                    np.save(fh, maps[b, p].astype(np.float32))
                        for p, prompt in enumerate(prompts):
                            score_rows.append((item.source, prompt, float(cos[b, p]), float(prob[b, p])))
                        ok += 1
                    except OSError as exc:
                        bar.write(f"{prog}: failed to write outputs for {item.source}: {exc}", file=sys.stderr)
                        failed += 1
            bar.update(len(chunk))
    finally:
        bar.close()

    if score_rows:
        _write_scores(out_dir / "scores.csv", score_rows, atomic_writer)
    failed += len(problems)
    total = ok + failed
    print(f"{prog}: {ok} of {total} images explained, {failed} failed; {written} overlays written to {out_dir}/")
    return 1 if failed else 0


def _write_scores(path: Path, rows: list[tuple[str, str, float, float]], atomic_writer) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "prompt", "similarity", "probability"])
    for src, prompt, cos, prob in rows:
        w.writerow([src, prompt, f"{cos:.6f}", f"{prob:.6f}"])
    with atomic_writer(path) as fh:
        fh.write(buf.getvalue().encode("utf-8"))

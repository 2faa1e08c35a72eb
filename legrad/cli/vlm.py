"""``legrad explain IMG --model hf:DIR --prompt QUESTION --answer A --answer B``: where in each image a
local VLM found each candidate answer. One overlay per (image, answer), ``scores.csv`` rows with the
answer as ``prompt``, its summed log-probability as ``similarity`` and ``exp`` of it as ``probability``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_vlm(args: argparse.Namespace) -> int:
    """Explains the answers for every image; 0 if all succeeded, 1 if any failed, 2 for bad arguments."""
    import math

    import numpy as np

    from legrad.cli.explain import discover, slugify
    from legrad.cli.scores import ScoresFile
    from legrad.frontend.errors import ImageLoadError, ModelLoadError, one_line
    from legrad.frontend.files import atomic_writer
    from legrad.frontend.images import load_image
    from legrad.frontend.vlm import VLMExplainer
    from legrad.viz import colorize, overlay

    prog = "legrad explain"

    def error(msg: str) -> None:
        print(f"{prog}: error: {msg}", file=sys.stderr)

    if args.targets:
        error("--target is for image classifiers; with --answer, give the question with --prompt")
        return 2
    if not args.prompts or len(args.prompts) != 1 or not args.prompts[0].strip():
        error("with --answer, give exactly one question with --prompt (e.g. --prompt 'What is in the picture?')")
        return 2
    answers = list(args.answers)
    if any(not a.strip() for a in answers):
        error("--answer must not be empty")
        return 2
    if args.size is not None or args.pretrained is not None:
        error("--size and --pretrained do not apply to a VLM (its processor sizes the image; the weights are DIR's)")
        return 2
    try:
        colorize(np.zeros((1, 1)), args.colormap)
    except (TypeError, ValueError) as exc:
        error(str(exc))
        return 2
    out_dir = Path(args.out)
    try:
        scores = ScoresFile(out_dir / "scores.csv")
    except ValueError as exc:
        error(str(exc))
        return 2
    items, problems = discover(args.inputs)
    for msg in problems:
        print(f"{prog}: skipped {msg}", file=sys.stderr)
    if not items:
        error("no images to explain")
        return 1
    try:
        explainer = VLMExplainer.load(args.model, args.device, args.layer_index)
    except (ModelLoadError, ValueError) as exc:
        error(str(exc))
        return 1
    slugs: list[str] = []
    for i, a in enumerate(answers):
        slug = slugify(a, 48) or f"answer{i + 1}"
        slugs.append(slug if slug not in slugs else f"{slug}-{i + 1}")
    ok = failed = written = 0
    for item in items:
        try:
            image = load_image(item.source)
            maps, logp = explainer.explain(image, args.prompts[0], answers)
        except (ImageLoadError, OSError, RuntimeError, ValueError, TypeError, MemoryError) as exc:
            print(f"{prog}: failed {item.source}: {one_line(exc, 200)}", file=sys.stderr)
            failed += 1
            continue
        try:
            for p, (slug, answer) in enumerate(zip(slugs, answers)):
                base = out_dir / f"{item.key}__{slug}"
                with atomic_writer(base.with_suffix(".png")) as fh:
                    overlay(image, maps[p], alpha=args.alpha, colormap=args.colormap).save(fh, "PNG")
                written += 1
                if args.save_maps:
                    with atomic_writer(base.with_suffix(".npy")) as fh:
                        np.save(fh, maps[p].astype(np.float32))
                scores.add(item.source, answer, float(logp[p]), math.exp(float(logp[p])),
                           base.with_suffix(".png").relative_to(out_dir).as_posix())
            ok += 1
        except (OSError, MemoryError, ValueError) as exc:
            print(f"{prog}: failed to write outputs for {item.source}: {one_line(exc, 200)}", file=sys.stderr)
            failed += 1
    try:
        scores.flush()
    except OSError as exc:
        print(f"{prog}: could not write {scores.path}: {exc}", file=sys.stderr)
        failed += 1
    failed += len(problems)
    print(f"{prog}: {ok} of {ok + failed} images explained, {failed} failed; {written} overlays written to {out_dir}/")
    return 1 if failed else 0

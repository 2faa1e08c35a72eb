"""``legrad explain IMG --model hf:DIR --prompt QUESTION --answer A --answer B``: where in each image a
local VLM found each candidate answer. One overlay per (image, answer), ``scores.csv`` rows with the
answer as ``prompt``, its summed log-probability as ``similarity`` and ``exp`` of it as ``probability``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_vlm(args: argparse.Namespace) -> int:
    """Explains the answers for every image; 0 if all succeeded, 1 if any failed, 2 for bad arguments."""
    import numpy as np

    from legrad.cli.explain import claim_output_folder
    from legrad.cli.scores import ScoresFile
    from legrad.extract.outdir import FolderLock
    from legrad.viz import colorize

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
    answers = list(dict.fromkeys(answers))  # an answer given twice is one overlay and one row
    if args.size is not None or args.pretrained is not None:
        error("--size and --pretrained do not apply to a VLM (its processor sizes the image; the weights are DIR's)")
        return 2
    try:
        colorize(np.zeros((1, 1)), args.colormap)
    except (TypeError, ValueError) as exc:
        error(str(exc))
        return 2
    out_dir = Path(args.out)
    lock = FolderLock(out_dir)
    try:
        # Same rules as the other models (legrad.cli.explain.run): --out checked and locked before any work.
        claim_output_folder(lock, out_dir, create=False)
        ScoresFile(out_dir / "scores.csv")
    except ValueError as exc:
        lock.release()
        error(str(exc))
        return 2
    try:
        return _explain_answers(args, answers, out_dir, lock, error)
    finally:
        lock.release()


def _explain_answers(args: argparse.Namespace, answers: list[str], out_dir: Path, lock, error) -> int:
    import math

    import numpy as np

    from legrad.cli.explain import claim_output_folder, discover, prompt_name
    from legrad.cli.scores import ScoresFile
    from legrad.frontend.vlm import VLMExplainer
    from legrad.io.errors import ImageLoadError, ModelLoadError, one_line
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
        explainer = VLMExplainer.load(args.model, args.device, args.layer_index)
    except (ModelLoadError, ValueError) as exc:
        error(str(exc))
        return 1
    try:
        claim_output_folder(lock, out_dir, create=True)
        scores = ScoresFile(out_dir / "scores.csv")  # read again under the lock: earlier rows are kept
    except ValueError as exc:
        error(str(exc))
        return 2
    # Stable names per (image, answer), as for prompts: a later run never overwrites another pair's overlay.
    names = [prompt_name(a) for a in answers]
    ok = failed = written = 0
    try:
        for item in items:
            try:
                image = load_image(item.source)
                maps, logp = explainer.explain(image, args.prompts[0], answers)
            except Exception as exc:  # any failure of one image costs only that image
                msg = str(exc) if isinstance(exc, ImageLoadError) else f"{item.source}: {one_line(exc, 200)}"
                print(f"{prog}: failed {msg}", file=sys.stderr)
                failed += 1
                continue
            try:
                for p, (name, answer) in enumerate(zip(names, answers)):
                    base = out_dir / f"{item.key}__{name}"
                    with atomic_writer(base.with_suffix(".png")) as fh:
                        overlay(image, maps[p], alpha=args.alpha, colormap=args.colormap).save(fh, "PNG")
                    written += 1
                    if args.save_maps:
                        with atomic_writer(base.with_suffix(".npy")) as fh:
                            np.save(fh, maps[p].astype(np.float32))
                    scores.add(item.source, answer, float(logp[p]), math.exp(float(logp[p])),
                               base.with_suffix(".png").relative_to(out_dir).as_posix())
                ok += 1
            except Exception as exc:
                print(f"{prog}: failed to write outputs for {item.source}: {one_line(exc, 200)}", file=sys.stderr)
                failed += 1
            scores.flush()
    finally:
        try:
            scores.flush()  # also on Ctrl-C and SIGTERM: the rows of the overlays written so far
        except OSError as exc:
            print(f"{prog}: could not write {scores.path}: {exc}", file=sys.stderr)
            failed += 1
    failed += len(problems)
    print(f"{prog}: {ok} of {ok + failed} images explained, {failed} failed; {written} overlays written to {out_dir}/")
    return 1 if failed else 0

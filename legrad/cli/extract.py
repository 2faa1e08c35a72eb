"""``legrad extract``: heatmaps for a whole dataset, one ``.npz`` per image; resumable; runs under torchrun."""

from __future__ import annotations

import argparse
import os
import sys

from legrad.cli.options import (
    add_device_option,
    add_model_options,
    add_quiet_option,
    non_negative_int,
    positive_int,
)
from legrad.io.errors import ModelLoadError, one_line

_EPILOG = """\
examples:
  legrad extract images/ --out heatmaps/ -p "a red circle" -p "a blue square"
  legrad extract val.jsonl --out heatmaps/ --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
      --prompts-file classes.txt --batch-size 32 --workers 8
  torchrun --standalone --nproc_per_node=4 -m legrad extract images/ --out heatmaps/ --prompts-file classes.txt

INPUT is a folder (walked recursively, sorted) or a JSONL file with one {"image": path, "prompts": [...]}
per line (paths relative to the file; lines without "prompts" use -p/--prompts-file).
Outputs: OUT/<image path>.npz (maps [P, h, w] in [0, 1], prompts, similarity [P], image, image_size,
input_size, config, source) and OUT/manifest.jsonl (one line per image: output, prompts, similarities, status,
error). Rerunning the same command skips images whose output is complete and valid. Unreadable images
are recorded in the manifest and skipped; the exit status is 1 if any image failed.

One run per output folder: a second run into the same --out is refused while one is running (lock file
OUT/.legrad.lock). OUT/legrad-extract.json records the configuration (prompts, model, weights (size and
SHA-256 of a checkpoint file), sizes, dtype); a run with another configuration is refused unless you pass
--overwrite. --out is checked writable before any work.
"""


def _map_size(text: str) -> str | tuple[int, int]:
    from legrad.extract import check_map_size

    try:
        return check_map_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``legrad extract``."""
    p = subparsers.add_parser(
        "extract",
        help="heatmaps for a whole dataset (one .npz per image), resumable, distributed with torchrun",
        description="Explain every image of a folder or JSONL manifest against its prompts; rerun to resume.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="a folder of images or a .jsonl manifest")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("-p", "--prompt", dest="prompts", action="append", default=None, metavar="PROMPT",
                   help="a text prompt for every image (repeat for several)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="one prompt per line (blank lines and # comments ignored), e.g. class names")
    add_model_options(p)
    p.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                   help="data-loading worker processes per rank (default: from the available cores, at most 4, "
                        "0 on 1-2 cores; 0 = load in the main process)")
    p.add_argument("--map-size", type=_map_size, default="grid", metavar="grid|input|HxW",
                   help="stored map resolution: the patch grid (default, smallest), the explained input size, or HxW")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="stored map dtype (default float16)")
    add_device_option(p, "auto (default), cpu or cuda; under torchrun each rank uses cuda:LOCAL_RANK")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into an --out that holds results of another configuration (other prompts, "
                        "model, weights, sizes or dtype), replacing them; without it such a run is refused")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N images (try settings on a sample; rerun without it to continue)")
    add_quiet_option(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs the extraction; returns 0 if every image has a valid output, 1 if any failed, 2 on bad input.

    Under torchrun only rank 0 returns 1 for failed images (the job's exit status is still non-zero).
    """
    from legrad.extract import run as extract  # torch: only once the command runs

    prog = "legrad extract"
    # Under torchrun every rank runs this; one copy of each message is enough.
    talk = os.environ.get("RANK", "0") in ("", "0")
    try:
        result = extract(
            args.input, args.out, args.prompts, prompts_file=args.prompts_file, model=args.model,
            pretrained=args.pretrained, size=args.size, layer_index=args.layer_index, batch_size=args.batch_size,
            workers=args.workers, map_size=args.map_size, dtype=args.dtype, device=args.device, limit=args.limit,
            progress=not args.quiet, overwrite=args.overwrite,
        )
    except (TypeError, ValueError) as exc:
        if talk:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        if talk:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the disk filled up: one line, never a traceback; rerunning resumes
        print(f"{prog}: error: {one_line(exc, 400)}", file=sys.stderr)
        return 1
    if result.rank == 0:
        for image, error in result.failures[:10]:
            print(f"{prog}: failed {image}: {error}", file=sys.stderr)
        if len(result.failures) > 10:
            print(f"{prog}: ... and {len(result.failures) - 10} more (status \"error\" in the manifest)",
                  file=sys.stderr)
        procs = f" on {result.world_size} processes" if result.world_size > 1 else ""
        speed = f" ({result.images_per_second:.2f} images/s{procs})" if result.computed else procs
        print(f"{prog}: {result.total} images: {result.computed} computed, {result.skipped} already done, "
              f"{result.failed} failed{speed}; manifest: {result.manifest}")
    # Only rank 0 reports the failure: torchrun then exits non-zero without terminating the other ranks.
    return 1 if not result.ok and result.rank == 0 else 0

"""LeGrad playground: explain one image for a few prompts and save a figure.

    python playground.py                      # offline: bundled demo model and a bundled scene
    python playground.py --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --image http://images.cocodataset.org/val2017/000000039769.jpg \\
        --prompt "a photo of a cat" --prompt "a remote control" --size 448
    python playground.py --model timm:vit_base_patch16_224 --image cat.jpg --target tabby --target 285
    python playground.py --model hf:llava-dir --image cat.jpg --prompt "What is in the picture?" \\
        --answer "a cat" --answer "a dog"        # a local VLM: where it found each answer (docs/vlm.md)

Prints each prompt with its image-text similarity and writes ``outputs/playground.png`` (the image,
then one heatmap overlay per prompt). Image classifiers (``timm:``, ``torchvision:``, ``hf:`` models) take
``--target`` (a class index or name) instead of ``--prompt`` and print each target's logit and probability.

A thin entry point: the playground is ``legrad playground`` (:mod:`legrad.cli.playground`), which a
wheel install has too; here the figure goes to this checkout's ``outputs/`` by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from legrad.cli.playground import add_options, default_scene, run

__all__ = ["parse_args", "default_scene", "main"]

REPO = Path(__file__).resolve().parent
DEFAULT_OUT = REPO / "outputs" / "playground.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, DEFAULT_OUT, out_label=str(DEFAULT_OUT.relative_to(REPO)))
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the playground; returns the exit status."""
    args = parse_args(argv)
    from legrad.frontend.logs import configure_logging

    configure_logging(args.verbose)
    return run(args, prog=Path(sys.argv[0]).name)


if __name__ == "__main__":
    sys.exit(main())

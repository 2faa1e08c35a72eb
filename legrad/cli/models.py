"""``legrad models``: the models the front ends can load."""

from __future__ import annotations

import argparse

from legrad.frontend.models import TOY_NAME


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``legrad models``."""
    p = subparsers.add_parser(
        "models",
        help="list the supported (model, pretrained) pairs",
        description="List the bundled demo model and the OpenCLIP (model, pretrained) pairs LeGrad supports.",
    )
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return p


def run(args: argparse.Namespace) -> int:
    """Prints the pairs, the bundled demo model first."""
    from legrad.pretrained import list_pretrained  # the adapters and torch: only once the command runs

    pairs = list_pretrained()
    rows = [(TOY_NAME, "(bundled demo model, offline; the default)")] + [(m, t) for m, t in pairs]
    if args.markdown:
        print("| model | pretrained |\n|---|---|")
        for m, t in rows:
            print(f"| {m} | {t} |")
    else:
        width = max(len(m) for m, _ in rows)
        print(f"{'model':<{width}}  pretrained")
        for m, t in rows:
            print(f"{m:<{width}}  {t}")
    print(f"\n{len(pairs)} OpenCLIP pairs (weights download on first use), plus the bundled demo model.")
    return 0

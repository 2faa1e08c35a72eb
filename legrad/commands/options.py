"""Option groups shared by the subcommands that run a model (``explain``, ``extract``)."""

from __future__ import annotations

import argparse

from legrad.commands.argtypes import image_size, positive_int


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--pretrained``, ``--size``, ``--layer-index`` and ``--batch-size``."""
    p.add_argument("--model", default="toy",
                   help="'toy' (bundled demo model, default) or an OpenCLIP model name (see `legrad models`)")
    p.add_argument("--pretrained", default=None, metavar="TAG_OR_PATH",
                   help="pretrained tag or local checkpoint (default: the model's first tag; 'none' = random)")
    p.add_argument("--size", type=image_size, default=None, metavar="N|HxW",
                   help="explained image size, multiple of the patch size (default: the model's native size)")
    p.add_argument("--layer-index", type=int, default=None, metavar="K",
                   help="first explained block, negative counts from the end (default: the model's recommended)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")


def add_device_option(p: argparse.ArgumentParser, help: str = "auto (default), cpu or cuda[:i]") -> None:
    """``--device``."""
    p.add_argument("--device", default="auto", help=help)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet``."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

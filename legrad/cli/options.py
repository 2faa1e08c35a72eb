"""What the subcommands share: argparse ``type=`` converters and the option groups of commands that run a model.

Converters raise ``argparse.ArgumentTypeError``, so that a bad value becomes one usage line. Nothing here
imports torch: ``legrad --help`` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from legrad.frontend.options import parse_size

__all__ = ["Stop", "add_device_option", "add_model_options", "add_quiet_option", "image_size", "non_negative_int",
           "positive_int", "unit_float"]


class Stop(Exception):
    """Ends a command with exit status ``code`` after its one error line (the exception's message)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- converters
def _number(text: str, kind: type, ok: Callable[[Any], bool], expected: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def unit_float(text: str) -> float:
    """A number in [0, 1]."""
    return _number(text, float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def image_size(text: str) -> tuple[int, int] | None:
    """``N`` or ``HxW`` (see :func:`legrad.frontend.options.parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------------------------- option groups
def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--pretrained``, ``--size``, ``--layer-index`` and ``--batch-size``."""
    p.add_argument("--model", default="toy",
                   help="'toy' (bundled demo model, default), an OpenCLIP model name (see `legrad models`), or an "
                        "image classifier timm:ARCH[.TAG], torchvision:NAME or hf:REPO_OR_DIR")
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
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (ours, and the model libraries' download and loading bars)")

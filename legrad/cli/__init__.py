"""The ``legrad`` command line (also ``python -m legrad``).

Each subcommand lives in its own module of this package (``explain``, ``models``, ``extract``, ``bench``,
``playground``)
exposing ``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``; the options and
argparse converters they share are in :mod:`legrad.cli.options`. To add one, write the module and append
its import path to :data:`SUBCOMMAND_MODULES`. Every command module is imported for ``legrad --help``, so it
stays light: a command that needs torch or a model imports its body in ``run`` (``explain`` ->
:mod:`legrad.cli.explain_run`, ``bench`` -> :mod:`legrad.cli.bench_run`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from legrad import __version__
from legrad.frontend.logs import configure_logging, quiet_third_party_progress

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "main"]

#: Modules providing the subcommands, in ``--help`` order.
SUBCOMMAND_MODULES: list[str] = [
    "legrad.cli.explain",
    "legrad.cli.models",
    "legrad.cli.extract",
    "legrad.cli.bench",
    "legrad.cli.playground",
    "legrad.cli.app",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="legrad",
        description="LeGrad explainability heatmaps for Vision Transformers: CLIP/SigLIP-style vision-language "
                    "models (OpenCLIP, timm, Hugging Face transformers) and ViT image classifiers (timm, "
                    "torchvision, Hugging Face).",
        epilog="Run `legrad COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"legrad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            # One broken or missing command must not take the others down with it.
            print(f"legrad: warning: command module {name} unavailable ({exc})", file=sys.stderr)
            continue
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 on success, 1 when something failed, 2 on a usage error, 130 if interrupted
        (Ctrl-C), 143 if terminated (SIGTERM).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help/--version/usage errors
        return int(exc.code or 0)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.verbose)
    if getattr(args, "quiet", False):  # -q: no progress bar of ours, nor of the model libraries
        quiet_third_party_progress()
    previous = _handle_sigterm()
    try:
        return int(args._run(args) or 0)
    except Terminated:
        print(f"legrad {args.command}: terminated (SIGTERM); the outputs written so far are kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"legrad {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """Raised in the command's thread by SIGTERM (``kill``, timeouts, ``docker stop``, Slurm), so that it
    unwinds like Ctrl-C: ``finally`` blocks record what was written (``legrad explain``'s scores.csv)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _handle_sigterm() -> Any:
    """Makes SIGTERM raise :class:`Terminated` while a command runs; returns the handler to restore (None if
    this is not the main thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    # A handler set outside Python (None from getsignal) is restored as the default.
    return previous if previous is not None else signal.SIG_DFL

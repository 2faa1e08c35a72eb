"""``legrad app``: serve the Gradio demo (the same flags as ``python app.py``; see docs/app.md)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``legrad app``. Its help works without gradio; serving needs the ``[app]`` extra."""
    from legrad.app.server import add_arguments

    p = subparsers.add_parser(
        "app", help="serve the Gradio demo in a browser (needs: pip install 'legrad_torch[app]')",
        description="Serve the LeGrad demo page: upload an image, type prompts, see the heatmaps. By default "
                    "http://127.0.0.1:7860, the bundled demo model, offline; see docs/app.md.",
    )
    add_arguments(p, verbose=False)
    return p


def run(args: argparse.Namespace) -> int:
    """Serves the app until interrupted (exit status as :func:`legrad.app.server.serve`)."""
    from legrad.app.server import serve

    return serve(args, prog="legrad app")

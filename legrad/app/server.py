"""The demo app's flags and server: ``legrad app`` and ``python app.py`` (gradio imported only when serving)."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import sys
from typing import Any

from ..frontend.logs import configure_logging
from ..frontend.models import resolve_device
from ..io.errors import ModelLoadError
from .settings import DEFAULT_CONCURRENCY, DEFAULT_TIME_LIMIT_S, TOY_LABEL, AppSettings
from .sources import MAX_URL_BYTES, URL_DEADLINE_S, shared_folder

__all__ = ["MAX_UPLOAD_MB", "GRADIO_MISSING_MSG", "add_arguments", "build_parser", "settings_from_flags", "serve",
           "main"]

#: Default upload limit (``--max-upload-mb``).
MAX_UPLOAD_MB = 25
GRADIO_MISSING_MSG = ("gradio is not installed; install the app's extra: pip install 'legrad_torch[app]' "
                      "(in a checkout: pip install -e '.[app]')")


def add_arguments(p: argparse.ArgumentParser, verbose: bool = True) -> None:
    """Adds the app's flags to a parser (``verbose``: also ``-v``, which ``legrad`` has at the top level)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--preload", action="store_true", help="load the demo model before serving")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link (needs internet)")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="let visitors name image files inside DIR in the URL / path box (repeatable; default: "
                        "no server paths are read)")
    p.add_argument("--allow-urls", action="store_true",
                   help="let visitors give http(s) image URLs, fetched by the server (public addresses only, "
                        f"{URL_DEADLINE_S:g} s, {MAX_URL_BYTES // 2**20} MiB at most)")
    p.add_argument("--allow-downloads", action="store_true",
                   help="also list every supported OpenCLIP model with downloadable weights (over 150 entries, "
                        "0.6 to 20 GB each); a visitor's first request for one makes the server download it "
                        "and hold it in memory (default: only the demo model and the --model entries)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest upload in MiB (default {MAX_UPLOAD_MB})")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest patch-token count per explained image (default legrad.frontend.explainer."
                        "MAX_TOKENS, 16384: 1024 px on the demo model)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, metavar="SECONDS",
                   help=f"stop a request that computes longer than this (default {DEFAULT_TIME_LIMIT_S:g}; "
                        "0: no limit); the visitor is told so")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="N",
                   help=f"explanations computed at once; more wait in the queue (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="add a model to the list and select it (repeatable): an OpenCLIP name, an image "
                        "classifier timm:ARCH[.TAG], torchvision:NAME, hf:REPO_OR_DIR, or a local VLM hf:DIR "
                        "(LLaVA, LLaVA-NeXT, PaliGemma saved with its processor: question, then answers)")
    p.add_argument("--pretrained", default=None, metavar="TAG_OR_PATH",
                   help="pretrained tag or checkpoint of the --model entries ('none': random weights)")
    p.add_argument("--target", action="append", default=[], metavar="CLASS",
                   help="initial class target of a classifier --model (repeatable); --prompt for CLIP models")
    p.add_argument("-p", "--prompt", action="append", default=[], metavar="PROMPT",
                   help="initial prompt (repeatable)")
    if verbose:
        p.add_argument("-v", "--verbose", action="store_true")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``python app.py``."""
    p = argparse.ArgumentParser(prog=prog, description="LeGrad Gradio demo")
    add_arguments(p)
    return p


def settings_from_flags(args: argparse.Namespace) -> tuple[AppSettings, str]:
    """The operator's settings and the prompts box's initial text from the parsed flags.

    Raises:
        ValueError: for a bad flag (nothing is changed or loaded).
    """
    from .requests import initial_text, model_label  # torch: only once the app is served

    initial = initial_text(args.model, args.target, args.prompt)
    device = resolve_device(args.device)
    allowed_dirs = tuple(shared_folder(d) for d in args.allow_dir)
    if not args.max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if not (math.isfinite(args.time_limit) and args.time_limit >= 0):
        raise ValueError(f"--time-limit must be a number of seconds >= 0 (0: no limit), got {args.time_limit}")
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    settings = AppSettings(device=device, allowed_dirs=allowed_dirs, allow_urls=bool(args.allow_urls),
                           allow_downloads=bool(args.allow_downloads),
                           max_tokens=args.max_tokens, time_limit=args.time_limit or None,
                           extra_labels=tuple(dict.fromkeys(model_label(m, args.pretrained) for m in args.model)))
    return settings, initial


def _preload(app: Any) -> None:
    from .requests import parse_model_label

    extra_labels = app.settings.extra_labels
    if extra_labels and app.is_vlm_label(extra_labels[0]):  # a local VLM (hf:DIR)
        app.vlm_explainer(extra_labels[0])
    else:
        app.get_explainer(*parse_model_label(extra_labels[0] if extra_labels else TOY_LABEL))


def serve(args: argparse.Namespace, prog: str = "app.py") -> int:
    """Checks the flags, builds the app (:class:`~legrad.app.requests.DemoApp`) with the operator's settings
    and serves it until interrupted.

    Returns:
        The exit status: 2 for a bad flag, 1 if gradio is missing or the preloaded model cannot be loaded.
    """
    configure_logging(getattr(args, "verbose", False))
    try:
        settings, initial = settings_from_flags(args)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    # Set before gradio is imported: no usage analytics calls from an offline demo.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        print(f"{prog}: error: {GRADIO_MISSING_MSG}", file=sys.stderr)
        return 1
    # The page and the request logic load gradio and torch: imported once the flags are known to be good.
    from .page import CSS, build_demo
    from .requests import DemoApp

    app = DemoApp(settings)
    if args.preload:
        try:
            _preload(app)
        except ModelLoadError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
    extra_labels = settings.extra_labels
    demo = build_demo(app, extra_labels[0] if extra_labels else None, initial, concurrency=args.concurrency)
    # Server-side rendering (Gradio 5+) would need Node.js; keep the plain server.
    launch_params = inspect.signature(demo.launch).parameters
    extra = {"ssr_mode": False} if "ssr_mode" in launch_params else {}
    if "css" in launch_params:
        extra["css"] = CSS
    # Gradio's own start-up lines advise `share=True` in `launch()`; this app's switch is --share, so it
    # prints its own line instead (the real address, after Gradio has bound the port).
    quiet = not args.share and "quiet" in launch_params and "prevent_thread_lock" in launch_params
    if quiet:
        extra.update(quiet=True, prevent_thread_lock=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=int(args.max_upload_mb * 2**20), **extra)
    if quiet:
        print(f"{prog}: serving on {demo.local_url} (a public link: --share; stop with Ctrl-C)", flush=True)
        demo.block_thread()
    return 0


def main(argv: list[str] | None = None, prog: str = "app.py") -> int:
    """Parses the flags (``sys.argv[1:]`` when None) and serves the app until interrupted."""
    return serve(build_parser(prog).parse_args(argv), prog)

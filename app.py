"""Gradio demo of LeGrad: upload an image, type prompts, see where the model looks for each prompt.

    pip install -e '.[app]'
    python app.py                       # http://127.0.0.1:7860, bundled demo model, works offline
    python app.py --host 0.0.0.0 --port 8080 --device cuda

Real OpenCLIP models are listed too; their weights download on first use (a model that cannot be
loaded shows a message in the page). Loaded models are cached; requests are served by Gradio's queue.
``--model NAME`` (repeatable) adds models to the list, e.g. an image classifier:

    python app.py --model timm:vit_base_patch16_224 --target tabby --target 285

With a classifier selected, the prompts box takes class targets (an index or a class name, one per line).

What a visitor can make the server do is limited (see docs/app.md): by default only uploads and the
bundled examples are explained; ``--allow-dir DIR`` lets the "URL / path" box read images inside DIR,
``--allow-urls`` lets it fetch public http(s) URLs (never loopback/private addresses).

This file is the page and the flags; what a request does (input checks, model cache, path/URL policy,
:func:`predict`) is in :mod:`legrad.frontend.app_requests`, which does not import gradio.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Set before gradio is imported: no usage analytics calls from an offline demo.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from legrad.frontend.app_requests import (  # noqa: E402  (re-exported: app.predict etc. are the app's API)
    MAX_IMAGE_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    MAX_URL_BYTES,
    NO_PATH_MSG,
    NO_SOURCE_MSG,
    NO_URL_MSG,
    SETTINGS,
    TOY_LABEL,
    URL_DEADLINE_S,
    URL_FAILED_MSG,
    allowed_path,
    default_layer_for,
    forget_model,
    get_explainer,
    initial_text,
    is_classifier_label,
    model_label,
    model_labels,
    parse_model_label,
    predict,
    prompts_box_for,
    read_visitor_image,
    shared_folder,
    split_prompts,
)

__all__ = [
    "MAX_IMAGE_PIXELS", "MAX_PROMPT_CHARS", "MAX_PROMPTS", "MAX_URL_BYTES", "NO_PATH_MSG", "NO_SOURCE_MSG",
    "NO_URL_MSG", "SETTINGS", "TOY_LABEL", "URL_DEADLINE_S", "URL_FAILED_MSG", "allowed_path", "build_demo",
    "default_layer_for", "example_rows", "forget_model", "get_explainer", "initial_text", "is_classifier_label",
    "main", "model_label", "model_labels", "parse_model_label", "predict", "prompts_box_for",
    "read_visitor_image", "shared_folder", "split_prompts",
]

REPO = Path(__file__).resolve().parent
ASSETS = REPO / "assets"
#: Default upload limit (``--max-upload-mb``).
MAX_UPLOAD_MB = 25


# Gallery captions go under each overlay (Gradio draws them over the tile's bottom-right corner), and
# tiles keep the overlay's aspect ratio instead of cropping it.
CSS = """
#gallery .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }
#gallery .thumbnail-item > img { height: auto; aspect-ratio: auto; object-fit: contain; }
#gallery .caption-label { position: static; max-width: 100%; white-space: normal; overflow: visible;
  border: none; border-top: 1px solid var(--border-color-primary); border-radius: 0; opacity: 1; }
"""
#: Gradio's example table shows at most this many characters of a text cell.
EXAMPLE_TEXT_CHARS = 60


def _upload_path(payload: Any) -> str | None:
    """Replaces ``gr.Image.preprocess``: hands over the cached upload's path without opening it.

    Gradio's own preprocessing decodes the whole file with Pillow (no pixel limit, 16-bit images
    clipped, a generic error for a bad file); :func:`read_visitor_image` does that with limits instead.
    Gradio has already checked that the path is one of its uploads.
    """
    import gradio as gr

    if payload is None:
        return None
    path = getattr(payload, "path", None)
    if not path or str(getattr(payload, "url", "") or "").startswith("data:"):
        raise gr.Error("the image did not arrive as a file upload; upload it again")
    return str(path)


def _example_prompts(phrases: list[str]) -> str:
    """The scene's phrases plus a contrast phrase naming nothing in it, short enough to show in full."""
    from legrad.frontend.scenes import absent_phrase
    from legrad.toy.scenes import VOCABULARY

    words = {w for p in phrases for w in p.split()[1:]}
    others = sorted((v for v in VOCABULARY if not words & set(v.split()[1:])), key=len)
    texts = [", ".join([*phrases, v]) for v in [absent_phrase(phrases), *others]]
    fitting = [t for t in texts if len(t) <= EXAMPLE_TEXT_CHARS]
    return fitting[0] if fitting else ", ".join(phrases)


def example_rows() -> list[list[str]]:
    """Examples from the bundled scenes in ``assets/`` (image path, prompts), so the page works offline."""
    from legrad.frontend.scenes import sample_scenes

    rows = [[str(sc.path), _example_prompts(list(sc.phrases))] for sc in sample_scenes(ASSETS)]
    if rows:
        return rows
    # No assets folder (e.g. app.py copied elsewhere): draw a few scenes with the bundled generator.
    from legrad.frontend.files import atomic_writer
    from legrad.toy import scenes

    folder = Path(tempfile.gettempdir()) / "legrad_app_examples"
    for i, scene in enumerate(scenes.make_scenes(3, seed=11, n_objects=2)):
        path = folder / f"scene{i}.png"
        with atomic_writer(path) as fh:
            scene.image.save(fh, "PNG")
        rows.append([str(path), _example_prompts([o.phrase for o in scene.objects])])
    return rows


def build_demo(initial_model: str | None = None, initial_prompts: str = ""):
    """The Gradio Blocks app (not launched).

    Args:
        initial_model: the dropdown entry selected at start (the first entry when None).
        initial_prompts: the prompts box's initial text.
    """
    import gradio as gr

    labels = model_labels()
    first = initial_model if initial_model in labels else labels[0]
    # Gradio 6 takes css in launch(), older versions in Blocks(); main() passes it to launch.
    blocks_css = {"css": CSS} if "css" in inspect.signature(gr.Blocks).parameters else {}
    with gr.Blocks(title="LeGrad", analytics_enabled=False, **blocks_css) as demo:
        gr.Markdown(
            "# LeGrad\nWhere does a vision-language model look for each prompt? Upload an image (or pick an "
            "example), type prompts, press **Explain**. The bundled demo model knows phrases like "
            "*a red circle* or *a blue square*."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"],
                                 elem_id="image")
                image.preprocess = _upload_path
                hint = " or ".join(([ "https://..."] if SETTINGS.allow_urls else [])
                                   + (["a file name in the shared folder"] if SETTINGS.allowed_dirs else []))
                source = gr.Textbox(label="...or an image URL / path", placeholder=hint, elem_id="image-source",
                                    visible=bool(hint))
                prompts = gr.Textbox(lines=4, value=initial_prompts, elem_id="prompts", **prompts_box_for(first))
                model = gr.Dropdown(labels, value=first, label="Model", elem_id="model")
                with gr.Row():
                    size = gr.Textbox(label="Image size (N or HxW; blank = native)", value="", elem_id="size")
                    layer = gr.Number(value=default_layer_for(first), precision=0, label="Layer index",
                                      elem_id="layer-index")
                alpha = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Overlay opacity", elem_id="alpha")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
            with gr.Column():
                lossless = {"format": "png"} if "format" in inspect.signature(gr.Gallery).parameters else {}
                gallery = gr.Gallery(label="Heatmaps", columns=2, elem_id="gallery", interactive=False,
                                     object_fit="contain", height="auto", **lossless)
                status = gr.Markdown(elem_id="status")
        gr.Examples(example_rows(), inputs=[image, prompts], label="Demo scenes (bundled model)")
        model.change(default_layer_for, inputs=model, outputs=layer, queue=False)
        model.change(lambda lb: gr.update(**prompts_box_for(lb)), inputs=model, outputs=prompts, queue=False)
        button.click(predict, inputs=[image, source, prompts, model, size, layer, alpha],
                     outputs=[gallery, status], api_name="explain")
    demo.queue(default_concurrency_limit=2, max_size=32)
    return demo


def main(argv: list[str] | None = None) -> int:
    """Parses flags and serves the app until interrupted."""
    p = argparse.ArgumentParser(description="LeGrad Gradio demo")
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
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"largest upload in MiB (default {MAX_UPLOAD_MB})")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest patch-token count per explained image (default legrad.frontend.explainer.MAX_TOKENS, "
                        "16384: 1024 px on the demo model)")
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
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    from legrad.frontend.errors import ModelLoadError
    from legrad.frontend.logs import configure_logging
    from legrad.frontend.models import resolve_device

    configure_logging(args.verbose)
    try:
        initial = initial_text(args.model, args.target, args.prompt)
        device = resolve_device(args.device)
        allowed_dirs = tuple(shared_folder(d) for d in args.allow_dir)
        if args.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    except ValueError as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 2
    # Settings change only once every flag is valid (a refused command line leaves them as they were).
    SETTINGS.device, SETTINGS.allowed_dirs = device, allowed_dirs
    SETTINGS.allow_urls = bool(args.allow_urls)
    SETTINGS.max_tokens = args.max_tokens
    SETTINGS.extra_labels = tuple(dict.fromkeys(model_label(m, args.pretrained) for m in args.model))
    extra_labels = SETTINGS.extra_labels
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("app.py: error: gradio is not installed; run: pip install -e '.[app]'", file=sys.stderr)
        return 1
    if args.preload:
        try:
            from legrad.frontend.vlm import cached_explainer, is_vlm_dir

            if extra_labels and is_vlm_dir(extra_labels[0]):  # a local VLM (hf:DIR)
                cached_explainer(extra_labels[0], device)
            else:
                get_explainer(*parse_model_label(extra_labels[0] if extra_labels else TOY_LABEL))
        except ModelLoadError as exc:
            print(f"app.py: error: {exc}", file=sys.stderr)
            return 1
    demo = build_demo(extra_labels[0] if extra_labels else None, initial)
    # Server-side rendering (Gradio 5+) would need Node.js; keep the plain server.
    launch_params = inspect.signature(demo.launch).parameters
    extra = {"ssr_mode": False} if "ssr_mode" in launch_params else {}
    if "css" in launch_params:
        extra["css"] = CSS
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=int(args.max_upload_mb * 2**20), **extra)
    return 0



if __name__ == "__main__":
    sys.exit(main())

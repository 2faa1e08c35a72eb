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
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

# Set before gradio is imported: no usage analytics calls from an offline demo.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parent
ASSETS = REPO / "assets"
TOY_LABEL = "toy: bundled demo model (offline)"
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 200
MAX_PROMPTS_TEXT = 8000
MAX_SIZE_TEXT = 24
MAX_CACHED_MODELS = 2
#: Default upload limit (``--max-upload-mb``).
MAX_UPLOAD_MB = 25
#: Largest image decoded for a visitor (pixels), from uploads, shared folders and URLs alike.
MAX_IMAGE_PIXELS = 40_000_000
#: Largest URL download for a visitor (bytes), when ``--allow-urls`` is on.
MAX_URL_BYTES = 20 * 1024 * 1024
#: Total time for a URL download for a visitor (seconds).
URL_DEADLINE_S = 15.0

NO_SOURCE_MSG = ("this server reads no paths or URLs: upload the image instead (the server's operator can "
                 "enable them with --allow-dir / --allow-urls)")
NO_PATH_MSG = "that path is not available: this server only reads images inside the folders it shares"
NO_URL_MSG = "this server does not fetch URLs: upload the image instead (the operator can enable --allow-urls)"
URL_FAILED_MSG = ("could not load an image from that URL (unreachable, timed out, HTTP error or not an image); "
                  "try uploading it instead")

logger = logging.getLogger("legrad.app")

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

_device = "cpu"
#: Opt-ins set by :func:`main` (and by tests): real paths of shared folders, URL fetching, token limit.
_allowed_dirs: tuple[str, ...] = ()
_allow_urls = False
_max_tokens: int | None = None
#: Operator-added dropdown entries (``--model``), first after the demo model.
_extra_labels: tuple[str, ...] = ()
_cache: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
_cache_lock = threading.Lock()
_load_locks: dict[tuple[str, str | None], threading.Lock] = {}


@functools.lru_cache(maxsize=1)
def _openclip_labels() -> tuple[str, ...]:
    from legrad.frontend.models import TOY_NAME, model_choices

    return tuple(model_label(m, t) for m, t in model_choices() if m != TOY_NAME)


def _labels() -> tuple[str, ...]:
    return (TOY_LABEL, *_extra_labels, *(lb for lb in _openclip_labels() if lb not in _extra_labels))


def model_labels() -> list[str]:
    """Dropdown entries: the demo model first, then the operator's ``--model`` entries, then
    ``model · pretrained`` for each supported OpenCLIP pair."""
    return list(_labels())


def model_label(name: str, pretrained: str | None = None) -> str:
    """The dropdown entry of a model name and pretrained tag (``'timm:vit_base_patch16_224 · none'``)."""
    return f"{name.strip()} · {pretrained.strip()}" if pretrained else name.strip()


def is_classifier_label(label: str | None) -> bool:
    """Whether a dropdown entry is an image classifier (its prompts box takes class targets)."""
    from legrad.frontend.classifier_models import is_classifier_name

    try:
        return is_classifier_name(parse_model_label(label)[0])
    except ValueError:
        return False


def prompts_box_for(label: str | None) -> dict[str, Any]:
    """Label and placeholder of the prompts box for a dropdown entry (prompts, or class targets)."""
    if is_classifier_label(label):
        return {"label": "Class targets (a class index or name, one per line)", "placeholder": "281\ntiger cat"}
    return {"label": "Prompts (one per line, or comma-separated)", "placeholder": "a red circle\na blue square"}


def parse_model_label(label: str | None) -> tuple[str, str | None]:
    """``'ViT-B-16 · openai'`` -> ``('ViT-B-16', 'openai')``; the demo entry (or empty) -> ``('toy', None)``.

    Raises:
        ValueError: for an empty model name.
    """
    from legrad.frontend.models import TOY_NAME

    if not label or label == TOY_LABEL or label.strip().lower() == TOY_NAME:
        return TOY_NAME, None
    name, sep, tag = label.partition("·")
    name, tag = name.strip(), tag.strip()
    if not name:
        raise ValueError(f"invalid model choice {label!r}")
    return name, (tag or None) if sep else None


def split_prompts(text: str | None, one_per_line: bool = False) -> list[str]:
    """One prompt per line; when the text has a single line, comma-separated prompts (unless
    ``one_per_line``: class names hold commas, e.g. ``'tabby, tabby cat'``)."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines()]
    if not lines:
        return []
    parts = lines if len(lines) > 1 or one_per_line else [p.strip() for p in lines[0].split(",")]
    return [" ".join(p.split()) for p in parts if p.strip()]


def get_explainer(name: str, pretrained: str | None):
    """The cached :class:`~legrad.frontend.explainer.Explainer` for a model, loading it (once) if needed.

    Raises:
        ModelLoadError: when the model cannot be loaded.
    """
    from legrad.frontend.explainer import Explainer

    key = (name, pretrained)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        lock = _load_locks.setdefault(key, threading.Lock())
    # One loader per model; other users asking for the same model wait for it instead of loading twice.
    with lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        kwargs = {} if _max_tokens is None else {"max_tokens": _max_tokens}
        explainer = Explainer.load(name, pretrained, _device, **kwargs)
        with _cache_lock:
            _cache[key] = explainer
            while len(_cache) > MAX_CACHED_MODELS:
                _cache.popitem(last=False)
        return explainer


def default_layer_for(label: str | None) -> int:
    """The recommended ``layer_index`` of a dropdown entry."""
    from legrad.frontend.models import default_layer_index

    return default_layer_index(parse_model_label(label)[0])


def allowed_path(text: str) -> str:
    """The real path of a visitor's path if it lies inside a shared folder (``--allow-dir``).

    Relative paths are taken inside the first shared folder. Symbolic links are resolved first, so a
    link pointing out of the folder is refused like any outside path.

    Raises:
        ValueError: with the same message for every refused path (nothing is revealed about it).
    """
    if not _allowed_dirs or "\0" in text:
        raise ValueError(NO_PATH_MSG)
    candidate = text if os.path.isabs(text) else os.path.join(_allowed_dirs[0], text)
    real = os.path.realpath(candidate)
    for root in _allowed_dirs:
        if os.path.commonpath([real, root]) == root:
            return real
    raise ValueError(NO_PATH_MSG)


def read_visitor_image(image: Any, image_source: str | None):
    """The image a visitor gave: an upload (file path from Gradio, PIL image or array) or, when the
    server allows it, a path in a shared folder or a URL. Messages never name server paths.

    Raises:
        ValueError: no image, a refused source, or an unreadable image (an ``ImageLoadError``).
    """
    from legrad.frontend.errors import ImageLoadError, ImageTooLargeError
    from legrad.frontend.fetch import URLRefusedError, is_url
    from legrad.frontend.images import load_image

    if image is None:
        text = (image_source or "").strip()
        if not text:
            raise ValueError("upload an image, or paste an image URL or path")
        if len(text) > 2048:
            raise ValueError("the image URL / path is too long")
        if is_url(text):
            if not _allow_urls:
                raise ValueError(NO_URL_MSG)
            try:
                return load_image(text, name="the URL", max_pixels=MAX_IMAGE_PIXELS, allow_private_urls=False,
                                  url_deadline_s=URL_DEADLINE_S, max_url_bytes=MAX_URL_BYTES)
            except (URLRefusedError, ImageTooLargeError):
                raise
            except ImageLoadError:
                raise ValueError(URL_FAILED_MSG) from None
        if not _allowed_dirs:
            raise ValueError(NO_SOURCE_MSG if not _allow_urls else NO_PATH_MSG)
        return load_image(allowed_path(text), name=repr(text), max_pixels=MAX_IMAGE_PIXELS)
    if isinstance(image, (str, os.PathLike)):
        # An upload: Gradio hands over the path of its own cached copy; do not show it to anyone.
        return load_image(image, name="the uploaded image", max_pixels=MAX_IMAGE_PIXELS)
    if not hasattr(image, "convert"):
        import numpy as np
        from PIL import Image

        arr = np.asarray(image)
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise ValueError("the uploaded image is empty or not an image")
        image = Image.fromarray(arr)
    return load_image(image, name="the uploaded image")


def predict(
    image: Any,
    image_source: str | None,
    prompts_text: str | None,
    model_label: str | None = TOY_LABEL,
    size_text: str | None = "",
    layer_index: float | int | None = None,
    alpha: float = 0.6,
) -> tuple[list[tuple[Any, str]], str]:
    """The app's prediction: one overlay per prompt, captioned with the prompt and its similarity (for an
    image classifier: one overlay per class target, captioned with the class, its logit and probability).

    Everything cheap is validated first (prompts, size, layer, opacity, model choice, the size against
    the model's token limit); the image is read only then, and the model runs last.

    Args:
        image: the upload: the path of Gradio's cached copy, a PIL image or an array (or None).
        image_source: a URL or path, used when no image is uploaded and the server allows it.
        prompts_text: prompts, one per line or comma-separated; class targets one per line for classifiers.
        model_label: a :func:`model_labels` entry.
        size_text: explained size, ``N`` or ``HxW``; blank for the model's native size.
        layer_index: first explained block; None for the model's recommended one.
        alpha: overlay opacity.

    Returns:
        ``(gallery, status)``: ``[(overlay PIL image, caption), ...]`` and a Markdown status line. Bad
        input or a model that cannot be loaded gives an empty gallery and the reason in ``status``.
    """
    from legrad.frontend.errors import ImageLoadError, ModelLoadError
    from legrad.frontend.options import parse_size
    from legrad.viz import fit_for_display, overlay

    try:
        if prompts_text is not None and len(prompts_text) > MAX_PROMPTS_TEXT:
            raise ValueError(f"the prompts are too long (at most {MAX_PROMPTS_TEXT} characters in all)")
        classifier = is_classifier_label(model_label)
        prompts = split_prompts(prompts_text, one_per_line=classifier)
        if not prompts:
            raise ValueError("enter at least one class target (an index or a class name, one per line)"
                             if classifier else "enter at least one prompt (one per line, or comma-separated)")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise ValueError(f"each prompt must be at most {MAX_PROMPT_CHARS} characters")
        if size_text is not None and len(str(size_text)) > MAX_SIZE_TEXT:
            raise ValueError("invalid image size; use N (square) or HxW, e.g. 448 or 448x672")
        size = parse_size(size_text)
        if layer_index is not None and layer_index != "":
            if float(layer_index) != int(float(layer_index)):
                raise ValueError(f"layer index must be a whole number, got {layer_index}")
            layer_index = int(float(layer_index))
        else:
            layer_index = None
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"opacity must be in [0, 1], got {alpha}")
        if model_label and model_label not in _labels() and model_label.strip().lower() != "toy":
            raise ValueError("unknown model choice; pick one from the list")
        name, pretrained = parse_model_label(model_label)
        explainer = get_explainer(name, pretrained)
        h, w = explainer.check_size(size)
        layer = explainer.check_layer_index(layer_index)
        if explainer.is_classifier:
            explainer.encode_prompts(prompts)  # unknown class names fail here, before the image is read
        picture = read_visitor_image(image, image_source)
        result = explainer.explain(picture, prompts, size=size, layer_index=layer_index)
        shown = fit_for_display(picture)
    except ModelLoadError as exc:
        return [], f"**Could not load the model {model_label}:** {exc}"
    except (ImageLoadError, ValueError, TypeError, OverflowError) as exc:
        return [], f"**Error:** {exc}"
    except MemoryError:
        return [], "**Error:** the server ran out of memory for this request; try a smaller image size"
    except Exception as exc:  # a clear line instead of Gradio's generic error; details go to the log
        logger.exception("explanation failed")
        return [], f"**Error:** the explanation failed ({type(exc).__name__}); try a smaller size or another image"

    gallery = []
    score = "logit" if explainer.is_classifier else "similarity"
    for p, prompt in enumerate(result.prompts):
        caption = f"{prompt}: {score} {result.similarity[0, p]:.3f} (p={result.probability[0, p]:.2f})"
        gallery.append((overlay(shown, result.maps[0, p], alpha=alpha), caption))
    best = result.prompts[int(result.similarity[0].argmax())]
    status = f"{explainer.name}, layer index {layer}, {h}x{w} px: best {'class' if explainer.is_classifier else 'match'} *{best}*."
    return gallery, status


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
                hint = " or ".join(([ "https://..."] if _allow_urls else [])
                                   + (["a file name in the shared folder"] if _allowed_dirs else []))
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
                   help="add a model to the list and select it (repeatable): an OpenCLIP name or an image "
                        "classifier timm:ARCH[.TAG], torchvision:NAME, hf:REPO_OR_DIR")
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
    global _device, _allowed_dirs, _allow_urls, _max_tokens, _extra_labels
    try:
        initial = initial_text(args.model, args.target, args.prompt)
        _device = resolve_device(args.device)
        _allowed_dirs = tuple(_shared_folder(d) for d in args.allow_dir)
        if args.max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    except ValueError as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 2
    _allow_urls = bool(args.allow_urls)
    _max_tokens = args.max_tokens
    _extra_labels = tuple(dict.fromkeys(model_label(m, args.pretrained) for m in args.model))
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("app.py: error: gradio is not installed; run: pip install -e '.[app]'", file=sys.stderr)
        return 1
    if args.preload:
        try:
            get_explainer(*parse_model_label(_extra_labels[0] if _extra_labels else TOY_LABEL))
        except ModelLoadError as exc:
            print(f"app.py: error: {exc}", file=sys.stderr)
            return 1
    demo = build_demo(_extra_labels[0] if _extra_labels else None, initial)
    # Server-side rendering (Gradio 5+) would need Node.js; keep the plain server.
    launch_params = inspect.signature(demo.launch).parameters
    extra = {"ssr_mode": False} if "ssr_mode" in launch_params else {}
    if "css" in launch_params:
        extra["css"] = CSS
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False,
                max_file_size=int(args.max_upload_mb * 2**20), **extra)
    return 0


def initial_text(models: list[str], targets: list[str], prompts: list[str]) -> str:
    """The prompts box's initial text from ``--target``/``--prompt``, checked against the first ``--model``.

    Raises:
        ValueError: when targets are given for a CLIP model or prompts for a classifier.
    """
    from legrad.frontend.classifier_models import is_classifier_name

    classifier = bool(models) and is_classifier_name(models[0])
    if targets and not classifier:
        raise ValueError("--target is for image classifiers (--model timm:..., torchvision:..., hf:...); use -p")
    if prompts and classifier:
        raise ValueError(f"{models[0]} is an image classifier: give class targets with --target, not -p")
    return "\n".join(" ".join(t.split()) for t in (targets or prompts) if t.strip())


def _shared_folder(path: str) -> str:
    """The real path of an ``--allow-dir`` folder.

    Raises:
        ValueError: if it is not an existing directory.
    """
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ValueError(f"--allow-dir {path!r} is not a directory")
    return real


if __name__ == "__main__":
    sys.exit(main())

"""Gradio demo of LeGrad: upload an image, type prompts, see where the model looks for each prompt.

    pip install -e '.[app]'
    python app.py                       # http://127.0.0.1:7860, bundled demo model, works offline
    python app.py --host 0.0.0.0 --port 8080 --device cuda

Real OpenCLIP models are listed too; their weights download on first use (a model that cannot be
loaded shows a message in the page). Loaded models are cached; requests are served by Gradio's queue.
"""

from __future__ import annotations

import argparse
import inspect
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
MAX_CACHED_MODELS = 2

_device = "cpu"
_cache: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
_cache_lock = threading.Lock()
_load_locks: dict[tuple[str, str | None], threading.Lock] = {}


def model_labels() -> list[str]:
    """Dropdown entries: the demo model first, then ``model · pretrained`` for each supported OpenCLIP pair."""
    from legrad.pretrained import list_pretrained

    return [TOY_LABEL, *(f"{m} · {t}" for m, t in list_pretrained())]


def parse_model_label(label: str | None) -> tuple[str, str | None]:
    """``'ViT-B-16 · openai'`` -> ``('ViT-B-16', 'openai')``; the demo entry (or empty) -> ``('toy', None)``.

    Raises:
        ValueError: for an empty model name.
    """
    from legrad.loading import TOY_NAME

    if not label or label == TOY_LABEL or label.strip().lower() == TOY_NAME:
        return TOY_NAME, None
    name, sep, tag = label.partition("·")
    name, tag = name.strip(), tag.strip()
    if not name:
        raise ValueError(f"invalid model choice {label!r}")
    return name, (tag or None) if sep else None


def split_prompts(text: str | None) -> list[str]:
    """One prompt per line; when the text has a single line, comma-separated prompts."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines()]
    if not lines:
        return []
    parts = lines if len(lines) > 1 else [p.strip() for p in lines[0].split(",")]
    return [" ".join(p.split()) for p in parts if p.strip()]


def get_explainer(name: str, pretrained: str | None):
    """The cached :class:`~legrad.explainer.Explainer` for a model, loading it (once) if needed.

    Raises:
        ModelLoadError: when the model cannot be loaded.
    """
    from legrad.explainer import Explainer

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
        explainer = Explainer.load(name, pretrained, _device)
        with _cache_lock:
            _cache[key] = explainer
            while len(_cache) > MAX_CACHED_MODELS:
                _cache.popitem(last=False)
        return explainer


def default_layer_for(label: str | None) -> int:
    """The recommended ``layer_index`` of a dropdown entry."""
    from legrad.loading import default_layer_index

    return default_layer_index(parse_model_label(label)[0])


def predict(
    image: Any,
    image_source: str | None,
    prompts_text: str | None,
    model_label: str | None = TOY_LABEL,
    size_text: str | None = "",
    layer_index: float | int | None = None,
    alpha: float = 0.6,
) -> tuple[list[tuple[Any, str]], str]:
    """The app's prediction: one overlay per prompt, captioned with the prompt and its similarity.

    Args:
        image: uploaded PIL image (or None).
        image_source: a URL or path, used when no image is uploaded.
        prompts_text: prompts, one per line or comma-separated.
        model_label: a :func:`model_labels` entry.
        size_text: explained size, ``N`` or ``HxW``; blank for the model's native size.
        layer_index: first explained block; None for the model's recommended one.
        alpha: overlay opacity.

    Returns:
        ``(gallery, status)``: ``[(overlay PIL image, caption), ...]`` and a Markdown status line. Bad
        input or a model that cannot be loaded gives an empty gallery and the reason in ``status``.
    """
    from legrad.loading import ImageLoadError, ModelLoadError, load_image, parse_size
    from legrad.viz import overlay

    try:
        prompts = split_prompts(prompts_text)
        if not prompts:
            raise ValueError("enter at least one prompt (one per line, or comma-separated)")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
        if image is None:
            if not image_source or not image_source.strip():
                raise ValueError("upload an image, or paste an image URL or path")
            image = load_image(image_source.strip())
        elif not hasattr(image, "convert"):
            from PIL import Image

            image = Image.fromarray(image)
        image = image.convert("RGB")
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
        name, pretrained = parse_model_label(model_label)
        explainer = get_explainer(name, pretrained)
        result = explainer.explain(image, prompts, size=size, layer_index=layer_index)
    except ModelLoadError as exc:
        return [], f"**Could not load the model {model_label}:** {exc}"
    except (ImageLoadError, ValueError, TypeError) as exc:
        return [], f"**Error:** {exc}"

    gallery = []
    for p, prompt in enumerate(result.prompts):
        caption = f"{prompt}: similarity {result.similarity[0, p]:.3f} (p={result.probability[0, p]:.2f})"
        gallery.append((overlay(image, result.maps[0, p], alpha=alpha), caption))
    h, w = explainer.check_size(size)
    best = result.prompts[int(result.similarity[0].argmax())]
    status = (f"{explainer.name}, layer index {explainer.check_layer_index(layer_index)}, {h}x{w} px: "
              f"best match *{best}*.")
    return gallery, status


def example_rows() -> list[list[str]]:
    """Examples from the bundled scenes in ``assets/`` (image path, prompts), so the page works offline."""
    from legrad.loading import absent_phrase, sample_scenes

    rows = [[str(sc.path), ", ".join([*sc.phrases, absent_phrase(sc.phrases)])] for sc in sample_scenes(ASSETS)]
    if rows:
        return rows
    # No assets folder (e.g. app.py copied elsewhere): draw a few scenes with the bundled generator.
    from legrad.toy import scenes
    from legrad.viz import atomic_writer

    folder = Path(tempfile.gettempdir()) / "legrad_app_examples"
    for i, scene in enumerate(scenes.make_scenes(3, seed=11, n_objects=2)):
        path = folder / f"scene{i}.png"
        with atomic_writer(path) as fh:
            scene.image.save(fh, "PNG")
        phrases = [o.phrase for o in scene.objects]
        rows.append([str(path), ", ".join([*phrases, absent_phrase(phrases)])])
    return rows


def build_demo():
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    labels = model_labels()
    with gr.Blocks(title="LeGrad", analytics_enabled=False) as demo:
        gr.Markdown(
            "# LeGrad\nWhere does a vision-language model look for each prompt? Upload an image (or pick an "
            "example), type prompts, press **Explain**. The bundled demo model knows phrases like "
            "*a red circle* or *a blue square*."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], elem_id="image")
                source = gr.Textbox(label="...or an image URL / path", placeholder="https://... or /path/to/image.jpg",
                                    elem_id="image-source")
                prompts = gr.Textbox(label="Prompts (one per line, or comma-separated)", lines=4,
                                     placeholder="a red circle\na blue square", elem_id="prompts")
                model = gr.Dropdown(labels, value=labels[0], label="Model", elem_id="model")
                with gr.Row():
                    size = gr.Textbox(label="Image size (N or HxW; blank = native)", value="", elem_id="size")
                    layer = gr.Number(value=default_layer_for(labels[0]), precision=0, label="Layer index",
                                      elem_id="layer-index")
                alpha = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Overlay opacity", elem_id="alpha")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
            with gr.Column():
                lossless = {"format": "png"} if "format" in inspect.signature(gr.Gallery).parameters else {}
                gallery = gr.Gallery(label="Heatmaps", columns=2, elem_id="gallery", interactive=False, **lossless)
                status = gr.Markdown(elem_id="status")
        gr.Examples(example_rows(), inputs=[image, prompts], label="Demo scenes (bundled model)")
        model.change(default_layer_for, inputs=model, outputs=layer, queue=False)
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
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    from legrad.loading import ModelLoadError, configure_logging, resolve_device

    configure_logging(args.verbose)
    global _device
    try:
        _device = resolve_device(args.device)
    except ValueError as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("app.py: error: gradio is not installed; run: pip install -e '.[app]'", file=sys.stderr)
        return 1
    if args.preload:
        try:
            get_explainer("toy", None)
        except ModelLoadError as exc:
            print(f"app.py: error: {exc}", file=sys.stderr)
            return 1
    demo = build_demo()
    # Server-side rendering (Gradio 5+) would need Node.js; keep the plain server.
    extra = {"ssr_mode": False} if "ssr_mode" in inspect.signature(demo.launch).parameters else {}
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo app's Gradio page: components, examples, events and the queue (gradio imported lazily, here only).

What a request does is :meth:`legrad.app.requests.DemoApp.predict`; this module wires it to the page
and locks down the one input Gradio does not check for us, the image field's API value: every value
is checked on its real path (:func:`upload_path`), and Gradio's own download of a URL value is
switched off for that field.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..frontend.scenes import absent_phrase, sample_scenes
from ..io.fetch import is_url
from ..io.files import atomic_writer
from ..toy import scenes
from ..toy.scenes import VOCABULARY
from .settings import DEFAULT_CONCURRENCY, DEFAULT_METHOD
from .sources import UPLOAD_ONLY_MSG, SourcePolicy, checked_upload

if TYPE_CHECKING:
    from .requests import DemoApp

__all__ = ["CSS", "EXAMPLE_TEXT_CHARS", "DEFAULT_CONCURRENCY", "QUEUE_SIZE", "upload_path", "upload_folders",
           "example_rows", "build_demo"]

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
#: Requests that may wait in the queue; more are turned away at once.
QUEUE_SIZE = 32


class _Refused:
    """What :func:`upload_path` hands over for an image value that is not an upload (never a path)."""

    def __repr__(self) -> str:
        return "<refused image value>"


_REFUSED = _Refused()


def upload_path(payload: Any, policy: SourcePolicy) -> Any:
    """Replaces ``gr.Image.preprocess``: the real path of the upload, checked, without opening it.

    Gradio checks an API file value against its upload folder only when the value carries a ``meta``
    marker; without it, any ``{"path": ...}`` (a server file, a URL) reaches this function. So every
    value is checked here on its resolved real path (:func:`~legrad.app.sources.checked_upload`:
    Gradio's upload/cache folders or the bundled examples only). A refused value becomes a marker that
    :meth:`~legrad.app.requests.DemoApp.predict` answers with one fixed message; nothing is opened,
    fetched or named. Gradio's own preprocessing would also decode the whole file without a pixel
    limit; :func:`~legrad.app.sources.read_visitor_image` does that with limits instead.

    Args:
        payload: Gradio's ``ImageData``/``FileData`` (or a dict, or None).
        policy: the app's settings (its upload folders and example images).

    Returns:
        The upload's real path, None for no image, or a refused-value marker.
    """
    if payload is None:
        return None
    try:
        return checked_upload(payload, policy)
    except ValueError:
        return _REFUSED


def _no_downloads(image: Any, gr: Any) -> None:
    """Keeps Gradio from downloading a URL given as the image field's value (with its ``meta`` marker,
    Gradio fetches an ``http(s)`` path into its cache before any of our code runs): the app makes no
    outgoing connection for a visitor; URLs go through the "URL / path" box under ``--allow-urls``."""
    def refuse_urls(value: Any) -> None:
        text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else ""
        if is_url(text) or "://" in text:
            raise gr.Error(UPLOAD_ONLY_MSG)

    move, async_move = image.move_resource_to_block_cache, image.async_move_resource_to_block_cache

    def move_resource_to_block_cache(url_or_file_path: Any) -> str | None:
        refuse_urls(url_or_file_path)
        return move(url_or_file_path)

    async def async_move_resource_to_block_cache(url_or_file_path: Any) -> str | None:
        refuse_urls(url_or_file_path)
        return await async_move(url_or_file_path)

    image.move_resource_to_block_cache = move_resource_to_block_cache
    image.async_move_resource_to_block_cache = async_move_resource_to_block_cache


def upload_folders() -> tuple[str, ...]:
    """Real paths of the folders Gradio keeps uploads and cached example files in (``GRADIO_TEMP_DIR``,
    default ``<tmp>/gradio``)."""
    try:
        from gradio.utils import get_upload_folder

        folder = get_upload_folder()
    except ImportError:  # older Gradio: the same rule, spelled out
        folder = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return (os.path.realpath(folder),)


def _example_prompts(phrases: list[str]) -> str:
    """The scene's phrases plus a contrast phrase naming nothing in it, short enough to show in full."""
    words = {w for p in phrases for w in p.split()[1:]}
    others = sorted((v for v in VOCABULARY if not words & set(v.split()[1:])), key=len)
    texts = [", ".join([*phrases, v]) for v in [absent_phrase(phrases), *others]]
    fitting = [t for t in texts if len(t) <= EXAMPLE_TEXT_CHARS]
    return fitting[0] if fitting else ", ".join(phrases)


def example_rows() -> list[list[str]]:
    """Examples from the bundled demo scenes (image path, prompts), so the page works offline."""
    rows = [[str(sc.path), _example_prompts(list(sc.phrases))] for sc in sample_scenes()]
    if rows:
        return rows
    # No bundled scenes (a trimmed install): draw a few with the bundled generator.
    folder = Path(tempfile.gettempdir()) / "legrad_app_examples"
    for i, scene in enumerate(scenes.make_scenes(3, seed=11, n_objects=2)):
        path = folder / f"scene{i}.png"
        with atomic_writer(path) as fh:
            scene.image.save(fh, "PNG")
        rows.append([str(path), _example_prompts([o.phrase for o in scene.objects])])
    return rows


def build_demo(app: DemoApp, initial_model: str | None = None, initial_prompts: str = "",
               concurrency: int = DEFAULT_CONCURRENCY) -> Any:
    """The Gradio Blocks app (not launched). Also records Gradio's upload folders and the example images
    in ``app.settings`` (the only files the image field reads).

    Args:
        app: the app whose settings and request logic the page serves.
        initial_model: the dropdown entry selected at start (the first entry when None).
        initial_prompts: the prompts box's initial text.
        concurrency: explanations computed at once; further requests wait in the queue.
    """
    import gradio as gr

    labels = app.model_labels()
    first = initial_model if initial_model in labels else labels[0]
    examples = example_rows()
    settings = app.settings = dataclasses.replace(
        app.settings, upload_dirs=upload_folders(), example_files=frozenset(os.path.realpath(row[0]) for row in examples))
    # Gradio 6 takes css in launch(), older versions in Blocks(); the server passes it to launch.
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
                image.preprocess = functools.partial(upload_path, policy=settings)
                _no_downloads(image, gr)
                hint = " or ".join((["https://..."] if settings.allow_urls else [])
                                   + (["a file name in the shared folder"] if settings.allowed_dirs else []))
                source = gr.Textbox(label="...or an image URL / path", placeholder=hint, elem_id="image-source",
                                    visible=bool(hint))
                prompts = gr.Textbox(lines=4, value=initial_prompts, elem_id="prompts", **app.prompts_box_for(first))
                model = gr.Dropdown(labels, value=first, label="Model", elem_id="model")
                method = gr.Dropdown(app.method_choices(), value=DEFAULT_METHOD, elem_id="method",
                                     label="Method (the layer index applies to LeGrad)")
                with gr.Row():
                    size = gr.Textbox(label="Image size (N or HxW; blank = native)", value="", elem_id="size")
                    layer = gr.Number(value=app.default_layer_for(first), precision=0, label="Layer index",
                                      elem_id="layer-index")
                alpha = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Overlay opacity", elem_id="alpha")
                button = gr.Button("Explain", variant="primary", elem_id="explain")
            with gr.Column():
                lossless = {"format": "png"} if "format" in inspect.signature(gr.Gallery).parameters else {}
                gallery = gr.Gallery(label="Heatmaps", columns=2, elem_id="gallery", interactive=False,
                                     object_fit="contain", height="auto", **lossless)
                status = gr.Markdown(elem_id="status")
        gr.Examples(examples, inputs=[image, prompts], label="Demo scenes (bundled model)")
        model.change(app.default_layer_for, inputs=model, outputs=layer, queue=False)
        model.change(lambda lb: gr.update(**app.prompts_box_for(lb)), inputs=model, outputs=prompts, queue=False)
        button.click(app.predict, inputs=[image, source, prompts, model, size, layer, alpha, method],
                     outputs=[gallery, status], api_name="explain", concurrency_limit=concurrency)
    demo.queue(default_concurrency_limit=concurrency, max_size=QUEUE_SIZE)
    return demo

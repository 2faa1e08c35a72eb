"""The Gradio-free request logic of ``app.py``: what a visitor may ask and what answering it does.

Parsing and checking visitor input (prompts, size, layer, opacity, model choice), the model cache,
the path/URL policy (``--allow-dir``, ``--allow-urls``) and :func:`predict`. Nothing here imports
gradio, so it is testable and reusable without the UI; ``app.py`` holds the page and the flags.
The operator's opt-ins live in :data:`SETTINGS` (set by ``app.main`` and by tests).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

TOY_LABEL = "toy: bundled demo model (offline)"
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 200
MAX_PROMPTS_TEXT = 8000
MAX_SIZE_TEXT = 24
MAX_CACHED_MODELS = 2
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


@dataclass
class AppSettings:
    """The server operator's choices (set from the flags by ``app.main``).

    Attributes:
        device: torch device models load on.
        allowed_dirs: real paths of the folders visitors may read images from (``--allow-dir``).
        allow_urls: whether visitors may give public http(s) URLs (``--allow-urls``).
        max_tokens: patch-token limit per explained image; None for the Explainer's default.
        extra_labels: operator-added dropdown entries (``--model``), listed first after the demo model.
    """

    device: str = "cpu"
    allowed_dirs: tuple[str, ...] = ()
    allow_urls: bool = False
    max_tokens: int | None = None
    extra_labels: tuple[str, ...] = ()


SETTINGS = AppSettings()
_cache: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
_cache_lock = threading.Lock()
_load_locks: dict[tuple[str, str | None], threading.Lock] = {}


@functools.lru_cache(maxsize=1)
def _openclip_labels() -> tuple[str, ...]:
    from legrad.frontend.models import TOY_NAME, model_choices

    return tuple(model_label(m, t) for m, t in model_choices() if m != TOY_NAME)


def _labels() -> tuple[str, ...]:
    return (TOY_LABEL, *SETTINGS.extra_labels, *(lb for lb in _openclip_labels() if lb not in SETTINGS.extra_labels))


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
    if _is_vlm_label(label):
        return {"label": "Question (first line), then one candidate answer per line",
                "placeholder": "What is in the picture?\na cat\na dog"}
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


def _is_vlm_label(label: str | None) -> bool:
    # Only the operator's own --model entries: a visitor's text never reaches the file system.
    if not label or label not in SETTINGS.extra_labels:
        return False
    from legrad.frontend.vlm import is_vlm_dir

    return is_vlm_dir(label)


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
        kwargs = {} if SETTINGS.max_tokens is None else {"max_tokens": SETTINGS.max_tokens}
        explainer = Explainer.load(name, pretrained, SETTINGS.device, **kwargs)
        with _cache_lock:
            _cache[key] = explainer
            while len(_cache) > MAX_CACHED_MODELS:
                _cache.popitem(last=False)
        return explainer


def forget_model(name: str, pretrained: str | None) -> None:
    """Drops a model from the cache (if there); its next request loads it again."""
    with _cache_lock:
        _cache.pop((name, pretrained), None)


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
    if not SETTINGS.allowed_dirs or "\0" in text:
        raise ValueError(NO_PATH_MSG)
    candidate = text if os.path.isabs(text) else os.path.join(SETTINGS.allowed_dirs[0], text)
    real = os.path.realpath(candidate)
    for root in SETTINGS.allowed_dirs:
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
            if not SETTINGS.allow_urls:
                raise ValueError(NO_URL_MSG)
            try:
                return load_image(text, name="the URL", max_pixels=MAX_IMAGE_PIXELS, allow_private_urls=False,
                                  url_deadline_s=URL_DEADLINE_S, max_url_bytes=MAX_URL_BYTES)
            except (URLRefusedError, ImageTooLargeError):
                raise
            except ImageLoadError:
                raise ValueError(URL_FAILED_MSG) from None
        if not SETTINGS.allowed_dirs:
            raise ValueError(NO_SOURCE_MSG if not SETTINGS.allow_urls else NO_PATH_MSG)
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
        if _is_vlm_label(model_label):  # a local VLM the operator passed (--model hf:DIR)
            from legrad.frontend.vlm import predict_vlm

            return predict_vlm(image, image_source, prompts_text, model_label, alpha, SETTINGS.device, size_text,
                               layer_index)
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

def initial_text(models: list[str], targets: list[str], prompts: list[str]) -> str:
    """The prompts box's initial text from ``--target``/``--prompt``, checked against the first ``--model``.

    Raises:
        ValueError: when targets are given for a CLIP model or prompts for a classifier.
    """
    from legrad.frontend.classifier_models import is_classifier_name
    from legrad.frontend.vlm import is_vlm_dir

    # A local VLM (hf:DIR) takes -p lines: the question, then the candidate answers.
    classifier = bool(models) and is_classifier_name(models[0]) and not is_vlm_dir(models[0])
    if targets and not classifier:
        raise ValueError("--target is for image classifiers (--model timm:..., torchvision:..., hf:...); use -p")
    if prompts and classifier:
        raise ValueError(f"{models[0]} is an image classifier: give class targets with --target, not -p")
    return "\n".join(" ".join(t.split()) for t in (targets or prompts) if t.strip())


def shared_folder(path: str) -> str:
    """The real path of an ``--allow-dir`` folder.

    Raises:
        ValueError: if it is not an existing directory.
    """
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ValueError(f"--allow-dir {path!r} is not a directory")
    return real


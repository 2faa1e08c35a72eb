"""The Gradio-free request logic of the demo app: what a visitor may ask and what answering it does.

Parsing and checking visitor input (prompts, size, layer, opacity, model choice), the model cache,
the per-request time limit and :func:`predict`; where an image may come from (uploads, examples,
``--allow-dir``, ``--allow-urls``) is :mod:`legrad.frontend.app_sources`. Nothing here imports gradio,
so it is testable and reusable without the UI; :mod:`legrad.app` holds the page and the flags.
The operator's choices live in :data:`SETTINGS` (set by ``legrad.app.server.main`` and by tests).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from . import app_sources
from .app_sources import (
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MAX_URL_BYTES,
    NO_PATH_MSG,
    NO_SOURCE_MSG,
    NO_URL_MSG,
    UPLOAD_ONLY_MSG,
    URL_DEADLINE_S,
    URL_FAILED_MSG,
    checked_upload,
    shared_folder,
)

__all__ = [
    "TOY_LABEL", "MAX_PROMPTS", "MAX_PROMPT_CHARS", "MAX_PROMPTS_TEXT", "MAX_SIZE_TEXT", "MAX_CACHED_MODELS",
    "DEFAULT_TIME_LIMIT_S", "MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "MAX_URL_BYTES", "NO_PATH_MSG", "NO_SOURCE_MSG",
    "NO_URL_MSG", "UPLOAD_ONLY_MSG", "URL_DEADLINE_S", "URL_FAILED_MSG", "AppSettings", "SETTINGS", "model_labels",
    "model_label", "is_classifier_label", "prompts_box_for", "parse_model_label", "split_prompts", "get_explainer",
    "forget_model", "default_layer_for", "allowed_path", "checked_upload", "read_visitor_image", "predict",
    "initial_text", "shared_folder", "timeout_message",
]

TOY_LABEL = "toy: bundled demo model (offline)"
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 200
MAX_PROMPTS_TEXT = 8000
MAX_SIZE_TEXT = 24
MAX_CACHED_MODELS = 2
#: Default per-request time limit in seconds (``--time-limit``).
DEFAULT_TIME_LIMIT_S = 60.0


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
        upload_dirs: real paths of Gradio's upload/cache folders (set by the page when it is built); the
            image field reads files inside them only (and the example images).
        example_files: real paths of the bundled example images the page offers.
        time_limit: seconds one request may compute once its model is loaded (``--time-limit``); None
            for no limit.
    """

    device: str = "cpu"
    allowed_dirs: tuple[str, ...] = ()
    allow_urls: bool = False
    max_tokens: int | None = None
    extra_labels: tuple[str, ...] = ()
    upload_dirs: tuple[str, ...] = ()
    example_files: frozenset[str] = frozenset()
    time_limit: float | None = DEFAULT_TIME_LIMIT_S


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
    """The real path of a visitor's path if it lies inside a shared folder (``--allow-dir``); see
    :func:`legrad.frontend.app_sources.allowed_path`.

    Raises:
        ValueError: with the same message for every refused path (nothing is revealed about it).
    """
    return app_sources.allowed_path(text, SETTINGS.allowed_dirs)


def read_visitor_image(image: Any, image_source: str | None):
    """The image a visitor gave, under the operator's :data:`SETTINGS` (see
    :func:`legrad.frontend.app_sources.read_visitor_image`).

    Raises:
        ValueError: no image, a refused source, or an unreadable image (an ``ImageLoadError``).
    """
    return app_sources.read_visitor_image(image, image_source, SETTINGS)


def timeout_message(limit_s: float) -> str:
    """The status line of a request stopped by the server's time limit."""
    return (f"**Stopped:** this request ran past the server's time limit of {limit_s:g} s (set by its operator "
            "with --time-limit) and was cancelled; try a smaller image size or fewer prompts")


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
        input, a model that cannot be loaded or a request past ``SETTINGS.time_limit`` gives an empty
        gallery and the reason in ``status``.
    """
    from legrad.engine.deadline import RequestTimeoutError, check_deadline, deadline
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
        # The limit counts this request's own work, not a first model load (which has bounds of its own).
        with deadline(SETTINGS.time_limit):
            h, w = explainer.check_size(size)
            layer = explainer.check_layer_index(layer_index)
            if explainer.is_classifier:
                explainer.encode_prompts(prompts)  # unknown class names fail here, before the image is read
            picture = read_visitor_image(image, image_source)
            check_deadline()
            result = explainer.explain(picture, prompts, size=size, layer_index=layer_index)
            shown = fit_for_display(picture)
            gallery = []
            score = "logit" if explainer.is_classifier else "similarity"
            for p, prompt in enumerate(result.prompts):
                check_deadline()
                caption = f"{prompt}: {score} {result.similarity[0, p]:.3f} (p={result.probability[0, p]:.2f})"
                gallery.append((overlay(shown, result.maps[0, p], alpha=alpha), caption))
    except RequestTimeoutError as exc:
        logger.info("request stopped by the time limit (%g s)", exc.limit_s)
        return [], timeout_message(exc.limit_s)
    except ModelLoadError as exc:
        return [], f"**Could not load the model {model_label}:** {exc}"
    except (ImageLoadError, ValueError, TypeError, OverflowError) as exc:
        return [], f"**Error:** {exc}"
    except MemoryError:
        return [], "**Error:** the server ran out of memory for this request; try a smaller image size"
    except Exception as exc:  # a clear line instead of Gradio's generic error; details go to the log
        logger.exception("explanation failed")
        return [], f"**Error:** the explanation failed ({type(exc).__name__}); try a smaller size or another image"

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

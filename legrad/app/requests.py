"""The Gradio-free request logic of the demo app: what a visitor may ask and what answering it does.

:class:`DemoApp` holds the operator's :class:`~legrad.app.settings.AppSettings` and the loaded models (one
app per server, built from the flags by :func:`legrad.app.server.serve`); its :meth:`~DemoApp.predict`
parses and checks visitor input (prompts, size, layer, opacity, model choice), runs the model under the
per-request time limit and draws the overlays. Where an image may come from (uploads, examples,
``--allow-dir``, ``--allow-urls``) is :mod:`legrad.app.sources`; a local VLM's request :mod:`legrad.app.vlm`.
Nothing here imports gradio, so it is testable and reusable without the UI; :mod:`legrad.app.page` is the
page, :mod:`legrad.app.server` the flags.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from typing import Any

from ..engine.deadline import RequestTimeoutError, check_deadline, deadline
from ..frontend.classifier_models import is_classifier_name
from ..frontend.explainer import Explainer
from ..frontend.models import TOY_NAME, default_layer_index, model_choices
from ..frontend.options import parse_size
from ..frontend.vlm import VLMExplainer, is_vlm_dir, strip_prefix
from ..io.errors import ImageLoadError, ModelLoadError
from ..methods.registry import METHODS, method_names
from ..viz import fit_for_display, overlay
from . import sources
from .settings import (
    DEFAULT_METHOD,
    DEFAULT_TIME_LIMIT_S,
    MAX_CACHED_MODELS,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    MAX_PROMPTS_TEXT,
    MAX_SIZE_TEXT,
    TOY_LABEL,
    AppSettings,
    parse_alpha,
    parse_layer,
)
from .vlm import predict_vlm

__all__ = ["DemoApp", "AppSettings", "DEFAULT_TIME_LIMIT_S", "TOY_LABEL", "UNKNOWN_MODEL_MSG", "UNKNOWN_METHOD_MSG",
           "VLM_METHOD_MSG", "method_choices", "checked_method", "model_label", "parse_model_label",
           "split_prompts", "timeout_message", "initial_text"]

logger = logging.getLogger("legrad.app")

UNKNOWN_MODEL_MSG = ("unknown model choice; pick one from the list (models whose weights must be downloaded are "
                     "listed only when the server's operator enables --allow-downloads)")

#: The one message for a method value that is not a registered name (the value is not echoed).
UNKNOWN_METHOD_MSG = "unknown method choice; pick one from the list"
VLM_METHOD_MSG = "a vision-language model's answers are explained by LeGrad only; choose the method legrad"


def method_choices() -> list[tuple[str, str]]:
    """The method dropdown's ``(label, value)`` entries: every registered method (the registry's order,
    LeGrad first), labelled with its class name (``('GradCAM', 'gradcam')``)."""
    return [(METHODS[name].__name__, name) for name in method_names()]


def checked_method(method: Any) -> str:
    """A visitor's method choice: a registered name exactly (no ``"name@K"`` suffix: the layer box sets
    LeGrad's first block); None or blank for :data:`~legrad.app.settings.DEFAULT_METHOD`.

    Raises:
        ValueError: :data:`UNKNOWN_METHOD_MSG` for anything else.
    """
    if method is None or (isinstance(method, str) and not method.strip()):
        return DEFAULT_METHOD
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(UNKNOWN_METHOD_MSG)
    return method


@functools.lru_cache(maxsize=1)
def _openclip_labels() -> tuple[str, ...]:
    return tuple(model_label(m, t) for m, t in model_choices() if m != TOY_NAME)


def model_label(name: str, pretrained: str | None = None) -> str:
    """The dropdown entry of a model name and pretrained tag (``'timm:vit_base_patch16_224 · none'``)."""
    return f"{name.strip()} · {pretrained.strip()}" if pretrained else name.strip()


def parse_model_label(label: str | None) -> tuple[str, str | None]:
    """``'ViT-B-16 · openai'`` -> ``('ViT-B-16', 'openai')``; the demo entry (or empty) -> ``('toy', None)``.

    Raises:
        ValueError: for an empty model name.
    """
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


def timeout_message(limit_s: float) -> str:
    """The status line of a request stopped by the server's time limit."""
    return (f"**Stopped:** this request ran past the server's time limit of {limit_s:g} s (set by its operator "
            "with --time-limit) and was cancelled; try a smaller image size or fewer prompts")


def _checked_prompts(prompts_text: str | None, classifier: bool) -> list[str]:
    if prompts_text is not None and len(prompts_text) > MAX_PROMPTS_TEXT:
        raise ValueError(f"the prompts are too long (at most {MAX_PROMPTS_TEXT} characters in all)")
    prompts = split_prompts(prompts_text, one_per_line=classifier)
    if not prompts:
        raise ValueError("enter at least one class target (an index or a class name, one per line)"
                         if classifier else "enter at least one prompt (one per line, or comma-separated)")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
    if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
        raise ValueError(f"each prompt must be at most {MAX_PROMPT_CHARS} characters")
    return prompts


def _checked_size(size_text: str | None) -> tuple[int, int] | None:
    if size_text is not None and len(str(size_text)) > MAX_SIZE_TEXT:
        raise ValueError("invalid image size; use N (square) or HxW, e.g. 448 or 448x672")
    return parse_size(size_text)


class DemoApp:
    """One demo app: the operator's settings and the models loaded for its visitors.

    Args:
        settings: the operator's choices (default: :class:`AppSettings`'s defaults: CPU, uploads only).

    Attributes:
        settings: the :class:`AppSettings` every request of this app is answered under.
    """

    def __init__(self, settings: AppSettings | None = None) -> None:
        self.settings = settings if settings is not None else AppSettings()
        self._cache: OrderedDict[tuple[str, str | None], Explainer] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._load_locks: dict[tuple[str, str | None], threading.Lock] = {}
        self._vlm: dict[tuple[str, str], VLMExplainer] = {}
        self._vlm_lock = threading.Lock()

    def labels(self) -> tuple[str, ...]:
        """Dropdown entries: the demo model first, then the operator's ``--model`` entries; with
        ``settings.allow_downloads`` (``--allow-downloads``), then ``model · pretrained`` for each supported
        OpenCLIP pair (weights a visitor's first request downloads)."""
        extra = self.settings.extra_labels
        if not self.settings.allow_downloads:
            # A downloadable model costs gigabytes of download, disk and memory per click, and an outgoing
            # connection a visitor would cause: only the operator may opt in.
            return (TOY_LABEL, *extra)
        return (TOY_LABEL, *extra, *(lb for lb in _openclip_labels() if lb not in extra))

    def model_labels(self) -> list[str]:
        """:meth:`labels` as a list (the dropdown's choices)."""
        return list(self.labels())

    def method_choices(self) -> list[tuple[str, str]]:
        """The method dropdown's ``(label, value)`` entries (:func:`method_choices`: the method registry)."""
        return method_choices()

    def is_classifier_label(self, label: str | None) -> bool:
        """Whether a dropdown entry is an image classifier (its prompts box takes class targets)."""
        try:
            return is_classifier_name(parse_model_label(label)[0])
        except ValueError:
            return False

    def is_vlm_label(self, label: str | None) -> bool:
        """Whether a dropdown entry is a local VLM the operator passed."""
        # Only the operator's own --model entries: a visitor's text never reaches the file system.
        return bool(label) and label in self.settings.extra_labels and is_vlm_dir(label)

    def prompts_box_for(self, label: str | None) -> dict[str, Any]:
        """Label and placeholder of the prompts box for a dropdown entry (prompts, or class targets)."""
        if self.is_vlm_label(label):
            return {"label": "Question (first line), then one candidate answer per line; the question alone explains "
                             "the model's own answer",
                    "placeholder": "What is in the picture?\na cat\na dog"}
        if self.is_classifier_label(label):
            return {"label": "Class targets (a class index or name, one per line)", "placeholder": "281\ntiger cat"}
        return {"label": "Prompts (one per line, or comma-separated)", "placeholder": "a red circle\na blue square"}

    def get_explainer(self, name: str, pretrained: str | None) -> Explainer:
        """The cached :class:`~legrad.frontend.explainer.Explainer` for a model, loading it (once) if needed.

        Raises:
            ModelLoadError: when the model cannot be loaded.
        """
        key = (name, pretrained)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            lock = self._load_locks.setdefault(key, threading.Lock())
        # One loader per model; other users asking for the same model wait for it instead of loading twice.
        with lock:
            with self._cache_lock:
                if key in self._cache:
                    return self._cache[key]
            kwargs = {} if self.settings.max_tokens is None else {"max_tokens": self.settings.max_tokens}
            explainer = Explainer.load(name, pretrained, self.settings.device, **kwargs)
            with self._cache_lock:
                self._cache[key] = explainer
                while len(self._cache) > MAX_CACHED_MODELS:
                    self._cache.popitem(last=False)
            return explainer

    def forget_model(self, name: str, pretrained: str | None) -> None:
        """Drops a model from the cache (if there); its next request loads it again."""
        with self._cache_lock:
            self._cache.pop((name, pretrained), None)

    def vlm_explainer(self, name: str) -> VLMExplainer:
        """The loaded VLM for ``name`` (one kept at a time; loaded once even under concurrent requests).

        Raises:
            ModelLoadError: when it cannot be loaded.
        """
        key = (strip_prefix(name), self.settings.device)
        with self._vlm_lock:  # held while loading: a second request for the model waits instead of loading twice
            if key not in self._vlm:
                self._vlm.clear()
                self._vlm[key] = VLMExplainer.load(name, self.settings.device)
            return self._vlm[key]

    def default_layer_for(self, label: str | None) -> int:
        """The recommended ``layer_index`` of a dropdown entry."""
        return default_layer_index(parse_model_label(label)[0])

    def allowed_path(self, text: str) -> str:
        """The real path of a visitor's path if it lies inside a shared folder (``--allow-dir``); see
        :func:`legrad.app.sources.allowed_path`.

        Raises:
            ValueError: with the same message for every refused path (nothing is revealed about it).
        """
        return sources.allowed_path(text, self.settings.allowed_dirs)

    def read_visitor_image(self, image: Any, image_source: str | None) -> Any:
        """The image a visitor gave, under this app's settings (see :func:`legrad.app.sources.read_visitor_image`).

        Raises:
            ValueError: no image, a refused source, or an unreadable image (an ``ImageLoadError``).
        """
        return sources.read_visitor_image(image, image_source, self.settings)

    def predict(
        self,
        image: Any,
        image_source: str | None,
        prompts_text: str | None,
        model_label: str | None = TOY_LABEL,
        size_text: str | None = "",
        layer_index: float | int | None = None,
        alpha: float = 0.6,
        method: str | None = DEFAULT_METHOD,
    ) -> tuple[list[tuple[Any, str]], str]:
        """The app's prediction: one overlay per prompt, captioned with the prompt and its similarity (for an
        image classifier: one overlay per class target, captioned with the class, its logit and probability).

        Everything cheap is validated first (prompts, size, layer, opacity, model choice, the size against
        the model's token limit); the image is read only then, and the model runs last.

        Args:
            image: the upload: the path of Gradio's cached copy, a PIL image or an array (or None).
            image_source: a URL or path, used when no image is uploaded and the server allows it.
            prompts_text: prompts, one per line or comma-separated; class targets one per line for classifiers.
            model_label: a :meth:`model_labels` entry.
            size_text: explained size, ``N`` or ``HxW``; blank for the model's native size.
            layer_index: first explained block; None for the model's recommended one.
            alpha: overlay opacity.
            method: a registered method name (:func:`method_choices`); the layer index applies to LeGrad,
                the other methods start at their default block. None or blank: LeGrad.

        Returns:
            ``(gallery, status)``: ``[(overlay PIL image, caption), ...]`` and a Markdown status line. Bad
            input, a model that cannot be loaded or a request past ``settings.time_limit`` gives an empty
            gallery and the reason in ``status``.
        """
        try:
            method = checked_method(method)
            if self.is_vlm_label(model_label):  # a local VLM the operator passed (--model hf:DIR)
                if method != "legrad":
                    raise ValueError(VLM_METHOD_MSG)
                return predict_vlm(self, image, image_source, prompts_text, model_label, alpha, size_text, layer_index)
            classifier = self.is_classifier_label(model_label)
            prompts, size = _checked_prompts(prompts_text, classifier), _checked_size(size_text)
            layer_index, alpha = parse_layer(layer_index), parse_alpha(alpha)
            if model_label and model_label not in self.labels() and model_label.strip().lower() != "toy":
                raise ValueError(UNKNOWN_MODEL_MSG)
            name, pretrained = parse_model_label(model_label)
            explainer = self.get_explainer(name, pretrained)
            # The limit counts this request's own work, not a first model load (which has bounds of its own).
            with deadline(self.settings.time_limit):
                h, w = explainer.check_size(size)
                layer = explainer.check_layer_index(layer_index)
                if method != "legrad":
                    explainer.method(method)  # a method this model cannot run fails here, before the image is read
                if explainer.is_classifier:
                    explainer.encode_prompts(prompts)  # unknown class names fail here, before the image is read
                picture = self.read_visitor_image(image, image_source)
                check_deadline()
                result = explainer.explain(picture, prompts, size=size, layer_index=layer_index, method=method)
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
        how = f"layer index {layer}" if method == "legrad" else f"method {METHODS[method].__name__}"
        status = (f"{explainer.name}, {how}, maps at {h}x{w} px: best "
                  f"{'class' if explainer.is_classifier else 'match'} *{best}*. "
                  f"{'Logits' if explainer.is_classifier else 'Similarities'} are the model's own, at its native input size.")
        return gallery, status




def initial_text(models: list[str], targets: list[str], prompts: list[str]) -> str:
    """The prompts box's initial text from ``--target``/``--prompt``, checked against the first ``--model``.

    Raises:
        ValueError: when targets are given for a CLIP model or prompts for a classifier.
    """
    # A local VLM (hf:DIR) takes -p lines: the question, then the candidate answers.
    classifier = bool(models) and is_classifier_name(models[0]) and not is_vlm_dir(models[0])
    if targets and not classifier:
        raise ValueError("--target is for image classifiers (--model timm:..., torchvision:..., hf:...); use -p")
    if prompts and classifier:
        raise ValueError(f"{models[0]} is an image classifier: give class targets with --target, not -p")
    return "\n".join(" ".join(t.split()) for t in (targets or prompts) if t.strip())

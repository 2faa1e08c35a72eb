"""Vision-language models in the front ends: loading a local VLM with its processor, and explaining the
candidate answers to one question about one image (shared by ``legrad explain --answer``, the playground
and the demo app). Only local directories are loaded (``save_pretrained`` of the model and its processor):
nothing is downloaded."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from .errors import ModelLoadError, one_line
from .models import resolve_device

__all__ = ["VLMExplainer", "is_vlm_dir", "strip_prefix", "cached_explainer", "predict_vlm"]


def strip_prefix(name: str) -> str:
    """``hf:DIR`` -> ``DIR`` (a plain path is returned as is)."""
    name = name.strip()
    return name[3:] if name.startswith("hf:") else name


def _architectures(path: str) -> list[str]:
    import json

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return list(json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        return []


def is_vlm_dir(name: str) -> bool:
    """Whether ``name`` (``hf:DIR`` or ``DIR``) is a local folder holding a VLM legrad explains."""
    from legrad.adapters.vlm import SUPPORTED_VLM_CLASSES

    path = strip_prefix(name)
    return os.path.isdir(path) and any(a in SUPPORTED_VLM_CLASSES for a in _architectures(path))


@dataclass
class VLMExplainer:
    """A loaded VLM, its processor and its :class:`~legrad.LeWrapper`."""

    wrapper: Any
    processor: Any
    name: str

    @classmethod
    def load(cls, name: str, device: str = "auto", layer_index: int | None = None) -> VLMExplainer:
        """Loads ``hf:DIR`` (a local folder with the model and its processor) in eval mode.

        Raises:
            ModelLoadError: not a local folder, not a supported VLM, or unreadable files.
            ValueError: for an unavailable device.
        """
        from legrad import LeWrapper
        from legrad.adapters.vlm import SUPPORTED_VLM_CLASSES

        device = resolve_device(device)
        path = strip_prefix(name)
        if not os.path.isdir(path):
            raise ModelLoadError(f"{name}: answers are explained for a local VLM folder (hf:DIR, saved with "
                                 "save_pretrained together with its processor); no such folder")
        arch = [a for a in _architectures(path) if a in SUPPORTED_VLM_CLASSES]
        if not arch:
            raise ModelLoadError(f"{name}: config.json names {_architectures(path) or 'no architecture'}; supported "
                                 f"VLMs: {', '.join(SUPPORTED_VLM_CLASSES)}")
        try:
            import transformers

            model = getattr(transformers, arch[0]).from_pretrained(path, local_files_only=True).to(device).eval()
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many types for unreadable folders
            raise ModelLoadError(f"could not load the VLM in {path}: {one_line(exc)}") from exc
        return cls(LeWrapper(model, tokenizer=processor, **({} if layer_index is None else {
            "layer_index": layer_index})), processor, name)

    def inputs(self, image: Any, prompt: str) -> Any:
        """The processor output for one PIL image and one question (an image token is put in front of the
        question when it has none, except for PaliGemma, whose processor adds the image tokens itself)."""
        token = getattr(self.processor, "image_token", None)
        kind = type(self.wrapper.model).__name__
        if token and token not in prompt and not kind.startswith("PaliGemma"):
            prompt = f"{token}\n{prompt}"
        return self.processor(images=image, text=prompt, return_tensors="pt")

    def explain(self, image: Any, prompt: str, answers: list[str], layer_index: int | None = None
                ) -> tuple[Any, Any]:
        """Maps ``[P, H, W]`` (numpy, at the image's size) and the answers' summed log-probabilities ``[P]``;
        ``layer_index`` as for :meth:`legrad.LeWrapper.compute_legrad` (None: the wrapper's).

        Raises:
            TypeError, ValueError: for bad answers or inputs (before any work).
        """
        if not answers or any(not isinstance(a, str) or not a.strip() for a in answers):
            raise ValueError("give at least one non-empty answer")
        inputs = self.inputs(image, prompt)
        size = (image.height, image.width)
        maps, scores = self.wrapper.compute_legrad(image=inputs, answers=list(answers), output_size=size,
                                                   return_scores=True, layer_index=layer_index)
        return maps[0].numpy(), scores[0].float().numpy()


_cache: dict[tuple[str, str], VLMExplainer] = {}
_cache_lock = threading.Lock()


def cached_explainer(name: str, device: str) -> VLMExplainer:
    """The loaded VLM for ``name`` (one kept at a time; loaded once even under concurrent requests).

    Raises:
        ModelLoadError: when it cannot be loaded.
    """
    key = (strip_prefix(name), device)
    with _cache_lock:  # held while loading: a second request for the model waits instead of loading twice
        if key not in _cache:
            _cache.clear()
            _cache[key] = VLMExplainer.load(name, device)
        return _cache[key]


def predict_vlm(image: Any, image_source: str | None, text: str | None, name: str, alpha: float = 0.6,
                device: str = "cpu", size_text: str | None = "", layer_index: Any = None
                ) -> tuple[list[tuple[Any, str]], str]:
    """The demo app's request for a VLM: the question on the first line of ``text``, then one candidate answer
    per line. Returns ``(gallery, status)`` like :func:`legrad.frontend.app_requests.predict`.

    Raises:
        ValueError, ImageLoadError, ModelLoadError: bad input or a model that cannot be loaded (the caller turns
            them into a status line).
    """
    from legrad.engine.deadline import deadline
    from legrad.frontend.app_requests import (
        MAX_PROMPT_CHARS,
        MAX_PROMPTS,
        MAX_PROMPTS_TEXT,
        SETTINGS,
        read_visitor_image,
    )
    from legrad.viz import fit_for_display, overlay

    if text is not None and len(text) > MAX_PROMPTS_TEXT:
        raise ValueError(f"the text is too long (at most {MAX_PROMPTS_TEXT} characters in all)")
    lines = [" ".join(ln.split()) for ln in (text or "").splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError("enter the question on the first line, then at least one candidate answer per line")
    question, answers = lines[0], lines[1:]
    if len(answers) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} answers at once, got {len(answers)}")
    if any(len(s) > MAX_PROMPT_CHARS for s in lines):
        raise ValueError(f"each line must be at most {MAX_PROMPT_CHARS} characters")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {alpha}")
    if size_text is not None and str(size_text).strip():
        raise ValueError("the image size does not apply to a VLM (its processor sizes the image); leave it blank")
    layer = None
    if layer_index is not None and layer_index != "":
        if float(layer_index) != int(float(layer_index)):
            raise ValueError(f"layer index must be a whole number, got {layer_index}")
        layer = int(float(layer_index))
    explainer = cached_explainer(name, device)
    with deadline(SETTINGS.time_limit):  # the operator's --time-limit, as for the other models
        picture = read_visitor_image(image, image_source)
        maps, logp = explainer.explain(picture, question, answers, layer_index=layer)
    shown = fit_for_display(picture)
    gallery = [(overlay(shown, maps[p], alpha=alpha), f"{a}: log-prob {logp[p]:.3f}") for p, a in enumerate(answers)]
    best = answers[int(logp.argmax())]
    return gallery, f"{strip_prefix(name)}: *{question}* most likely answer *{best}*."

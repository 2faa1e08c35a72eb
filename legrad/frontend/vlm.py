"""Vision-language models in the front ends: loading a local VLM with its processor, and explaining the
candidate answers to one question about one image, or the model's own answer to it (shared by ``legrad explain --answer``, the playground
and the demo app, whose request is :mod:`legrad.app.vlm`). Only local directories are loaded
(``save_pretrained`` of the model and its processor): nothing is downloaded, no code shipped in the folder is
run, and a folder lacking some of the model's tensors is refused (:mod:`legrad.frontend.hf_checks`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..io.errors import ModelLoadError, one_line
from ..io.files import read_regular_file
from .hf_checks import NO_REMOTE_CODE, custom_code_error, refuse_custom_code, refuse_missing_weights
from .models import resolve_device

__all__ = ["VLMExplainer", "check_answer_text", "image_token_texts", "is_vlm_dir", "strip_prefix"]

#: Largest JSON file of a model folder read to find its image token (tokenizer.json of big vocabularies: ~20 MB).
_MAX_JSON = 64 * 2**20


def strip_prefix(name: str) -> str:
    """``hf:DIR`` -> ``DIR`` (a plain path is returned as is)."""
    name = name.strip()
    return name[3:] if name.startswith("hf:") else name


def _architectures(path: str) -> list[str]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return list(json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        return []


def _json(path: str) -> Any:
    try:
        return json.loads(read_regular_file(path, "model file", _MAX_JSON).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None


def image_token_texts(name: str) -> set[str]:
    """The image placeholder token of the VLM in ``hf:DIR`` as text (e.g. ``{"<image>"}``), read from the saved
    processor and tokenizer files without loading anything; empty when they do not say.

    Lets a front end refuse an answer that holds it before the model loads (see :func:`check_answer_text`).
    """
    path = strip_prefix(name)
    if not os.path.isdir(path):
        return set()
    found = set()
    for fname in ("processor_config.json", "preprocessor_config.json"):
        data = _json(os.path.join(path, fname))
        if isinstance(data, dict) and isinstance(data.get("image_token"), str) and data["image_token"]:
            found.add(data["image_token"])
    if found:
        return found
    config = _json(os.path.join(path, "config.json"))
    ids = {config.get(k) for k in ("image_token_index", "image_token_id")} if isinstance(config, dict) else set()
    ids = {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}
    if not ids:
        return set()
    tokenizer = _json(os.path.join(path, "tokenizer.json"))
    for tok in (tokenizer.get("added_tokens") or []) if isinstance(tokenizer, dict) else []:
        if isinstance(tok, dict) and tok.get("id") in ids and isinstance(tok.get("content"), str) and tok["content"]:
            found.add(tok["content"])
    decoder = _json(os.path.join(path, "tokenizer_config.json"))
    decoder = decoder.get("added_tokens_decoder") if isinstance(decoder, dict) else None
    for key, tok in decoder.items() if isinstance(decoder, dict) else []:
        if str(key) in {str(i) for i in ids} and isinstance(tok, dict) and isinstance(tok.get("content"), str):
            found.add(tok["content"])
    return {t for t in found if t}


def check_answer_text(answers: Sequence[str], tokens: set[str] | frozenset[str]) -> None:
    """Refuses an answer holding one of the model's image tokens (``tokens``, e.g. :func:`image_token_texts`).

    The image token is a placeholder that the processor expands into the image's patches, not text: an answer
    holding it cannot be scored.

    Raises:
        ValueError: naming the answer and the token.
    """
    for answer in answers:
        for token in sorted(tokens):
            if isinstance(answer, str) and token in answer:
                raise ValueError(f"answer {answer!r} contains {token!r}, this model's image token (a placeholder the "
                                 "processor fills with the image, not text an answer can hold); remove it")


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
            ModelLoadError: not a local folder, not a supported VLM, unreadable files, a folder that needs its own
                code (``CustomCodeError``) or lacks some of the model's tensors (``MissingWeightsError``).
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
        refuse_custom_code(path, name)
        try:
            import transformers

            model, info = getattr(transformers, arch[0]).from_pretrained(
                path, local_files_only=True, output_loading_info=True, **NO_REMOTE_CODE)
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True, **NO_REMOTE_CODE)
        except Exception as exc:  # transformers raises many types for unreadable folders
            refused = custom_code_error(exc, name)
            raise refused or ModelLoadError(f"could not load the VLM in {path}: {one_line(exc)}") from exc
        refuse_missing_weights(model, info, name, path)
        model = model.to(device).eval()
        return cls(LeWrapper(model, tokenizer=processor, **({} if layer_index is None else {
            "layer_index": layer_index})), processor, name)

    def check_answers(self, answers: Sequence[str]) -> None:
        """Refuses, before any compute, answers that this loaded model cannot score: empty ones, or ones holding
        its image token (as text, or as the tokenizer reads them).

        Raises:
            TypeError, ValueError: naming the answer and the problem.
        """
        from legrad.adapters.vlm.inputs import tokenize_answers

        token = getattr(self.processor, "image_token", None)
        check_answer_text(answers, {token} if isinstance(token, str) and token else set())
        adapter = self.wrapper.adapter
        for answer in answers:  # one at a time: the message names the answer, not its position
            try:
                tokenize_answers([answer], self.processor, adapter.text_config.vocab_size, adapter.image_token_id)
            except ValueError as exc:
                raise ValueError(f"answer {answer!r} cannot be scored by this model: {exc}") from None

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

    def explain_answer(self, image: Any, prompt: str, max_new_tokens: int, layer_index: int | None = None) -> Any:
        """The model's own greedy answer to ``prompt`` about one PIL image, explained token by token at the
        image's size (see :meth:`legrad.LeWrapper.explain_answer`; one row: ``maps[0]`` is ``[T, H, W]``).

        Raises:
            TypeError, ValueError: for a bad ``max_new_tokens`` or inputs (before generating).
        """
        inputs = self.inputs(image, prompt)
        return self.wrapper.explain_answer(inputs, max_new_tokens, output_size=(image.height, image.width),
                                           layer_index=layer_index)

"""``Explainer``: PIL images + prompts -> LeGrad heatmaps and image-text similarities, for the front ends.

It bundles a loaded model with its preprocess and tokenizer, resizes images with
:class:`~legrad.preprocess.LePreprocess` (so a heatmap covers the whole image, no crop), and scores
prompts with the model's own preprocess and ``encode_image`` at its native resolution (the usual CLIP
similarity). It holds no per-call state: one instance can serve several threads.

Image classifiers (``timm:``/``torchvision:``/``hf:`` models, see :mod:`legrad.frontend.classifier_models`)
take class targets (indices or names) in place of prompts; their scores are the target's logit and
softmax probability over all classes, at the model's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..adapters.drift import DriftError
from ..classifiers import class_logits
from ..engine.validation import check_layer_index
from ..io.errors import ModelLoadError
from ..io.images import MAX_ASPECT_RATIO, check_image_shape
from ..methods.base import Method
from ..methods.registry import make_method
from ..methods.targets import is_classifier
from ..preprocess import LePreprocess
from ..wrapper import LeWrapper
from .classifier_models import ClassLabels
from .models import TOY_NAME, load_model, model_layer_index, native_image_size

__all__ = ["Explainer", "Explanation", "clean_prompts", "clean_targets", "MAX_TOKENS"]

#: Default largest number of patch tokens per explained image: a 128x128 patch grid, i.e. the demo
#: model (patch 8) at 1024 px or ViT-B-16 at 2048 px. Attention work grows with its square.
MAX_TOKENS = 128 * 128


@dataclass
class Explanation:
    """Result of :meth:`Explainer.explain`.

    Attributes:
        maps: ``[B, P, H, W]`` float32 heatmaps in [0, 1] on the CPU, at the explained size.
        similarity: ``[B, P]`` CLIP models: cosine similarity of each image and prompt embedding;
            classifiers: the target class's logit.
        probability: ``[B, P]`` CLIP models: softmax over the prompts of the model's scaled similarities
            (zero-shot probabilities); classifiers: the target's softmax probability over *all* classes.
        prompts: the ``P`` prompts; for classifiers, the targets' display labels (``'tabby (281)'``).
        targets: classifiers: the ``P`` class indices; None for CLIP models.
    """

    maps: torch.Tensor
    similarity: torch.Tensor
    probability: torch.Tensor
    prompts: list[str]
    targets: list[int] | None = None


def clean_prompts(prompts: Sequence[str] | str) -> list[str]:
    """Strips prompts and checks there is at least one non-empty prompt.

    Raises:
        TypeError: if ``prompts`` is not a string or a sequence of strings.
        ValueError: if no prompt is left after stripping blanks.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    out = [" ".join(p.split()) for p in prompts]
    out = [p for p in out if p]
    if not out:
        raise ValueError("give at least one non-empty prompt, e.g. -p 'a photo of a cat'")
    return out


def clean_targets(targets: Sequence[str | int] | str | int) -> list[str | int]:
    """Strips class targets (ints, or strings holding an index or a class name), dropping blank ones.

    Raises:
        TypeError: for a target that is neither an int nor a string.
        ValueError: if no target is left.
    """
    if isinstance(targets, (str, int)):
        targets = [targets]
    if not isinstance(targets, Sequence):
        raise TypeError("targets must be a list of class indices or class names")
    out: list[str | int] = []
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (str, int)):
            raise TypeError(f"a class target must be an int or a class name, got {type(t).__name__}")
        if isinstance(t, str):
            t = " ".join(t.split())
            if not t:
                continue
        out.append(t)
    if not out:
        raise ValueError("give at least one class target, e.g. --target 281 or --target tabby")
    return out


class Explainer:
    """A model ready to explain PIL images.

    Args:
        model: an OpenCLIP model (or a ``LeWrapper``) with a supported image tower.
        preprocess: its eval preprocess (PIL -> normalised tensor).
        tokenizer: its tokenizer (list of str -> ``[N, L]`` token ids); for an image classifier its
            :class:`~legrad.frontend.classifier_models.ClassLabels` (None: class indices only).
        layer_index: default first explained block.
        name: a display name.
        max_tokens: largest patch-token count (``(H / patch) * (W / patch)``) :meth:`check_size`
            accepts; None for no limit.

    Attributes:
        max_aspect_ratio: largest longer/shorter side ratio of an image :meth:`check_images` accepts (the
            model's own preprocess scales the short side up first); None for no limit.

    Raises:
        TypeError, ValueError: from :class:`~legrad.LeWrapper` for unsupported models or layer indices.
        ModelLoadError: when legrad's re-run of the model does not match its own forward (the one-line
            :class:`~legrad.adapters.drift.DriftError`, which front ends then show like a failed load).
    """

    def __init__(self, model: Any, preprocess: Callable, tokenizer: Callable, layer_index: int = -2,
                 name: str = "model", max_tokens: int | None = MAX_TOKENS):
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        try:
            self.wrapper = model if isinstance(model, LeWrapper) else LeWrapper(
                model, layer_index=layer_index, tokenizer=None if isinstance(tokenizer, ClassLabels) else tokenizer)
        except DriftError as exc:
            raise ModelLoadError(f"{name}: {exc}") from exc
        self.preprocess = preprocess
        if self.is_classifier and not isinstance(tokenizer, ClassLabels):
            tokenizer = ClassLabels(self.wrapper.adapter.num_classes)
        self.tokenizer = tokenizer
        self.name = name
        self.max_tokens = max_tokens
        self.native_size = native_image_size(self.wrapper.model)
        self.max_aspect_ratio: float | None = MAX_ASPECT_RATIO
        self.methods: dict[str, Method] = {}  # built once per name: no re-wrapping per request

    @classmethod
    def load(cls, name: str = TOY_NAME, pretrained: str | None = None, device: str = "cpu",
             layer_index: int | None = None, max_tokens: int | None = MAX_TOKENS) -> Explainer:
        """Loads a model with :func:`legrad.frontend.models.load_model` and wraps it (layer index: the model's default).

        ``max_tokens``: see the class arguments.

        Raises:
            ModelLoadError: when the model cannot be loaded.
        """
        model, preprocess, tokenizer = load_model(name, pretrained, device)
        li = layer_index if layer_index is not None else model_layer_index(model, name)
        label = name if pretrained is None else f"{name} ({pretrained})"
        return cls(model, preprocess, tokenizer, layer_index=li, name=label, max_tokens=max_tokens)

    @property
    def is_classifier(self) -> bool:
        """Whether the model is an image classifier (class targets instead of text prompts)."""
        return is_classifier(self.wrapper.adapter)

    @property
    def labels(self) -> ClassLabels | None:
        """A classifier's class names and target resolution; None for CLIP models."""
        return self.tokenizer if self.is_classifier else None

    @property
    def device(self) -> torch.device:
        return self.wrapper.adapter.device()

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.wrapper.adapter.patch_size)

    def check_size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        """The explained ``(height, width)``: ``size`` or the native size, checked against the patch size
        and the token limit (``max_tokens``), before any work.

        Raises:
            TypeError: if ``size`` is not None or a pair of ints.
            ValueError: if a side is not a positive multiple of the patch size (the message suggests the
                nearest valid size), or the size has more patch tokens than ``max_tokens``.
        """
        if size is not None:
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in size)):
                raise TypeError(f"size must be None or a (height, width) pair of ints, got {size!r}")
        h, w = self.native_size if size is None else size
        ph, pw = self.patch_size
        if h < 1 or w < 1:
            raise ValueError(f"image size {h}x{w} must be positive; use e.g. {max(ph, pw)} or leave it native")
        if h % ph or w % pw or h < ph or w < pw:
            near_h = max(ph, round(h / ph) * ph)
            near_w = max(pw, round(w / pw) * pw)
            suggestion = f"{near_h}" if near_h == near_w else f"{near_h}x{near_w}"
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the model's patch size {ph}x{pw}; use e.g. {suggestion}"
            )
        tokens = (h // ph) * (w // pw)
        if self.max_tokens is not None and tokens > self.max_tokens:
            side = int(self.max_tokens ** 0.5) * min(ph, pw)
            raise ValueError(
                f"image size {h}x{w} needs {tokens} patch tokens, more than the limit of {self.max_tokens} "
                f"(e.g. {side}x{side} is the largest square); use a smaller size"
            )
        return (int(h), int(w))

    def check_images(self, images: Sequence[Image.Image] | Image.Image) -> list[Image.Image]:
        """The images as a list of RGB PIL images, checked before any preprocessing.

        Raises:
            TypeError: for a value that is not a PIL image.
            ValueError: no images, an empty image, or one more elongated than ``max_aspect_ratio`` (an
                ``ImageTooLargeError``: the model's preprocess would scale its short side up first).
        """
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("no images to explain")
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"image {i} is a {type(im).__name__}; pass PIL images (legrad.io.images.load_image reads files)")
            if im.width < 1 or im.height < 1:
                raise ValueError(f"image {i} is empty ({im.width}x{im.height} pixels); pass an image with pixels")
            check_image_shape(im.width, im.height, f"image {i}", None, self.max_aspect_ratio)
        return [im if im.mode == "RGB" else im.convert("RGB") for im in images]

    def check_layer_index(self, layer_index: int | None) -> int:
        """The layer index to use (the wrapper's default when None), validated.

        Raises:
            TypeError, ValueError: if it is not an int in range for this tower.
        """
        if layer_index is None:
            return self.wrapper.layer_index
        return check_layer_index(layer_index, self.wrapper.adapter.depth)

    def clean(self, prompts: Sequence[str | int] | str | int) -> list:
        """:func:`clean_targets` for classifiers, :func:`clean_prompts` otherwise."""
        return clean_targets(prompts) if self.is_classifier else clean_prompts(prompts)

    def target_labels(self, targets: torch.Tensor) -> list[str]:
        """Display labels of class indices ``[P]`` (``'tabby (281)'``)."""
        return [self.labels.label(int(t)) for t in targets]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str | int]) -> torch.Tensor:
        """``[P, D]`` normalised text embeddings on the model's device; for classifiers, the ``[P]`` class
        indices of the targets (indices or names).

        Raises:
            ValueError: for a classifier target that is out of range or names no class (the message lists
                close class names).
        """
        if self.is_classifier:
            return self.tokenizer(list(prompts))
        tokens = self.tokenizer(list(prompts)).to(self.device)
        emb = self.wrapper.model.encode_text(tokens)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def similarity(self, images: Sequence[Image.Image], text_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities ``[B, P]`` and zero-shot probabilities ``[B, P]`` (CPU, float32); for
        classifiers (``text_embedding``: class indices ``[P]``), the targets' logits and their softmax
        probabilities over all classes."""
        model = self.wrapper.model
        images = self.check_images(images)
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device, self._dtype())
        if self.is_classifier:
            logits = class_logits(self.wrapper, batch).float().cpu()
            idx = text_embedding.long().cpu()
            return logits[:, idx], logits.softmax(-1)[:, idx]
        img = torch.nn.functional.normalize(model.encode_image(batch).float(), dim=-1)
        cos = img @ text_embedding.float().T
        scale = getattr(model, "logit_scale", None)
        scale = scale.exp().float() if isinstance(scale, torch.Tensor) else torch.tensor(100.0)
        bias = getattr(model, "logit_bias", None)
        logits = cos * scale + (bias.float() if isinstance(bias, torch.Tensor) else 0.0)
        return cos.cpu(), logits.softmax(-1).cpu()

    def method(self, name: str) -> Method:
        """The registered method ``name`` (:data:`legrad.methods.METHODS`, ``"name@K"`` too) on this model.

        Raises:
            ValueError: for an unknown name; TypeError where the method does not apply to the model.
        """
        if name not in self.methods:
            self.methods[name] = make_method(name, self.wrapper)
        return self.methods[name]

    def heatmaps(self, images: Sequence[Image.Image], text_embedding: torch.Tensor,
                 size: tuple[int, int] | None = None, layer_index: int | None = None,
                 method: str = "legrad") -> torch.Tensor:
        """``[B, P, H, W]`` heatmaps (CPU float32) of the images resized to ``size`` (native when None).

        ``method``: a registered method name; ``layer_index`` applies to LeGrad (other methods take their
        first block from ``"name@K"``).
        """
        h, w = self.check_size(size)
        images = self.check_images(images)
        prep = LePreprocess(self.preprocess, (h, w))
        batch = torch.stack([prep(im) for im in images]).to(self.device, self._dtype())
        if method != "legrad":
            return self.method(method).attribute(batch, target=text_embedding).float().cpu()
        if self.is_classifier:
            maps = self.wrapper.compute_legrad(image=batch, target=text_embedding, layer_index=layer_index)
        else:
            maps = self.wrapper.compute_legrad(text_embedding, image=batch, layer_index=layer_index)
        return maps.float().cpu()

    def explain(self, images: Sequence[Image.Image] | Image.Image, prompts: Sequence[str | int] | str | int,
                size: tuple[int, int] | None = None, layer_index: int | None = None,
                method: str = "legrad") -> Explanation:
        """Heatmaps and similarities of every image with every prompt.

        Args:
            images: RGB PIL images (one or a list).
            prompts: the prompts; for classifiers, class targets (ints, or class indices/names as str).
            size: explained ``(height, width)``; the model's native size when None.
            layer_index: first explained block; the explainer's default when None.
            method: a registered method name (:data:`legrad.methods.METHODS`).

        Returns:
            An :class:`Explanation`.

        Raises:
            TypeError, ValueError: on bad or empty images, prompts, size or layer index, before any computation.
        """
        images = self.check_images(images)
        prompts = self.clean(prompts)
        self.check_size(size)
        self.check_layer_index(layer_index)
        if method != "legrad":
            self.method(method)  # an unknown name or a method the model cannot run fails before any work
        text = self.encode_prompts(prompts)
        cos, prob = self.similarity(images, text)
        maps = self.heatmaps(images, text, size, layer_index, method)
        if self.is_classifier:
            return Explanation(maps=maps, similarity=cos, probability=prob, prompts=self.target_labels(text),
                               targets=[int(t) for t in text])
        return Explanation(maps=maps, similarity=cos, probability=prob, prompts=prompts)

    def _dtype(self) -> torch.dtype:
        dt = self.wrapper.adapter.param_dtype()
        return dt if dt.is_floating_point else torch.float32

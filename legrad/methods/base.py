"""The method protocol: ``Method(model, **options).attribute(inputs, target=..., **call_options)``.

A method is built once per model (the model is wrapped, and the drift guard run, once: not per call)
and returns ``[B, P, H, W]`` maps. :class:`Run` is the validated call the map-based baselines share: the
pipeline's prologue (:func:`legrad.engine.pipeline.prepare`) and epilogue (:func:`~legrad.engine.pipeline.finish`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..adapters.base import TowerAdapter
from ..engine import pipeline
from ..engine.validation import check_layer_index
from ..wrapper import LeWrapper
from .targets import ANSWERS, Answers, Target, as_target, target_kind

__all__ = ["Method", "BaselineMethod", "Run", "image_input"]


def image_input(inputs: Any) -> Any:
    """The image batch of ``inputs``: captum passes its inputs as a 1-tuple of tensors."""
    if isinstance(inputs, tuple) and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    return inputs


class Method:
    """An explanation method bound to a model.

    Subclasses set :attr:`name`, :attr:`options` (their constructor options and defaults) and implement
    :meth:`maps`.

    Args:
        model: anything :class:`~legrad.LeWrapper` accepts (open_clip, Hugging Face, timm, torchvision, VLMs
            where the method applies), or a ``LeWrapper`` (used as is: its settings apply).
        **options: the method's options (:attr:`options`).

    Raises:
        TypeError: for an unknown option, or a model the method does not apply to.
    """

    #: Registry name (:mod:`legrad.methods.registry`).
    name: ClassVar[str] = ""
    #: Constructor options and their defaults.
    options: ClassVar[dict[str, Any]] = {}
    #: The option ``"name@K"`` sets (the first explained block), None if the method has none.
    first_block: ClassVar[str | None] = None
    #: Whether the method explains vision-language models' answers.
    explains_answers: ClassVar[bool] = False

    def __init__(self, model: Any, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; its options: {valid}")
        self.config: dict[str, Any] = {**self.options, **options}
        self.wrapper: LeWrapper = model if isinstance(model, LeWrapper) else LeWrapper(model, **self.wrap_options())
        if target_kind(self.wrapper.adapter) == ANSWERS and not self.explains_answers:
            raise TypeError(f"{type(self).__name__} does not apply to vision-language models "
                            f"({self.wrapper.tower_family}); use LeGrad")

    def wrap_options(self) -> dict[str, Any]:
        """``LeWrapper`` arguments used when the method wraps a bare model."""
        return {}

    def start_block(self, depth: int) -> int:
        """The ``start_layer`` option as a block index in ``[0, depth)`` (negative counts from the end).

        Raises:
            ValueError: if it is not a valid block index for ``depth`` blocks.
        """
        return check_layer_index(self.config["start_layer"], depth, "start_layer") % depth

    def attribute(self, inputs: Any, target: Any = None, *, normalize: bool = True, **call_options: Any
                  ) -> torch.Tensor | tuple[torch.Tensor]:
        """Maps of ``inputs`` for ``target``.

        Args:
            inputs: ``[B, C, H, W]`` preprocessed images (or a 1-tuple of it, as captum passes them), or a
                VLM's processor output.
            target: a :class:`~legrad.methods.targets.Target`, or a plain value
                :func:`~legrad.methods.targets.as_target` resolves (text embeddings, class indices, a
                score function, strings).
            normalize: min-max normalise each map to [0, 1]; False: the raw relevance (summed over
                layers, upsampled), comparable across prompts and images.
            **call_options: per-call options of the method.

        Returns:
            ``[B, P, H, W]`` float32 maps on the images' device; a 1-tuple of them for a 1-tuple of images
            (captum's convention: explanations shaped as the inputs).

        Raises:
            TypeError, ValueError: on invalid inputs, before any work.
            NotImplementedError: where the method cannot explain this tower.
        """
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {type(normalize).__name__}")
        image = image_input(inputs)
        maps = self.maps(image, as_target(target, self.wrapper.adapter), normalize, **call_options)
        return (maps,) if image is not inputs else maps

    __call__ = attribute

    def maps(self, image: Any, target: Target, normalize: bool, **call_options: Any) -> torch.Tensor:
        """The method itself, on a resolved target (see :meth:`attribute`)."""
        raise NotImplementedError

    def no_call_options(self, call_options: dict[str, Any]) -> None:
        """Refuses per-call options, for methods that take none.

        Raises:
            TypeError: naming the unknown options.
        """
        if call_options:
            raise TypeError(f"{type(self).__name__}.attribute got unknown option(s) {sorted(call_options)}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({self.wrapper.tower_family}{', ' if opts else ''}{opts})"


class Run:
    """Validated inputs of one baseline call, on the tower's device and compute dtype (the pipeline's prologue).

    The baselines have no empty-prompt correction and bound their own working sets.
    """

    def __init__(self, wrapper: LeWrapper, image: Any, target: Target):
        if isinstance(target, Answers):
            raise TypeError("answers are explained on vision-language models, by LeGrad only")
        request = pipeline.Request(image=image, target=target, layer_index=-1)
        self.call = pipeline.prepare(wrapper.adapter, wrapper.model, request,
                                     pipeline.Settings(tokenizer=wrapper.tokenizer, apply_correction=False),
                                     check_budget=False)
        self.adapter: TowerAdapter = wrapper.adapter
        self.image = self.call.batch.pixels
        self.text = self.call.prompts
        self.dtype = self.call.compute_dtype
        self.grid = self.call.batch.grids[0]
        self.batch = self.call.batch.batch
        self.prompts = self.call.num_prompts

    def scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, P]`` of the model's output ``[B, E]``: the target's (cosine, logits, score function)."""
        return self.call.scorer(embedding, self.text)

    def finish(self, rel: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, P, N]`` (or ``[B, 1, N]`` for prompt-independent maps) -> ``[B, P, H, W]``."""
        # Normalise before casting to float32: min-max amplifies rounding where a map's range is small.
        maps = pipeline.finish(self.call, rel, work_dtype=None, normalize=normalize)
        if maps.shape[1] != self.prompts:
            maps = maps.expand(-1, self.prompts, -1, -1).contiguous()
        return maps


class BaselineMethod(Method):
    """The comparison methods (raw attention, rollout, GradCAM, CheferCAM): they read the blocks themselves,
    so the wrapper's own layer index only has to be valid (the last block)."""

    def wrap_options(self) -> dict[str, Any]:
        return {"layer_index": -1}

"""``LeWrapper``: an OpenCLIP model that can also explain what its image tower sees.

The facade only: validation and the method are :mod:`legrad.engine` (:func:`legrad.engine.pipeline.run`),
the model families :mod:`legrad.adapters`."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from .adapters.base import TowerAdapter
from .adapters.drift import check_drift
from .adapters.registry import tower_adapter_for, unwrap_compiled
from .engine import pipeline
from .engine.budget import DEFAULT_MAX_TOKENS
from .engine.scores import LeGradOutput
from .engine.targets import Answers, Classes, Score, Target, Text
from .engine.validation import check_layer_index

__all__ = ["LeWrapper"]

# Attributes that live on the wrapper itself; everything else is the wrapped model's.
_OWN_ATTRS = frozenset({"_model", "_adapter", "_layer_index", "_tokenizer", "_empty_text_embedding",
                        "apply_correction", "correction_threshold", "max_memory", "max_tokens", "_reference",
                        "_verify"})


class _Unset:
    """An argument that was not given (None is a value of its own: "the default" or "no limit")."""

    def __repr__(self) -> str:
        return "<not given>"


_UNSET: Any = _Unset()
# What an omitted argument means for a new wrapper (re-wrapping keeps the inner wrapper's settings instead).
_DEFAULTS = dict(layer_index=None, tokenizer=None, empty_text_embedding=None, apply_correction=None,
                 correction_threshold=None, max_memory=None, max_tokens=DEFAULT_MAX_TOKENS, reference=None,
                 verify=True)


class LeWrapper:
    """Wraps an OpenCLIP model and adds LeGrad heatmaps, leaving the model untouched.

    Every attribute and method of the wrapped model is reachable through the wrapper (it delegates;
    nothing is copied): ``encode_image``, ``encode_text``, ``forward``/``__call__``, ``logit_scale``,
    ``visual``, ``state_dict()`` (same keys as the plain model), ``.to()``/``.eval()``/``.half()`` (which
    return the wrapper). Heatmaps are computed statelessly from the model's weights: no hooks, no
    rebinding of ``forward``, no writes, eval semantics whatever ``model.training`` says, and calls
    from several threads are safe.

    Args:
        model: an OpenCLIP ``CLIP``/``CustomTextCLIP``/``CoCa`` model with a supported image tower, a
            ViT image classifier (timm, torchvision, transformers: see :mod:`legrad.classifiers`), or a
            ``LeWrapper``: every argument given here (None included) replaces its setting, every
            omitted one keeps it. A ``torch.compile``'d model is unwrapped to its original module
            (``_orig_mod``, which it shares its weights with): the wrapper delegates to that module, and
            nothing legrad does traces or compiles it.
        layer_index: first transformer block used; negative values count from the end (``-2``: the
            last two blocks). None (default): the model's recommended index if it declares one as
            an int attribute ``legrad_layer_index`` (the bundled demo model does: 6), else ``-2``.
        tokenizer: optional tokenizer, used by towers that need an auxiliary prompt (SigLIP's
            empty-prompt correction), or a VLM's processor (tokenises string answers).
        empty_text_embedding: optional precomputed ``[D]`` embedding of that auxiliary prompt.
        apply_correction: apply the empty-prompt correction on towers that use it (None: True).
        correction_threshold: threshold of that correction (None: 0.8).
        max_memory: memory budget of one call in bytes, checked before any work against an estimate
            (see :mod:`legrad.engine.budget`); None: 80% of the memory available on the tower's device.
        max_tokens: largest number of patch tokens per image (a ValueError before any work); None: no limit.
        reference: None (default): legrad's maps; ``"1.1"``: the maps of the original package, legrad-torch
            1.1, where they differ (SigLIP/SigLIP2 and CoCa towers; see docs/differences.md).
            Omitted: :data:`legrad.engine.budget.DEFAULT_MAX_TOKENS` (16384).
        verify: compare legrad's re-run of the tower with the model's own forward on one noise image
            (about two forwards; see :mod:`legrad.adapters.drift`); omitted: True. False skips the check,
            at your own risk: if the installed library computes the tower differently, the maps are
            silently wrong.

    Raises:
        TypeError: if the image tower is not supported (the message lists the supported families).
        ValueError: if ``layer_index`` is out of range for the tower's depth, or ``reference`` is unknown or
            names a release that never supported this tower.
        DriftError: (``legrad.DriftError``, a ValueError and a RuntimeError) if ``verify`` and the re-run
            differs from the model's own forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_index: int | None = _UNSET,
        tokenizer: Any = _UNSET,
        empty_text_embedding: torch.Tensor | None = _UNSET,
        apply_correction: bool | None = _UNSET,
        correction_threshold: float | None = _UNSET,
        max_memory: float | None = _UNSET,
        max_tokens: int | None = _UNSET,
        reference: str | None = _UNSET,
        verify: bool = _UNSET,
    ):
        given = dict(layer_index=layer_index, tokenizer=tokenizer, empty_text_embedding=empty_text_embedding,
                     apply_correction=apply_correction, correction_threshold=correction_threshold,
                     max_memory=max_memory, max_tokens=max_tokens, reference=reference, verify=verify)
        if isinstance(model, LeWrapper):  # re-wrapping: an omitted argument keeps the inner wrapper's setting
            kept = {name: getattr(model, "_" + name if name == "verify" else name) for name in given}
            model = model.model
        else:
            kept = dict(_DEFAULTS)
        # A torch.compile'd model: its original module. The maps re-run the tower from the weights (which the
        # two share) and the drift guard compares against the original forward, so nothing is compiled.
        model = unwrap_compiled(model)
        s = {name: kept[name] if value is _UNSET else value for name, value in given.items()}
        if s["layer_index"] is None:
            hint = getattr(model, "legrad_layer_index", None)
            s["layer_index"] = hint if isinstance(hint, int) and not isinstance(hint, bool) else -2
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LeWrapper expects an OpenCLIP model or a ViT classifier (torch.nn.Module), got {type(model).__name__}"
            )
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_adapter", tower_adapter_for(model))
        pipeline.reference_adapter(self._adapter, s["reference"])  # fails here, not at the first call
        object.__setattr__(self, "_reference", s["reference"])
        object.__setattr__(self, "_tokenizer", s["tokenizer"])
        object.__setattr__(self, "_empty_text_embedding", s["empty_text_embedding"])
        correction, threshold = s["apply_correction"], s["correction_threshold"]
        object.__setattr__(self, "apply_correction", bool(True if correction is None else correction))
        object.__setattr__(self, "correction_threshold", float(0.8 if threshold is None else threshold))
        object.__setattr__(self, "max_memory", s["max_memory"])
        object.__setattr__(self, "max_tokens", s["max_tokens"])
        object.__setattr__(self, "_verify", bool(s["verify"]))
        self.layer_index = s["layer_index"]
        if self._verify:  # after the argument checks: the comparison costs about two forwards
            check_drift(self._adapter, model)

    # ------------------------------------------------------------------ delegation
    @property
    def model(self) -> nn.Module:
        """The wrapped (unmodified) model."""
        return self._model

    @property
    def adapter(self) -> TowerAdapter:
        """The tower adapter used for this model's image tower."""
        return self._adapter

    @property
    def tower_family(self) -> str:
        """Human-readable name of the image tower family."""
        return self._adapter.family

    @property
    def layer_index(self) -> int:
        """First explained block (as given: may be negative)."""
        return self._layer_index

    @layer_index.setter
    def layer_index(self, value: int) -> None:
        object.__setattr__(self, "_layer_index", check_layer_index(value, self._adapter.depth))

    @property
    def reference(self) -> str | None:
        """The original release whose maps this wrapper reproduces (None: legrad's own maps)."""
        return self.__dict__.get("_reference")  # absent from wrappers pickled before the setting existed

    @property
    def tokenizer(self) -> Any:
        """Tokenizer of the correction's empty prompt (None if not given)."""
        return self._tokenizer

    @property
    def empty_text_embedding(self) -> torch.Tensor | None:
        """Precomputed ``[D]`` embedding of the correction's empty prompt (None if not given)."""
        return self._empty_text_embedding

    def settings(self) -> pipeline.Settings:
        """This wrapper's per-model settings, as :func:`legrad.engine.pipeline.run` takes them."""
        return pipeline.Settings(tokenizer=self._tokenizer, empty_text_embedding=self._empty_text_embedding,
                                 apply_correction=self.apply_correction,
                                 correction_threshold=self.correction_threshold, max_memory=self.max_memory,
                                 max_tokens=self.max_tokens, reference=self.reference)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails, i.e. for the wrapped model's attributes.
        model = self.__dict__.get("_model")
        if model is None:
            raise AttributeError(name)
        attr = getattr(model, name)
        if inspect.ismethod(attr) and attr.__self__ is model:
            return _rewrap_self(self, model, attr)
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN_ATTRS or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            setattr(self._model, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _OWN_ATTRS:
            raise AttributeError(f"cannot delete {name}")
        delattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._model)))

    def __repr__(self) -> str:
        return f"LeWrapper(layer_index={self._layer_index}, tower={self._adapter.family!r},\n  model={self._model!r})"

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    # ------------------------------------------------------------------ LeGrad
    def compute_legrad(
        self,
        text_embedding: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        *,
        target: Any = None,
        layer_index: int | None = None,
        prompt_chunk: int | None = None,
        output_size: str | tuple[int, int] | None = None,
        return_scores: bool = False,
        answers: Any = None,
        **inputs: Any,
    ) -> torch.Tensor | LeGradOutput:
        """LeGrad heatmaps, one per (image, prompt), for any supported tower.

        Args:
            text_embedding: ``[P, D]`` prompts shared by all images, or ``[B, P, D]`` per image;
                normalised embeddings as ``encode_text(..., normalize=True)`` returns (used as given).
                Not for image classifiers.
            target: instead of ``text_embedding``: a target of :mod:`legrad.engine.targets` (``Text``,
                ``Classes``, ``Answers``, ``Score``); a function of the readout returning ``[B, P]`` scores
                (a ``Score``); or, for image classifiers, class indices: an int, a sequence of ints or a
                LongTensor ``[P]`` shared by the batch, or ``[B, P]`` per image; each map explains that
                class's logit (see :mod:`legrad.classifiers`).
            image: ``[B, C, H, W]`` float images, preprocessed; H and W multiples of the patch size.
            layer_index: overrides the wrapper's ``layer_index`` for this call.
            prompt_chunk: prompts per batched backward (bounds memory); default from a memory budget.
            output_size: None for the input size ``[H, W]``; ``"grid"`` for the patch grid ``[gh, gw]``
                (min-max normalised there, no upsampling: upsampling it bilinearly and min-max
                normalising again gives the default output); ``(h, w)`` for that size (bilinear).
            return_scores: also return, from the same forward pass, the model's own image embeddings
                ``[B, D]`` (L2-normalised) and the image-prompt cosine similarities ``[B, P]`` (for
                classifiers: the logits ``[B, K]`` and the targets' logits), as a
                :class:`~legrad.engine.scores.LeGradOutput` ``(maps, image_features, scores)``.
            **inputs: extra image inputs of families that need them (Hugging Face ``Siglip2Model``:
                ``pixel_attention_mask``, ``spatial_shapes``; see :mod:`legrad.adapters.hf`).
            answers: vision-language models only (LLaVA, PaliGemma; ``image`` is then the processor output):
                P candidate answers, strings (tokenised with the wrapper's ``tokenizer``) or 1-D LongTensors of
                token ids; each map shows where the image raised that answer's log-probability (docs/vlm.md).
                ``per_token=True`` gives one map per token of a single answer; ``return_scores=True`` returns
                ``(maps, log-probs [B, P])``.

        Returns:
            ``[B, P, H, W]`` float32 heatmaps in [0, 1] on ``image``'s device (or at ``output_size``); for
            a Siglip2 NaFlex batch of differently sized images, a list of ``[P, H_i, W_i]``. With
            ``return_scores=True``, a ``LeGradOutput`` holding those maps (the same values).

        Raises:
            TypeError, ValueError: on invalid inputs, before any computation.
        """
        goal = self._target(text_embedding, target, answers)
        if isinstance(goal, Answers):
            goal.check(self._adapter)
            if return_scores:
                inputs = {**inputs, "return_scores": return_scores}
            return self._adapter.explain(image, goal.answers,
                                         layer_index=self._layer_index if layer_index is None else layer_index,
                                         output_size=output_size, prompt_chunk=prompt_chunk, tokenizer=self._tokenizer,
                                         max_memory=self.max_memory, max_tokens=self.max_tokens, **inputs)
        return self._run(pipeline.Request(
            image=image, target=goal,
            layer_index=self._layer_index if layer_index is None else layer_index, prompt_chunk=prompt_chunk,
            output_size=output_size, inputs=inputs, return_scores=return_scores))

    def compute_legrad_clip(
        self,
        text_embedding: torch.Tensor,
        image: torch.Tensor | None = None,
        *,
        layer_index: int | None = None,
        prompt_chunk: int | None = None,
        output_size: str | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """LeGrad for CLIP ViT towers (CLS or average pooling). Same contract as :meth:`compute_legrad`.

        Raises:
            TypeError: if the model's tower is not a CLIP-style ViT (use :meth:`compute_legrad`).
        """
        self._require_entry_point("compute_legrad_clip")
        return self.compute_legrad(text_embedding, image, layer_index=layer_index, prompt_chunk=prompt_chunk,
                                   output_size=output_size)

    def compute_legrad_coca(
        self,
        text_embedding: torch.Tensor,
        image: torch.Tensor | None = None,
        *,
        layer_index: int | None = None,
        prompt_chunk: int | None = None,
        output_size: str | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """LeGrad for CoCa models (one map per prompt). Same contract as :meth:`compute_legrad`.

        Raises:
            TypeError: if the model is not an open_clip CoCa (use :meth:`compute_legrad`).
        """
        self._require_entry_point("compute_legrad_coca")
        return self.compute_legrad(text_embedding, image, layer_index=layer_index, prompt_chunk=prompt_chunk,
                                   output_size=output_size)

    def compute_legrad_siglip(
        self,
        text_embedding: torch.Tensor,
        image: torch.Tensor | None = None,
        *,
        layer_index: int | None = None,
        prompt_chunk: int | None = None,
        apply_correction: bool | None = None,
        correction_threshold: float | None = None,
        output_size: str | tuple[int, int] | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """LeGrad for attention-pooled towers (SigLIP, SigLIP2, PE-Core). Same contract as :meth:`compute_legrad`.

        Args:
            apply_correction: overrides the wrapper's ``apply_correction`` for this call.
            correction_threshold: overrides the wrapper's ``correction_threshold`` for this call.
            **inputs: extra image inputs, as for :meth:`compute_legrad` (Hugging Face ``Siglip2Model``).

        Raises:
            TypeError: if the tower has no SigLIP-style attention pooler (use :meth:`compute_legrad`).
            ValueError: if the correction is on and neither a tokenizer nor ``empty_text_embedding`` was given.
        """
        self._require_entry_point("compute_legrad_siglip")
        return self._run(pipeline.Request(
            image=image, target=Text(text_embedding),
            layer_index=self._layer_index if layer_index is None else layer_index,
            prompt_chunk=prompt_chunk, output_size=output_size, inputs=inputs, apply_correction=apply_correction,
            correction_threshold=correction_threshold))

    def explain_answer(self, inputs: Any, max_new_tokens: int = 32, *, layer_index: int | None = None,
                       output_size: str | tuple[int, int] | None = None, prompt_chunk: int | None = None,
                       **generate_kwargs: Any) -> Any:
        """The VLM's own greedy answer (``generate``) to each prompt, explained token by token (docs/vlm.md).

        Args:
            inputs: the processor output for B images and prompts.
            max_new_tokens: the most tokens generated per prompt (1 to 512).
            layer_index, output_size, prompt_chunk: as for :meth:`compute_legrad`.
            **generate_kwargs: greedy-compatible ``generate`` options (sampling ones raise a ValueError).

        Returns:
            A :class:`legrad.answers.AnswerExplanation`: ``token_ids`` ``[B, T]`` (generate's new tokens),
            ``tokens``, ``text``, ``maps`` ``[B, T, H, W]``, ``logprobs`` ``[B, T]``, ``answer_map`` ``[B, H, W]``
            and ``answer_logprob`` ``[B]`` (lists per row where the rows' answer lengths differ).

        Raises:
            TypeError, ValueError: on invalid inputs or options, before any work.
        """
        from .answers import explain_answer  # its own module: the facade stays thin

        return explain_answer(self, inputs, max_new_tokens, layer_index=layer_index, output_size=output_size,
                              prompt_chunk=prompt_chunk, **generate_kwargs)

    def _require_entry_point(self, name: str) -> None:
        if name not in self._adapter.entry_points:
            valid = ", ".join(self._adapter.entry_points)
            raise TypeError(
                f"{name} does not apply to this model's image tower ({self._adapter.family}); use {valid}"
            )

    @staticmethod
    def _target(text: Any, target: Any, answers: Any) -> Target:
        """The call's target from compute_legrad's arguments (at most one of them)."""
        given = [name for name, v in (("text_embedding", text), ("target", target), ("answers", answers))
                 if v is not None]
        if len(given) > 1:
            raise TypeError(f"give one target, got {' and '.join(given)}: text_embedding (text), target (classes, "
                            "a Target or a score function) or answers (a vision-language model's candidate answers)")
        if answers is not None:
            return Answers(answers)
        if isinstance(target, Target):
            return target
        if target is not None:
            return Score(target) if callable(target) else Classes(target)
        return Text(text)

    def _run(self, request: pipeline.Request) -> torch.Tensor | LeGradOutput:
        return pipeline.run(self._adapter, self._model, request, self.settings())


def _rewrap_self(wrapper: LeWrapper, model: nn.Module, method: Any) -> Any:
    """Wraps a bound method of the model so that ``model.eval()``-style chaining returns the wrapper."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        return wrapper if result is model else result

    return call


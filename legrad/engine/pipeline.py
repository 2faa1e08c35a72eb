"""The one LeGrad pipeline every caller uses (:class:`~legrad.LeWrapper`, every adapter family, the
baselines of :mod:`legrad.eval.baselines`).

``run(adapter, model, request, settings)``:

0. ``settings.reference`` (``"1.1"``) swaps in the adapter that computes the original package's maps
   (:func:`reference_adapter`);
1. validation, before any work (:mod:`~legrad.engine.validation`): output size, the adapter's own
   input preparation (``adapter.prepare_inputs``: image tensors, processor outputs, NaFlex masks), the
   target (:mod:`~legrad.engine.targets`: it checks it fits the tower's readout space and validates its
   values), prompt chunk, layer index;
2. the empty prompt of the correction (:mod:`~legrad.engine.correction`) when the family uses it;
3. pre-flight token and memory bounds (:mod:`~legrad.engine.budget`);
4. the prologue: inputs moved to the tower's device, the model's dtype for the pixels and a float32
   (or wider) compute dtype for the explained layers, inference tensors cloned into normal tensors
   (they cannot join an autograd graph), the empty prompt appended as one more prompt;
5. ``adapter.steps()`` -> relevance summed over layers (:mod:`~legrad.engine.relevance`);
6. correction, per-image grids, upsampling and min-max normalisation (:mod:`~legrad.engine.maps`; the
   other order for adapters with ``normalizes_on_grid``);
7. with ``return_scores``, the model's own image embedding and the image-prompt scores, taken from the
   same run of the tower (:mod:`~legrad.engine.scores`).

The adapter is duck-typed (the protocol is :class:`legrad.adapters.base.TowerAdapter`): the engine
imports no adapter module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .budget import DEFAULT_MAX_TOKENS, check_call
from .correction import apply_empty_prompt_correction, resolve_empty_embedding
from .deadline import check_deadline
from .maps import grid_maps
from .relevance import accumulate_relevance
from .scores import LeGradOutput, capture_final_embedding
from .step import ImageBatch, ModelInput, Scorer, compute_dtype_for
from .targets import Target
from .validation import check_layer_index, check_output_size, check_prompt_chunk

__all__ = ["Settings", "Request", "Prepared", "LeGradOutput", "REFERENCES", "REFERENCE_FAMILIES", "reference_adapter", "compute_dtype_for",
           "prepare", "relevance", "finish", "run"]

#: Releases of the original package (legrad-torch) that ``Settings.reference`` can reproduce.
REFERENCES = ("1.1",)
#: The towers legrad-torch 1.1 explained (with open_clip <= 2.23), for error messages.
REFERENCE_FAMILIES = ("open_clip ViTs pooled by class token or average (CLIP), open_clip CoCa, and timm "
                      "SigLIP/SigLIP2 towers (map pool, plain blocks, no class token, nothing after the pooler)")


@dataclass(frozen=True)
class Settings:
    """Per-model settings of a call (a :class:`~legrad.LeWrapper`'s attributes)."""

    tokenizer: Any = None
    empty_text_embedding: torch.Tensor | None = None
    apply_correction: bool = True
    correction_threshold: float = 0.8
    max_memory: float | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    #: None: legrad's maps; ``"1.1"``: legrad-torch 1.1's (see :func:`reference_adapter`).
    reference: str | None = None


def reference_adapter(adapter: Any, reference: str | None) -> Any:
    """The adapter that computes ``reference``'s maps for ``adapter``'s tower (``adapter`` itself for None).

    Families declare what the original computed through ``adapter.for_reference(reference)`` (None when
    the original never supported them).

    Raises:
        ValueError: for an unknown reference, or a tower the original never supported.
    """
    if reference is None:
        return adapter
    if not isinstance(reference, str) or reference not in REFERENCES:
        raise ValueError(f"reference must be None (legrad's maps) or one of {list(REFERENCES)} (the original "
                         f"package legrad-torch's maps), got {reference!r}")
    make = getattr(adapter, "for_reference", None)
    ref = make(reference) if make is not None else None
    if ref is None:
        raise ValueError(
            f"reference={reference!r} reproduces legrad-torch {reference}, which supported only {REFERENCE_FAMILIES}; "
            f"this model's tower ({adapter.family}) was never supported by it: drop reference= to get legrad's maps"
        )
    return ref


@dataclass(frozen=True)
class Request:
    """One call's inputs, as the user gave them (validated by :func:`prepare`).

    Attributes:
        image: image batch or processor output, whatever ``adapter.prepare_inputs`` accepts.
        target: what the maps explain (:class:`~legrad.engine.targets.Target`: text, classes, a score
            function of the readout).
        layer_index: first explained block, negative counts from the end.
        prompt_chunk: prompts per batched backward (None: from the memory budget).
        output_size: None, ``"grid"`` or ``(h, w)``.
        inputs: extra image inputs passed to ``adapter.prepare_inputs``.
        apply_correction, correction_threshold: per-call overrides of :class:`Settings`.
        return_scores: also return the image embeddings and image-prompt scores (:class:`LeGradOutput`).
        normalize: min-max normalise each map (False: the raw relevance, summed over layers, upsampled).
    """

    image: Any
    target: Target
    layer_index: int = -2
    prompt_chunk: int | None = None
    output_size: Any = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    apply_correction: bool | None = None
    correction_threshold: float | None = None
    return_scores: bool = False
    normalize: bool = True


@dataclass
class Prepared:
    """A validated call after the prologue: everything on the tower's device.

    Attributes:
        adapter: the tower adapter.
        batch: the image batch; ``batch.pixels`` on the device, pixels in the model's dtype.
        prompts: the target's prompts: ``[P(+1), D]`` / ``[B, P(+1), D]`` text in ``compute_dtype`` (the
            empty prompt last when ``threshold`` is set), class indices ``[P]`` / ``[B, P]``, ...
        num_prompts: P, the caller's prompts.
        start: first explained block (0-based).
        compute_dtype: dtype of the explained layers' graph.
        out_device: where the maps go (the input image's device).
        threshold: the empty-prompt correction's threshold, None when it does not apply.
        output_size, prompt_chunk: as requested.
        scorer: how a layer's feature is scored against ``prompts`` (the target's).
        target: the call's target.
        normalize_on_grid: min-max normalise on the patch grid before upsampling (legrad-torch 1.1's
            SigLIP maps, ``adapter.normalizes_on_grid``).
    """

    adapter: Any
    batch: ImageBatch
    prompts: torch.Tensor
    num_prompts: int
    start: int
    compute_dtype: torch.dtype
    out_device: torch.device
    threshold: float | None
    output_size: str | tuple[int, int] | None
    prompt_chunk: int | None
    scorer: Scorer
    target: Target
    normalize_on_grid: bool = False


def _to_device(x: ModelInput, device: torch.device, dtype: torch.dtype) -> ModelInput:
    """Floating tensors to ``(device, dtype)``, others to ``device``; inference tensors cloned."""
    if isinstance(x, tuple):
        return tuple(_to_device(t, device, dtype) for t in x)
    x = x.detach().to(device=device, dtype=dtype if x.is_floating_point() else None)
    return x.clone() if x.is_inference() else x


def _out_pixels(batch: ImageBatch, output_size: str | tuple[int, int] | None) -> int:
    if output_size == "grid":
        return max(gh * gw for gh, gw in batch.grids)
    if output_size is None:
        return max(h * w for h, w in batch.sizes)
    return output_size[0] * output_size[1]


def prepare(adapter: Any, model: nn.Module, request: Request, settings: Settings, *,
            check_budget: bool = True) -> Prepared:
    """Validates a call and runs the prologue (steps 1-4 of the module docstring).

    Args:
        adapter: the model's tower adapter.
        model: the model (its text tower encodes the correction's empty prompt).
        request: the call's inputs.
        settings: the model's settings.
        check_budget: run the pre-flight token and memory checks.

    Returns:
        The :class:`Prepared` call.

    Raises:
        TypeError, ValueError: on invalid inputs, before any work.
        legrad.engine.budget.MemoryBudgetError: if the call would not fit its memory budget.
    """
    adapter = reference_adapter(adapter, settings.reference)
    target = request.target
    if not isinstance(target, Target):
        raise TypeError(f"the target must be a legrad Target (Text, Classes, Answers, Score), got {type(target).__name__}")
    target.check(adapter)
    output_size = check_output_size(request.output_size)
    check_deadline()
    batch = adapter.prepare_inputs(request.image, **request.inputs)
    check_deadline()
    prompts, scorer = target.prompts(adapter, model, settings.tokenizer, batch.batch)
    # Prompts are [P, ...] or [B, P, ...] after the batch; a row of class indices has nothing after.
    num_prompts = prompts.shape[-1] if not prompts.is_floating_point() else prompts.shape[-2]
    prompt_chunk = check_prompt_chunk(request.prompt_chunk)
    start = check_layer_index(request.layer_index, adapter.depth) % adapter.depth
    correct = settings.apply_correction if request.apply_correction is None else bool(request.apply_correction)
    threshold = settings.correction_threshold if request.correction_threshold is None else float(
        request.correction_threshold)
    empty = None
    if correct and adapter.uses_empty_prompt_correction and target.correctable:
        empty = resolve_empty_embedding(model, adapter, settings.tokenizer, settings.empty_text_embedding)
    device = adapter.device()
    param_dtype = adapter.param_dtype()
    dtype = compute_dtype_for(param_dtype)
    if check_budget:
        check_call(batch=batch.batch, tokens=batch.tokens, patches=max(gh * gw for gh, gw in batch.grids),
                   width=adapter.width, prompts=num_prompts + (empty is not None),
                   out_pixels=_out_pixels(batch, output_size), element_size=torch.empty((), dtype=dtype).element_size(),
                   device=device, max_memory=settings.max_memory, max_tokens=settings.max_tokens)
    out_device = batch.device
    with torch.inference_mode(False), torch.no_grad():
        pixels = _to_device(batch.pixels, device, param_dtype)
        # Class indices keep their integer dtype.
        txt = _to_device(prompts, device, dtype)
        if empty is not None:  # one extra prompt in the same batched backward
            e = _to_device(empty, device, dtype)
            e = e.expand(1, -1) if txt.ndim == 2 else e.expand(txt.shape[0], 1, -1)
            txt = torch.cat([txt, e], dim=-2)
    return Prepared(adapter=adapter, batch=ImageBatch(pixels, batch.grids, batch.sizes, batch.tokens), prompts=txt,
                    num_prompts=num_prompts, start=start, compute_dtype=dtype, out_device=out_device,
                    threshold=threshold if empty is not None else None, output_size=output_size,
                    prompt_chunk=prompt_chunk, scorer=scorer, target=target,
                    normalize_on_grid=bool(getattr(adapter, "normalizes_on_grid", False)))


def relevance(call: Prepared, final: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[B, P(+1), N]`` relevance summed over the explained layers, from one run of the tower.

    Args:
        call: the prepared call.
        final: if given, the model's own ``[B, E]`` image embedding (logits for classifiers) is appended
            to it, from the same run (:func:`legrad.engine.scores.capture_final_embedding`).
    """
    with torch.inference_mode(False), torch.no_grad():
        steps = call.adapter.steps(call.batch.pixels, call.start, call.compute_dtype)
        if final is not None:
            steps = capture_final_embedding(call.adapter, steps, final)
        return accumulate_relevance(steps, call.prompts, call.prompt_chunk, scorer=call.scorer)


def finish(call: Prepared, rel: torch.Tensor, *, work_dtype: torch.dtype | None = torch.float32,
           normalize: bool = True) -> torch.Tensor | list[torch.Tensor]:
    """Correction (if any), per-image grids, upsampling and min-max normalisation, on the output device.

    Args:
        call: the prepared call.
        rel: ``[B, P(+1), N]`` relevance (``[B, 1, N]`` for prompt-independent maps).
        work_dtype: dtype of upsampling and normalisation (None: ``rel``'s dtype promoted to float32).
        normalize: False: the raw relevance (corrected, upsampled), not min-max normalised.

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1] (at ``output_size``), or a list of ``[P, H_b, W_b]``
        when the images' sizes differ (Siglip2 NaFlex).
    """
    check_deadline()
    threshold = call.threshold

    def correct(r: torch.Tensor) -> torch.Tensor:
        return apply_empty_prompt_correction(r[:, :-1], r[:, -1:], threshold)

    with torch.inference_mode(False), torch.no_grad():
        maps = grid_maps(rel, call.batch.grids, call.batch.sizes, call.output_size, work_dtype=work_dtype,
                         correct=correct if threshold is not None else None, normalize_on_grid=call.normalize_on_grid,
                         normalize=normalize)
    if isinstance(maps, list):
        return [m.to(call.out_device) for m in maps]
    return maps.to(call.out_device)


def run(adapter: Any, model: nn.Module, request: Request, settings: Settings
        ) -> torch.Tensor | list[torch.Tensor] | LeGradOutput:
    """LeGrad maps of one call: :func:`prepare`, :func:`relevance`, :func:`finish`.

    Returns:
        ``[B, P, H, W]`` float32 heatmaps in [0, 1] on the image's device (or at ``output_size``); a list
        of ``[P, H_b, W_b]`` for batches of differently sized images (Siglip2 NaFlex). With
        ``request.return_scores``, a :class:`~legrad.engine.scores.LeGradOutput` of those maps, the
        image embeddings and the image-prompt scores.

    Raises:
        TypeError, ValueError: on invalid inputs, before any work.
        legrad.engine.relevance.NonFiniteError: if scores or gradients overflow.
        legrad.engine.deadline.RequestTimeoutError: past a deadline set by the caller
            (:func:`legrad.engine.deadline.deadline`).
    """
    if not isinstance(request.return_scores, bool):
        raise TypeError(f"return_scores must be True or False, got {type(request.return_scores).__name__}")
    if not isinstance(request.normalize, bool):
        raise TypeError(f"normalize must be True or False, got {type(request.normalize).__name__}")
    if request.return_scores and not getattr(request.target, "returns_scores", True):
        raise ValueError("return_scores=True needs text embeddings or class indices; with a score function, "
                         "call it on the model's output yourself")
    if request.return_scores and settings.reference is not None and reference_adapter(adapter, settings.reference) is not adapter:
        # The reference readout is not the model's embedding: scores from it would not be the model's.
        raise ValueError(f"return_scores=True is not available with reference={settings.reference!r} on the "
                         f"{adapter.family} tower (its layer readout differs from the model's own embedding); "
                         "use a LeWrapper without reference= for the scores")
    call = prepare(adapter, model, request, settings)
    if not request.return_scores:
        return finish(call, relevance(call), normalize=request.normalize)
    final: list[torch.Tensor] = []
    maps = finish(call, relevance(call, final), normalize=request.normalize)
    if not final:
        raise NotImplementedError(f"the {adapter.family} adapter yielded no step for the tower's last block")
    features, scores = call.target.outputs(final[0], call.prompts, call.num_prompts)
    return LeGradOutput(maps, features.float().to(call.out_device), scores.float().to(call.out_device))

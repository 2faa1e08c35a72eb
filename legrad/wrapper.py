"""``LeWrapper``: an OpenCLIP model that can also explain what its image tower sees."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from .correction import apply_empty_prompt_correction, resolve_empty_embedding
from .heatmap import Scorer, accumulate_relevance, min_max, upsample
from .memory import DEFAULT_MAX_TOKENS, check_call
from .towers import TowerAdapter, tower_adapter_for

__all__ = ["LeWrapper"]

# Attributes that live on the wrapper itself; everything else is the wrapped model's.
_OWN_ATTRS = frozenset({"_model", "_adapter", "_layer_index", "_tokenizer", "_empty_text_embedding",
                        "apply_correction", "correction_threshold", "max_memory", "max_tokens"})


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
            ``LeWrapper`` (its settings are kept unless given here).
        layer_index: first transformer block used; negative values count from the end (``-2``: the
            last two blocks). None (default): the model's recommended index if it declares one as
            an int attribute ``legrad_layer_index`` (the bundled demo model does: 0), else ``-2``.
        tokenizer: optional tokenizer, used by towers that need an auxiliary prompt (SigLIP's
            empty-prompt correction).
        empty_text_embedding: optional precomputed ``[D]`` embedding of that auxiliary prompt.
        apply_correction: apply the empty-prompt correction on towers that use it (None: True).
        correction_threshold: threshold of that correction (None: 0.8).
        max_memory: memory budget of one call in bytes, checked before any work against an estimate
            (see :mod:`legrad.memory`); None: 80% of the memory available on the tower's device.
        max_tokens: largest number of patch tokens per image (a ValueError before any work); None: no limit.

    Raises:
        TypeError: if the image tower is not supported (the message lists the supported families).
        ValueError: if ``layer_index`` is out of range for the tower's depth.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_index: int | None = None,
        tokenizer: Any = None,
        empty_text_embedding: torch.Tensor | None = None,
        apply_correction: bool | None = None,
        correction_threshold: float | None = None,
        max_memory: float | None = None,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
    ):
        if isinstance(model, LeWrapper):  # re-wrapping keeps the inner wrapper's settings unless overridden
            inner = model
            model = inner.model
            layer_index = inner.layer_index if layer_index is None else layer_index
            tokenizer = inner._tokenizer if tokenizer is None else tokenizer
            if empty_text_embedding is None:
                empty_text_embedding = inner._empty_text_embedding
            apply_correction = inner.apply_correction if apply_correction is None else apply_correction
            if correction_threshold is None:
                correction_threshold = inner.correction_threshold
            max_memory = inner.max_memory if max_memory is None else max_memory
            max_tokens = inner.max_tokens if max_tokens == DEFAULT_MAX_TOKENS else max_tokens
        if layer_index is None:
            hint = getattr(model, "legrad_layer_index", None)
            layer_index = hint if isinstance(hint, int) and not isinstance(hint, bool) else -2
        apply_correction = True if apply_correction is None else apply_correction
        correction_threshold = 0.8 if correction_threshold is None else correction_threshold
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"LeWrapper expects an OpenCLIP model or a ViT classifier (torch.nn.Module), got {type(model).__name__}"
            )
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_adapter", tower_adapter_for(model))
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_empty_text_embedding", empty_text_embedding)
        object.__setattr__(self, "apply_correction", bool(apply_correction))
        object.__setattr__(self, "correction_threshold", float(correction_threshold))
        object.__setattr__(self, "max_memory", max_memory)
        object.__setattr__(self, "max_tokens", max_tokens)
        self.layer_index = layer_index

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
        object.__setattr__(self, "_layer_index", self._checked_layer_index(value))

    def _checked_layer_index(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"layer_index must be an int, got {type(value).__name__}")
        depth = self._adapter.depth
        if not -depth <= value < depth:
            raise ValueError(
                f"layer_index={value} is out of range for an image tower with {depth} blocks; use a value in "
                f"[{-depth}, {depth - 1}] (e.g. -2 for the last two blocks)"
            )
        return value

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
        **inputs: Any,
    ) -> torch.Tensor:
        """LeGrad heatmaps, one per (image, prompt), for any supported tower.

        Args:
            text_embedding: ``[P, D]`` prompts shared by all images, or ``[B, P, D]`` per image;
                normalised embeddings as ``encode_text(..., normalize=True)`` returns (used as given).
                Not for image classifiers.
            target: image classifiers only (instead of ``text_embedding``): class indices, an int, a
                sequence of ints or a LongTensor ``[P]`` shared by the batch, or ``[B, P]`` per image;
                each map explains that class's logit (see :mod:`legrad.classifiers`).
            image: ``[B, C, H, W]`` float images, preprocessed; H and W multiples of the patch size.
            layer_index: overrides the wrapper's ``layer_index`` for this call.
            prompt_chunk: prompts per batched backward (bounds memory); default from a memory budget.
            output_size: None for the input size ``[H, W]``; ``"grid"`` for the patch grid ``[gh, gw]``
                (min-max normalised there, no upsampling: upsampling it bilinearly and min-max
                normalising again gives the default output); ``(h, w)`` for that size (bilinear).
            **inputs: extra image inputs of families that need them (Hugging Face ``Siglip2Model``:
                ``pixel_attention_mask``, ``spatial_shapes``; see :mod:`legrad.hf`).

        Returns:
            ``[B, P, H, W]`` float32 heatmaps in [0, 1] on ``image``'s device (or at ``output_size``).

        Raises:
            TypeError, ValueError: on invalid inputs, before any computation.
        """
        adapter = self._adapter
        if getattr(adapter, "scores_classes", False):  # image classifiers: class logits instead of text
            from .classifiers import classifier_legrad

            return classifier_legrad(self, text_embedding, image, target, layer_index=layer_index,
                                     prompt_chunk=prompt_chunk, output_size=output_size, **inputs)
        if target is not None:
            raise TypeError(
                f"target= selects classes of an image classifier, but this model's tower ({adapter.family}) is "
                "explained against text: pass text_embedding (e.g. model.encode_text(tokens, normalize=True))"
            )
        run = getattr(adapter, "run_legrad", None)
        if run is not None:  # families with their own input format (Hugging Face models: legrad.hf)
            if output_size is not None:
                raise TypeError(f"output_size is not supported for {adapter.family}; resize the returned maps")
            return run(self, text_embedding, image, layer_index=layer_index, prompt_chunk=prompt_chunk, **inputs)
        if inputs:
            raise TypeError(f"compute_legrad got unexpected keyword arguments {sorted(inputs)}")
        out_hw = _checked_output_size(output_size)
        image, text, start = self._validate(text_embedding, image, layer_index, prompt_chunk)
        return self._legrad(adapter, image, text, start, prompt_chunk, output_size=out_hw)

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
        run = getattr(self._adapter, "run_legrad", None)
        if run is not None:  # families with their own input format (Hugging Face models: legrad.hf)
            if output_size is not None:
                raise TypeError(f"output_size is not supported for {self._adapter.family}; resize the returned maps")
            return run(self, text_embedding, image, layer_index=layer_index, prompt_chunk=prompt_chunk,
                       apply_correction=apply_correction, correction_threshold=correction_threshold, **inputs)
        if inputs:
            raise TypeError(f"compute_legrad_siglip got unexpected keyword arguments {sorted(inputs)}")
        if apply_correction is None and correction_threshold is None:
            return self.compute_legrad(text_embedding, image, layer_index=layer_index, prompt_chunk=prompt_chunk,
                                       output_size=output_size)
        out_hw = _checked_output_size(output_size)
        image, text, start = self._validate(text_embedding, image, layer_index, prompt_chunk)
        return self._legrad(self._adapter, image, text, start, prompt_chunk, apply_correction=apply_correction,
                            correction_threshold=correction_threshold, output_size=out_hw)

    def _require_entry_point(self, name: str) -> None:
        if name not in self._adapter.entry_points:
            valid = ", ".join(self._adapter.entry_points)
            raise TypeError(
                f"{name} does not apply to this model's image tower ({self._adapter.family}); use {valid}"
            )

    def _legrad(self, adapter: TowerAdapter, image: torch.Tensor, text: torch.Tensor, start: int,
                prompt_chunk: int | None, *, apply_correction: bool | None = None,
                correction_threshold: float | None = None,
                output_size: str | tuple[int, int] | None = None, scorer: Scorer | None = None) -> torch.Tensor:
        correct = self.apply_correction if apply_correction is None else bool(apply_correction)
        threshold = self.correction_threshold if correction_threshold is None else float(correction_threshold)
        empty = None
        if correct and adapter.uses_empty_prompt_correction:
            empty = resolve_empty_embedding(self._model, adapter, self._tokenizer, self._empty_text_embedding)
        out_device = image.device
        device = adapter.device()
        param_dtype = adapter.param_dtype()
        compute_dtype = torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype
        height, width = image.shape[-2:]
        gh, gw = adapter.grid_size(height, width)
        out_hw = (gh, gw) if output_size == "grid" else (height, width) if output_size is None else output_size
        # Text is [P, D] / [B, P, D]; class targets (classifiers) are [P] / [B, P] integers.
        num_prompts = text.shape[-2] if text.is_floating_point() else text.shape[-1]
        self._preflight(adapter, batch=image.shape[0], patches=gh * gw, prompts=num_prompts + (empty is not None),
                        out_pixels=out_hw[0] * out_hw[1], dtype=compute_dtype, device=device)
        with torch.inference_mode(False), torch.no_grad():
            img = image.to(device=device, dtype=param_dtype)
            if img.is_inference():
                img = img.clone()
            # Class indices (classifiers' scorer) keep their integer dtype.
            txt = text.detach().to(device=device, dtype=compute_dtype if text.is_floating_point() else None)
            if txt.is_inference():
                txt = txt.clone()
            if empty is not None:  # one extra prompt in the same batched backward
                e = empty.to(device=device, dtype=compute_dtype)
                e = e.expand(1, -1) if txt.ndim == 2 else e.expand(txt.shape[0], 1, -1)
                txt = torch.cat([txt, e], dim=-2)
            rel = accumulate_relevance(adapter.steps(img, start, compute_dtype), txt, prompt_chunk, scorer=scorer)
            if empty is not None:
                rel = apply_empty_prompt_correction(rel[:, :-1], rel[:, -1:], threshold)
            maps = rel.reshape(rel.shape[0], rel.shape[1], gh, gw).float()
            if output_size != "grid":
                maps = upsample(maps, (height, width) if output_size is None else output_size)
            maps = min_max(maps)
        return maps.to(out_device)

    def _preflight(self, adapter: TowerAdapter, *, batch: int, patches: int, prompts: int, out_pixels: int,
                   dtype: torch.dtype, device: torch.device, tokens: int | None = None) -> None:
        """Token limit and memory estimate of a call (see :func:`legrad.memory.check_call`), before any work."""
        check_call(batch=batch, tokens=patches + adapter.num_prefix_tokens if tokens is None else tokens,
                   patches=patches, width=adapter.width, prompts=prompts, out_pixels=out_pixels,
                   element_size=torch.empty((), dtype=dtype).element_size(), device=device,
                   max_memory=self.max_memory, max_tokens=self.max_tokens)

    # ------------------------------------------------------------------ validation
    def _validate(self, text_embedding: Any, image: Any, layer_index: int | None,
                  prompt_chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self._validate_image(image)
        text_embedding, start = self._validate_text(text_embedding, image.shape[0], layer_index, prompt_chunk)
        return image, text_embedding, start

    def _validate_image(self, image: Any) -> torch.Tensor:
        """Checks an image batch ``[B, C, H, W]`` against the tower (channels, patch multiple, finite)."""
        adapter = self._adapter
        if image is None:
            raise ValueError(
                "image is required: pass the preprocessed image batch, e.g. "
                "compute_legrad(text_embedding, image=preprocess(pil).unsqueeze(0)). (Reusing a previous "
                "forward's state, as the original LeGrad allowed, is not thread-safe and not supported.)"
            )
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a torch.Tensor [B, 3, H, W], got {type(image).__name__}")
        _check_not_meta(image, "image")
        if adapter.device().type == "meta":
            raise ValueError("the model's weights are on the meta device (not loaded); load them first, e.g. "
                             "model.to_empty(device='cpu') then model.load_state_dict(state_dict)")
        if image.ndim != 4:
            hint = " (add a batch dimension: image.unsqueeze(0))" if image.ndim == 3 else ""
            raise ValueError(f"image must be 4-D [B, C, H, W], got shape {tuple(image.shape)}{hint}")
        if not image.is_floating_point():
            raise TypeError(
                f"image must be a float tensor (normalised by the model's preprocess), got {image.dtype}"
            )
        if image.shape[1] != adapter.in_chans:
            raise ValueError(
                f"image has {image.shape[1]} channels, the model expects {adapter.in_chans} "
                "(convert the PIL image with .convert('RGB') before preprocessing)"
            )
        if image.shape[0] == 0:
            raise ValueError("image batch is empty")
        if image.shape[-2] == 0 or image.shape[-1] == 0:
            ph, pw = adapter.patch_size
            raise ValueError(f"image has zero height or width ({image.shape[-2]}x{image.shape[-1]}); pass an image of "
                             f"at least one patch ({ph}x{pw} pixels)")
        adapter.grid_size(image.shape[-2], image.shape[-1])
        if not bool(torch.isfinite(image).all()):
            raise ValueError("image contains NaN or infinite values")
        return image

    def _validate_text(self, text_embedding: Any, batch: int, layer_index: int | None,
                       prompt_chunk: int | None) -> tuple[torch.Tensor, int]:
        """Checks the text embeddings (for an image batch of ``batch``) and returns them with the start block."""
        adapter = self._adapter
        if not isinstance(text_embedding, torch.Tensor):
            raise TypeError(
                f"text_embedding must be a torch.Tensor [P, D] or [B, P, D], got {type(text_embedding).__name__}"
            )
        _check_not_meta(text_embedding, "text_embedding")
        if not text_embedding.is_floating_point():
            raise TypeError(f"text_embedding must be a float tensor, got {text_embedding.dtype}")
        if text_embedding.ndim not in (2, 3):
            hint = " (for one prompt use text_embedding.unsqueeze(0))" if text_embedding.ndim == 1 else ""
            raise ValueError(
                f"text_embedding must be [P, D] or [B, P, D], got shape {tuple(text_embedding.shape)}{hint}"
            )
        dim = adapter.embed_dim
        if text_embedding.shape[-1] != dim:
            raise ValueError(
                f"text_embedding width {text_embedding.shape[-1]} does not match the image embedding width "
                f"{dim}; encode the prompts with the same model's encode_text"
            )
        if text_embedding.shape[-2] == 0:
            raise ValueError("text_embedding holds zero prompts; pass at least one")
        if text_embedding.ndim == 3 and text_embedding.shape[0] != batch:
            raise ValueError(
                f"per-image text_embedding [B, P, D] has B={text_embedding.shape[0]} but the image batch has "
                f"B={batch}; pass [P, D] to share prompts across images"
            )
        if not bool(torch.isfinite(text_embedding).all()):
            raise ValueError("text_embedding contains NaN or infinite values")
        if prompt_chunk is not None and (isinstance(prompt_chunk, bool) or not isinstance(prompt_chunk, int)
                                         or prompt_chunk < 1):
            raise ValueError(f"prompt_chunk must be a positive int or None, got {prompt_chunk!r}")
        li = self._layer_index if layer_index is None else self._checked_layer_index(layer_index)
        start = li % adapter.depth
        return text_embedding, start


def _check_not_meta(t: torch.Tensor, name: str) -> None:
    if t.is_meta:
        raise ValueError(f"{name} is a meta tensor (shape only, no data); pass a tensor with values on a real device")


def _checked_output_size(output_size: Any) -> str | tuple[int, int] | None:
    if output_size is None or output_size == "grid":
        return output_size
    if (isinstance(output_size, (tuple, list)) and len(output_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in output_size)):
        return (int(output_size[0]), int(output_size[1]))
    raise ValueError(f"output_size must be None, 'grid' or a (height, width) of positive ints, got {output_size!r}")


def _rewrap_self(wrapper: LeWrapper, model: nn.Module, method: Any) -> Any:
    """Wraps a bound method of the model so that ``model.eval()``-style chaining returns the wrapper."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        return wrapper if result is model else result

    return call


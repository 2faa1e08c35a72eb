"""Hugging Face ``transformers`` vision-language models behind :class:`~legrad.LeWrapper`.

Supported classes (``transformers`` is an optional dependency: ``pip install legrad_torch[hf]``):

* ``CLIPModel``, ``MetaClip2Model``, ``AltCLIPModel``, ``ChineseCLIPModel``: ViT towers with a CLS
  token, ``post_layernorm`` and ``visual_projection``. Layer feature: ``visual_projection(
  post_layernorm(mean over all tokens of block l's output))``; LeGrad differentiates block l's
  self-attention (the CLS column is dropped), as for the open_clip CLIP towers.
* ``SiglipModel``: no CLS token; ``post_layernorm`` on all tokens, then the attention-pooling head
  (probe + ``nn.MultiheadAttention``, layernorm, mlp), no projection. Layer feature: the head applied
  to ``post_layernorm`` of block l's output; LeGrad differentiates the head's attention over the
  tokens of block l. The empty-prompt correction applies.
* ``Siglip2Model`` (NaFlex): same head, but the images arrive pre-patchified (``pixel_values``
  ``[B, N, C * p * p]`` with ``pixel_attention_mask`` ``[B, N]`` and ``spatial_shapes`` ``[B, 2]``, as
  the model's processor returns them). Padded patches get no relevance and each map is returned at
  its image's own size ``spatial_shapes[i] * patch_size``.

Nothing here imports ``transformers`` at module import time: this module is imported by
``legrad/__init__.py`` to register the adapters, and ``transformers`` is only imported once a model
that comes from it is wrapped. As for the open_clip towers, the image tower is recomputed from its
modules' own weights (the embedding layer is called as is; it is a pure function of the pixels):
the model's attention implementation, configs, mode and hooks are never touched.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention_ops_for, merge_heads
from .correction import apply_empty_prompt_correction, resolve_empty_embedding
from .functional import layer_norm, linear
from .heatmap import accumulate_relevance, min_max, upsample
from .towers import LayerStep, TowerAdapter, register_tower

__all__ = [
    "HFClipAdapter",
    "HFSiglipAdapter",
    "HFSiglip2Adapter",
    "SUPPORTED_HF_CLASSES",
    "encode_text",
    "pooled_text_features",
]

_CLIP_CLASSES = ("CLIPModel", "MetaClip2Model", "AltCLIPModel", "ChineseCLIPModel")
_SIGLIP_CLASSES = ("SiglipModel",)
_SIGLIP2_CLASSES = ("Siglip2Model",)
#: The ``transformers`` model classes :class:`~legrad.LeWrapper` accepts.
SUPPORTED_HF_CLASSES = _CLIP_CLASSES + _SIGLIP_CLASSES + _SIGLIP2_CLASSES

# Processor outputs that are not image inputs (a processor called with text and images returns both).
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


# ---------------------------------------------------------------------------------------------- helpers
def _hf_classes(names: Sequence[str]) -> tuple[type, ...]:
    import transformers

    # Older releases lack some classes (MetaClip2, Siglip2): those simply cannot be passed in.
    return tuple(c for c in (getattr(transformers, n, None) for n in names) if c is not None)


def _from_transformers(model: Any) -> bool:
    return any(c.__module__.split(".", 1)[0] == "transformers" for c in type(model).__mro__)


def _hf_family(model: Any) -> type[_HFAdapter] | None:
    """The adapter class for a transformers model, None for models of other libraries.

    Raises:
        TypeError: for a transformers model of an unsupported class (names the supported ones).
    """
    # A transformers model cannot exist unless transformers was imported: no import cost otherwise.
    if sys.modules.get("transformers") is None or not _from_transformers(model):
        return None
    for family in (HFClipAdapter, HFSiglipAdapter, HFSiglip2Adapter):
        classes = _hf_classes(family.hf_classes)
        if classes and isinstance(model, classes):
            return family
    hint = ""
    name = type(model).__name__
    if name.endswith(("VisionModel", "TextModel", "VisionModelWithProjection", "TextModelWithProjection")):
        hint = " (a single tower cannot be explained: load the full two-tower model, e.g. CLIPModel)"
    raise TypeError(
        f"unsupported Hugging Face model class {name}{hint}. LeWrapper accepts these transformers classes: "
        f"{', '.join(SUPPORTED_HF_CLASSES)}."
    )


def _activation(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # transformers' ACT2FN entries are parameter-free modules whose forward is a pure function.
    if any(True for _ in mod.parameters()):
        raise TypeError(f"legrad cannot apply the activation {type(mod).__name__} statelessly (it has parameters)")
    return mod(x)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(mlp.fc2, _activation(mlp.activation_fn, linear(mlp.fc1, x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _self_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = attn.num_heads
    return (_split_heads(linear(attn.q_proj, x), h), _split_heads(linear(attn.k_proj, x), h),
            _split_heads(linear(attn.v_proj, x), h))


def _attn_scale(attn: nn.Module, q: torch.Tensor) -> float:
    return float(getattr(attn, "scale", q.shape[-1] ** -0.5))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _encoder_layer(layer: nn.Module, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """One pre-norm encoder layer (CLIP/SigLIP layout) with eval semantics, from its weights."""
    attn = layer.self_attn
    q, k, v = _self_qkv(attn, layer_norm(layer.layer_norm1, x))
    x = x + linear(attn.out_proj, merge_heads(_sdpa(q, k, v, key_mask, _attn_scale(attn, q))))
    return x + _mlp(layer.mlp, layer_norm(layer.layer_norm2, x))


def pooled_text_features(output: Any) -> torch.Tensor:
    """The text embedding in what ``get_text_features`` returned, in any transformers version.

    Args:
        output: a ``[P, D]`` tensor (transformers 4.x) or an output object whose ``pooler_output`` is
            the embedding (transformers 5.x).

    Returns:
        ``[P, D]`` un-normalised embeddings.

    Raises:
        TypeError: if ``output`` holds no embedding.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # return_dict=False: (last_hidden_state, pooler_output, ...)
    raise TypeError(f"cannot find a text embedding in {type(output).__name__}; expected a tensor or .pooler_output")


def encode_text(model: nn.Module, tokenizer: Any, texts: str | Sequence[str], **tokenizer_kwargs: Any
                   ) -> torch.Tensor:
    """L2-normalised text embeddings ``[P, D]`` from a transformers model's own text tower.

    Args:
        model: the transformers model (or a :class:`~legrad.LeWrapper` around it).
        tokenizer: its tokenizer or processor (called with ``text=...``).
        texts: one prompt or a list of prompts.
        **tokenizer_kwargs: overrides of the tokenizer call; SigLIP/SigLIP2 default to
            ``padding="max_length"`` with the text tower's context length (how they were trained), the
            others to ``padding=True``.

    Returns:
        ``[P, D]`` float embeddings on the model's device, ready for ``compute_legrad``.
    """
    from .wrapper import LeWrapper  # local: legrad/__init__ imports this module before the wrapper

    if isinstance(model, LeWrapper):
        model = model.model
    if isinstance(texts, str):
        texts = [texts]
    family = _hf_family(model)
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if family is not None and issubclass(family, HFSiglipAdapter):
        # SigLIP towers were trained on prompts padded to their full context; SigLIP2's Gemma tokenizer
        # has no usable model_max_length, so the length comes from the text tower's config.
        max_len = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 64)
        kwargs.update(padding="max_length", truncation=True, max_length=max_len)
    else:
        kwargs.update(padding=True, truncation=True)
    kwargs.update(tokenizer_kwargs)
    tokens = tokenizer(text=list(texts), **kwargs)
    accepted = inspect.signature(model.get_text_features).parameters
    device = next(model.parameters()).device
    args = {k: v.to(device) for k, v in dict(tokens).items() if k in _TEXT_KEYS and k in accepted}
    with torch.no_grad():
        emb = pooled_text_features(model.get_text_features(**args))
    return F.normalize(emb.float(), dim=-1)


# ---------------------------------------------------------------------------------------------- adapters
class _HFAdapter(TowerAdapter):
    """Common part of the transformers adapters: found through ``from_model`` (no ``.visual``)."""

    hf_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        super().__init__(model.vision_model)
        self.model = model
        self._check_layout()

    def _check_layout(self) -> None:
        v = self.visual
        layer_attrs = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
        ok = hasattr(v, "embeddings") and hasattr(v, "post_layernorm") and hasattr(v, "encoder")
        ok = ok and all(all(hasattr(layer, a) for a in layer_attrs) for layer in v.encoder.layers)
        if not ok:
            raise TypeError(
                f"{type(self.model).__name__} does not have the vision-tower layout legrad expects "
                "(embeddings, encoder.layers[*].self_attn/mlp/layer_norm1/2, post_layernorm); "
                "this transformers version may have changed it, please open an issue"
            )

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        return False  # transformers models are recognised by from_model

    @classmethod
    def from_model(cls, model: nn.Module) -> TowerAdapter | None:
        family = _hf_family(model)
        return cls(model) if family is cls else None

    @property
    def depth(self) -> int:
        return len(self.visual.encoder.layers)

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.visual.embeddings.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    @property
    def in_chans(self) -> int:
        return self.visual.config.num_channels

    @property
    def _layers(self) -> nn.ModuleList:
        return self.visual.encoder.layers

    def _embed(self, image: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings (+ CLS) ``[B, N, C]`` for a ``[B, C, H, W]`` batch, any size."""
        return self.visual.embeddings(image, interpolate_pos_encoding=True)

    def encode_prompts(self, model: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised ``[P, D]`` embeddings of ``prompts`` (used for the empty-prompt correction)."""
        return encode_text(model, tokenizer, prompts)

    def run_legrad(self, wrapper: Any, text_embedding: torch.Tensor, image: Any, *, layer_index: int | None,
                   prompt_chunk: int | None, apply_correction: bool | None = None,
                   correction_threshold: float | None = None, **inputs: Any) -> torch.Tensor:
        """Entry point used by :meth:`LeWrapper.compute_legrad` for transformers models.

        Accepts the ``[B, C, H, W]`` ``pixel_values`` tensor or the processor's output (a mapping
        with ``pixel_values``). Positional embeddings are always interpolated to the input size, so an
        ``interpolate_pos_encoding`` keyword is accepted and ignored; other keywords are rejected.
        """
        pixel_values = _pixel_values(image, inputs, allowed=("interpolate_pos_encoding",))
        image, text, start = wrapper._validate(text_embedding, pixel_values, layer_index, prompt_chunk)
        return wrapper._legrad(self, image, text, start, prompt_chunk, apply_correction=apply_correction,
                               correction_threshold=correction_threshold)


def _pixel_values(image: Any, inputs: dict[str, Any], allowed: Sequence[str] = ()) -> Any:
    """The ``pixel_values`` in ``image`` (a tensor or a processor output); rejects unknown keywords."""
    extra = sorted(k for k in inputs if k not in allowed)
    if extra:
        raise TypeError(f"compute_legrad got unexpected keyword arguments {extra} for this model")
    if isinstance(image, Mapping):
        if "pixel_values" not in image:
            raise ValueError(f"image mapping has no 'pixel_values' (keys: {sorted(image)}); pass the processor output")
        return image["pixel_values"]
    return image


@register_tower
class HFClipAdapter(_HFAdapter):
    """transformers ``CLIPModel``, ``MetaClip2Model``, ``AltCLIPModel``, ``ChineseCLIPModel``."""

    family = "transformers CLIPModel / MetaClip2Model / AltCLIPModel / ChineseCLIPModel"
    entry_points = ("compute_legrad", "compute_legrad_clip")
    hf_classes = _CLIP_CLASSES

    @property
    def embed_dim(self) -> int:
        return self.model.visual_projection.out_features

    def _explained(self, layer: int, blk: nn.Module, x: torch.Tensor) -> tuple[LayerStep, torch.Tensor]:
        attn = blk.self_attn
        q, k, v = _self_qkv(attn, layer_norm(blk.layer_norm1, x))
        scale = _attn_scale(attn, q)
        o = _sdpa(q, k, v, None, scale).detach().requires_grad_(True)
        with torch.enable_grad():
            x1 = x + linear(attn.out_proj, merge_heads(o))
            hidden = _activation(blk.mlp.activation_fn, linear(blk.mlp.fc1, layer_norm(blk.layer_norm2, x1)))
            # fc2 is affine, so the token mean moves inside it: the graph keeps [B, C] instead of [B, N, C].
            pooled = x1.mean(1) + linear(blk.mlp.fc2, hidden.mean(1))
            feature = linear(self.model.visual_projection, layer_norm(self.visual.post_layernorm, pooled))
        with torch.no_grad():
            x_next = x1.detach() + linear(blk.mlp.fc2, hidden.detach())
        step = LayerStep(layer=layer, feature=feature, out=o, value=v, num_prefix_tokens=1, query=q, key=k,
                         scale=scale)
        return step, x_next

    def trace(self, image: torch.Tensor, compute_dtype: torch.dtype) -> tuple[list[LayerStep], torch.Tensor]:
        """The whole tower as one graph, for the gradient baselines; the embedding is the model's own
        ``visual_projection(post_layernorm(CLS))`` (what ``get_image_features`` returns)."""
        # The embedded tokens are the graph's only leaf: every later activation is a function of them.
        x = layer_norm(self.visual.pre_layrnorm, self._embed(image)).to(compute_dtype).detach().requires_grad_(True)
        steps = []
        with torch.enable_grad():
            for i, blk in enumerate(self._layers):
                attn = blk.self_attn
                h = layer_norm(blk.layer_norm1, x)
                q, k, v = _self_qkv(attn, h)
                scale = _attn_scale(attn, q)
                o = _sdpa(q, k, v, None, scale)
                x = x + linear(attn.out_proj, merge_heads(o))
                x = x + _mlp(blk.mlp, layer_norm(blk.layer_norm2, x))
                steps.append(LayerStep(layer=i, feature=x, out=o, value=v.detach(), num_prefix_tokens=1,
                                       query=q.detach(), key=k.detach(), scale=scale, tokens=h))
            embedding = linear(self.model.visual_projection, layer_norm(self.visual.post_layernorm, x[:, 0]))
        for step in steps:
            step.feature = embedding
        return steps, embedding

    def steps(self, image: torch.Tensor, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        x = layer_norm(self.visual.pre_layrnorm, self._embed(image))
        layers = self._layers
        for i in range(start):
            x = _encoder_layer(layers[i], x, None)
        x = x.to(compute_dtype)
        for i in range(start, len(layers)):
            step, x = self._explained(i, layers[i], x)
            yield step
            del step  # free this layer's graph before building the next one


@register_tower
class HFSiglipAdapter(_HFAdapter):
    """transformers ``SiglipModel``: attention-pooling head explained at every selected layer."""

    family = "transformers SiglipModel (attention-pooling head)"
    entry_points = ("compute_legrad", "compute_legrad_siglip")
    uses_empty_prompt_correction = True
    #: How to provide the correction's prompt embedding (shown when it is missing).
    correction_hint = (
        "pass LeWrapper(model, tokenizer=processor) with the model's AutoProcessor or AutoTokenizer, or "
        "LeWrapper(model, empty_text_embedding=legrad.hf.encode_text(model, processor, 'a photo of a')[0]), "
        "or turn the correction off with apply_correction=False"
    )
    hf_classes = _SIGLIP_CLASSES

    def _check_layout(self) -> None:
        super()._check_layout()
        head = getattr(self.visual, "head", None)
        if head is None or not getattr(self.visual, "use_head", True):
            raise TypeError(
                f"{type(self.model).__name__} was built with vision_use_head=False: it has no pooled image "
                "embedding to explain"
            )

    @property
    def embed_dim(self) -> int:
        return self.visual.head.probe.shape[-1]

    @property
    def uses_attention_pooler(self) -> bool:
        return True

    def _pool_step(self, layer: int, x: torch.Tensor, key_mask: torch.Tensor | None) -> LayerStep:
        """The pooling head on block ``layer``'s tokens ``x`` ``[B, N, C]``; its attention is explained."""
        head = self.visual.head
        tokens = layer_norm(self.visual.post_layernorm, x)
        ops = attention_ops_for(head.attention)
        probe = head.probe.detach().to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        q, k, v = ops.qkv(probe, tokens)
        scale = q.shape[-1] ** -0.5  # nn.MultiheadAttention always uses 1/sqrt(head_dim)
        o = _sdpa(q, k, v, key_mask, scale).detach().requires_grad_(True)
        with torch.enable_grad():
            pooled = ops.out(o)
            pooled = pooled + _mlp(head.mlp, layer_norm(head.layernorm, pooled))
            feature = pooled[:, 0]
        return LayerStep(layer=layer, feature=feature, out=o, value=v, num_prefix_tokens=0, key_mask=key_mask,
                         query=q, key=k, scale=scale)

    def _run(self, x: torch.Tensor, start: int, compute_dtype: torch.dtype,
             key_mask: torch.Tensor | None) -> Iterator[LayerStep]:
        layers = self._layers
        for i in range(start):
            x = _encoder_layer(layers[i], x, key_mask)
        x = x.to(compute_dtype)
        for i in range(start, len(layers)):
            x = _encoder_layer(layers[i], x, key_mask)
            yield self._pool_step(i, x, key_mask)

    def steps(self, image: torch.Tensor, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        yield from self._run(self._embed(image), start, compute_dtype, None)


@register_tower
class HFSiglip2Adapter(HFSiglipAdapter):
    """transformers ``Siglip2Model`` (NaFlex): pre-patchified, padded, variable-size image batches."""

    family = "transformers Siglip2Model (NaFlex, attention-pooling head)"
    hf_classes = _SIGLIP2_CLASSES

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, ``num_channels * patch_size ** 2``."""
        return self.visual.embeddings.patch_embedding.in_features

    def steps(self, image: Any, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        """Args: ``image`` is a ``(pixel_values [B, N, C*p*p], key_mask [B, N] bool, spatial_shapes [B, 2])`` tuple."""
        pixel_values, key_mask, spatial_shapes = image
        x = self.visual.embeddings(pixel_values, spatial_shapes)
        yield from self._run(x, start, compute_dtype, key_mask)

    def run_legrad(self, wrapper: Any, text_embedding: torch.Tensor, image: Any, *, layer_index: int | None,
                   prompt_chunk: int | None, apply_correction: bool | None = None,
                   correction_threshold: float | None = None, **inputs: Any) -> torch.Tensor | list[torch.Tensor]:
        """LeGrad for NaFlex batches.

        ``image`` is the processor output (a mapping with ``pixel_values``, ``pixel_attention_mask`` and
        ``spatial_shapes``) or the ``pixel_values`` tensor with the other two as keyword arguments.
        The empty-prompt correction is applied per image, on its own patches only.

        Returns:
            ``[B, P, H, W]`` when all images share one ``spatial_shapes`` (e.g. ``B == 1``), otherwise a
            list of ``[P, H_i, W_i]`` tensors; ``(H_i, W_i) = spatial_shapes[i] * patch_size``.
        """
        pixel_values, key_mask, shapes = self._naflex_inputs(image, inputs)
        text, start = wrapper._validate_text(text_embedding, pixel_values.shape[0], layer_index, prompt_chunk)
        correct = wrapper.apply_correction if apply_correction is None else bool(apply_correction)
        threshold = wrapper.correction_threshold if correction_threshold is None else float(correction_threshold)
        empty = None
        if correct:
            empty = resolve_empty_embedding(wrapper.model, self, wrapper._tokenizer, wrapper._empty_text_embedding)
        param_dtype = self.param_dtype()
        ph, pw = self.patch_size
        wrapper._preflight(self, batch=pixel_values.shape[0], patches=int(shapes.prod(-1).max()),
                           tokens=pixel_values.shape[1], prompts=text.shape[-2] + (empty is not None),
                           out_pixels=int(shapes.prod(-1).max()) * ph * pw, device=self.device(),
                           dtype=torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype)
        rel = self._relevance((pixel_values, key_mask, shapes), text, empty, start, prompt_chunk)
        return self._maps(rel, shapes, pixel_values.device, threshold if empty is not None else None)

    def _relevance(self, image: tuple[torch.Tensor, torch.Tensor, torch.Tensor], text: torch.Tensor,
                   empty: torch.Tensor | None, start: int, prompt_chunk: int | None) -> torch.Tensor:
        """``[B, P (+1 for the empty prompt), N]`` summed relevance, from one run of the tower."""
        pixel_values, key_mask, shapes = image
        device = self.device()
        param_dtype = self.param_dtype()
        compute_dtype = torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype
        with torch.inference_mode(False), torch.no_grad():
            # Inference tensors cannot join an autograd graph: clone them into normal tensors.
            px, mask, sh, txt = (
                t.clone() if t.is_inference() else t
                for t in (pixel_values.to(device=device, dtype=param_dtype), key_mask.to(device), shapes.to(device),
                          text.detach().to(device=device, dtype=compute_dtype))
            )
            if empty is not None:  # one extra prompt in the same batched backward
                e = empty.detach().to(device=device, dtype=compute_dtype)
                e = e.clone() if e.is_inference() else e
                e = e.expand(1, -1) if txt.ndim == 2 else e.expand(txt.shape[0], 1, -1)
                txt = torch.cat([txt, e], dim=-2)
            return accumulate_relevance(self.steps((px, mask, sh), start, compute_dtype), txt, prompt_chunk)

    def _maps(self, rel: torch.Tensor, shapes: torch.Tensor, out_device: torch.device,
              threshold: float | None) -> torch.Tensor | list[torch.Tensor]:
        ph, pw = self.patch_size
        maps = []
        for b, (gh, gw) in enumerate(shapes.tolist()):
            r = rel[b : b + 1, :, : gh * gw]  # this image's own patches; the padding is dropped
            if threshold is not None:
                r = apply_empty_prompt_correction(r[:, :-1], r[:, -1:], threshold)
            m = r.reshape(1, r.shape[1], gh, gw).float()
            maps.append(min_max(upsample(m, (gh * ph, gw * pw)))[0].to(out_device))
        if len({tuple(m.shape) for m in maps}) == 1:
            return torch.stack(maps)
        return maps

    def _naflex_inputs(self, image: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpacks and validates ``(pixel_values, key_mask, spatial_shapes)`` before any work.

        Raises:
            TypeError, ValueError: naming the bad input and the fix.
        """
        extra = sorted(k for k in inputs if k not in ("pixel_attention_mask", "spatial_shapes"))
        if extra:
            raise TypeError(f"compute_legrad got unexpected keyword arguments {extra} for Siglip2Model")
        if image is None:
            raise ValueError("image is required: pass the processor output, e.g. image=processor(images=img, "
                             "return_tensors='pt')")
        if isinstance(image, Mapping):
            missing = [k for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes") if k not in image]
            if missing:
                raise ValueError(f"image mapping lacks {missing}; pass the Siglip2 processor output unchanged")
            pixel_values, mask, shapes = image["pixel_values"], image["pixel_attention_mask"], image["spatial_shapes"]
        else:
            pixel_values = image
            mask, shapes = inputs.get("pixel_attention_mask"), inputs.get("spatial_shapes")
            if mask is None or shapes is None:
                raise ValueError(
                    "Siglip2Model needs pixel_attention_mask and spatial_shapes: pass the processor output as "
                    "image=inputs, or compute_legrad(text, image=inputs['pixel_values'], "
                    "pixel_attention_mask=inputs['pixel_attention_mask'], spatial_shapes=inputs['spatial_shapes'])"
                )
        for name, t in (("pixel_values", pixel_values), ("pixel_attention_mask", mask), ("spatial_shapes", shapes)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (use return_tensors='pt')")
        if pixel_values.ndim != 3 or pixel_values.shape[-1] != self.patch_dim:
            raise ValueError(
                f"Siglip2 pixel_values must be pre-patchified [B, N, {self.patch_dim}] (channels * patch_size**2), "
                f"got shape {tuple(pixel_values.shape)}; use the model's Siglip2 image processor"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor, got {pixel_values.dtype}")
        b, n = pixel_values.shape[:2]
        if b == 0 or n == 0:
            raise ValueError(f"pixel_values is empty (shape {tuple(pixel_values.shape)})")
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"pixel_attention_mask must be [B, N] = [{b}, {n}], got {tuple(mask.shape)}")
        if tuple(shapes.shape) != (b, 2) or shapes.is_floating_point():
            raise ValueError(f"spatial_shapes must be an integer [B, 2] = [{b}, 2] tensor, got "
                             f"{tuple(shapes.shape)} {shapes.dtype}")
        if bool((shapes < 1).any()):
            raise ValueError("spatial_shapes must be positive patch counts (rows, columns)")
        counts = shapes.prod(-1).to(mask.device)
        if bool((counts > n).any()):
            raise ValueError(f"spatial_shapes {shapes.tolist()} describe more patches than pixel_values holds ({n})")
        # The processor puts each image's h * w patches first, then padding; the position embeddings
        # are laid out on that assumption, so any other mask is a caller error.
        key_mask = mask.bool()
        expected = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
        if not torch.equal(key_mask, expected):
            raise ValueError(
                "pixel_attention_mask must mark the first spatial_shapes[i].prod() patches of each image as valid "
                "and the rest as padding, as the Siglip2 processor does"
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("pixel_values contains NaN or infinite values")
        return pixel_values, key_mask, shapes

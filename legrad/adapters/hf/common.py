"""Common part of the Hugging Face ``transformers`` adapters: model-class recognition, the stateless
encoder layer (CLIP/SigLIP layout), the text helpers and :class:`HFAdapter`.

Nothing here imports ``transformers`` at module import time; it is only imported once a model that
comes from it is wrapped.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...engine.validation import check_image
from ...ops.attention import merge_heads, split_heads
from ...ops.functional import layer_norm, linear
from ..base import ImageBatch, TowerAdapter

__all__ = [
    "HFAdapter",
    "SUPPORTED_HF_CLASSES",
    "encode_text",
    "pooled_text_features",
    "hf_family",
    "activation",
    "mlp",
    "self_qkv",
    "attn_scale",
    "sdpa",
    "encoder_layer",
    "pixel_values",
]

CLIP_CLASSES = ("CLIPModel", "MetaClip2Model", "AltCLIPModel", "ChineseCLIPModel")
SIGLIP_CLASSES = ("SiglipModel",)
SIGLIP2_CLASSES = ("Siglip2Model",)
#: The ``transformers`` model classes :class:`~legrad.LeWrapper` accepts.
SUPPORTED_HF_CLASSES = CLIP_CLASSES + SIGLIP_CLASSES + SIGLIP2_CLASSES
_FAMILIES = {"clip": CLIP_CLASSES, "siglip": SIGLIP_CLASSES, "siglip2": SIGLIP2_CLASSES}

# Processor outputs that are not image inputs (a processor called with text and images returns both).
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def _hf_classes(names: Sequence[str]) -> tuple[type, ...]:
    import transformers

    # Older releases lack some classes (MetaClip2, Siglip2): those simply cannot be passed in.
    return tuple(c for c in (getattr(transformers, n, None) for n in names) if c is not None)


def _from_transformers(model: Any) -> bool:
    return any(c.__module__.split(".", 1)[0] == "transformers" for c in type(model).__mro__)


def hf_family(model: Any) -> str | None:
    """The family (``"clip"``, ``"siglip"``, ``"siglip2"``) of a transformers model, None for models of
    other libraries.

    Raises:
        TypeError: for a transformers model of an unsupported class (names the supported ones).
    """
    # A transformers model cannot exist unless transformers was imported: no import cost otherwise.
    if sys.modules.get("transformers") is None or not _from_transformers(model):
        return None
    for family, names in _FAMILIES.items():
        classes = _hf_classes(names)
        if classes and isinstance(model, classes):
            return family
    hint = ""
    name = type(model).__name__
    if name.endswith(("VisionModel", "TextModel", "VisionModelWithProjection", "TextModelWithProjection")):
        hint = " (a single tower cannot be explained: load the full two-tower model, e.g. CLIPModel)"
    elif name.endswith("ForConditionalGeneration"):
        hint = (" (vision-language models explained through their answers: LlavaForConditionalGeneration, "
                "LlavaNextForConditionalGeneration, PaliGemmaForConditionalGeneration)")
    raise TypeError(
        f"unsupported Hugging Face model class {name}{hint}. LeWrapper accepts these transformers classes: "
        f"{', '.join(SUPPORTED_HF_CLASSES)}."
    )


def activation(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # transformers' ACT2FN entries are parameter-free modules whose forward is a pure function.
    if any(True for _ in mod.parameters()):
        raise TypeError(f"legrad cannot apply the activation {type(mod).__name__} statelessly (it has parameters)")
    return mod(x)


def mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(mlp.fc2, activation(mlp.activation_fn, linear(mlp.fc1, x)))


def self_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = attn.num_heads
    return (split_heads(linear(attn.q_proj, x), h), split_heads(linear(attn.k_proj, x), h),
            split_heads(linear(attn.v_proj, x), h))


def attn_scale(attn: nn.Module, q: torch.Tensor) -> float:
    return float(getattr(attn, "scale", q.shape[-1] ** -0.5))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def encoder_layer(layer: nn.Module, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """One pre-norm encoder layer (CLIP/SigLIP layout) with eval semantics, from its weights."""
    attn = layer.self_attn
    q, k, v = self_qkv(attn, layer_norm(layer.layer_norm1, x))
    x = x + linear(attn.out_proj, merge_heads(sdpa(q, k, v, key_mask, attn_scale(attn, q))))
    return x + mlp(layer.mlp, layer_norm(layer.layer_norm2, x))


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
    if not isinstance(model, nn.Module):  # a LeWrapper (it delegates to, but is not, the module)
        model = model.model
    if isinstance(texts, str):
        texts = [texts]
    family = hf_family(model)
    kwargs: dict[str, Any] = {"return_tensors": "pt"}
    if family in ("siglip", "siglip2"):
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


class HFAdapter(TowerAdapter):
    """Common part of the transformers adapters: found through ``from_model`` (no ``.visual``)."""

    #: The family :func:`hf_family` names for the model classes this adapter handles.
    hf_kind: ClassVar[str] = ""

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
        return cls(model) if hf_family(model) == cls.hf_kind else None

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

    def own_output(self, model: nn.Module, image: Any) -> torch.Tensor:
        return pooled_text_features(model.get_image_features(pixel_values=image))  # same output types as text

    def encode_prompts(self, model: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised ``[P, D]`` embeddings of ``prompts`` (used for the empty-prompt correction)."""
        return encode_text(model, tokenizer, prompts)

    def prepare_inputs(self, image: Any, **inputs: Any) -> ImageBatch:
        """Accepts the ``[B, C, H, W]`` ``pixel_values`` tensor or the processor's output (a mapping with
        ``pixel_values``). Positional embeddings are always interpolated to the input size, so an
        ``interpolate_pos_encoding`` keyword is accepted and ignored; other keywords are rejected."""
        return self.image_batch(check_image(pixel_values(image, inputs, allowed=("interpolate_pos_encoding",)), self))


def pixel_values(image: Any, inputs: dict[str, Any], allowed: Sequence[str] = ()) -> Any:
    """The ``pixel_values`` in ``image`` (a tensor or a processor output); rejects unknown keywords."""
    extra = sorted(k for k in inputs if k not in allowed)
    if extra:
        raise TypeError(f"compute_legrad got unexpected keyword arguments {extra} for this model")
    if isinstance(image, Mapping):
        if "pixel_values" not in image:
            raise ValueError(f"image mapping has no 'pixel_values' (keys: {sorted(image)}); pass the processor output")
        return image["pixel_values"]
    return image

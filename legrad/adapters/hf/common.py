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
from ...ops.attention import HFSelfAttentionOps
from ...ops.functional import linear
from ..base import ImageBatch
from ..runner import Block, BlockTower, Fn, Run, chain

__all__ = [
    "HFAdapter",
    "SUPPORTED_HF_CLASSES",
    "encode_text",
    "pooled_text_features",
    "hf_family",
    "activation",
    "hf_block",
    "mlp_in",
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
        from ..vlm import SUPPORTED_VLM_CLASSES  # here: the VLM adapters import this module

        hint = f" (vision-language models explained through their answers: {', '.join(SUPPORTED_VLM_CLASSES)})"
    raise TypeError(
        f"unsupported Hugging Face model class {name}{hint}. LeWrapper accepts these transformers classes: "
        f"{', '.join(SUPPORTED_HF_CLASSES)}."
    )


def activation(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # transformers' ACT2FN entries are parameter-free modules whose forward is a pure function.
    if any(True for _ in mod.parameters()):
        raise TypeError(f"legrad cannot apply the activation {type(mod).__name__} statelessly (it has parameters)")
    return mod(x)


def mlp_in(mlp: nn.Module) -> Fn:
    """A transformers MLP up to its final layer: ``activation_fn(fc1(x))``."""
    return lambda x: activation(mlp.activation_fn, linear(mlp.fc1, x))


def hf_block(layer: nn.Module) -> Block:
    """One pre-norm encoder layer (CLIP/SigLIP layout: ``layer_norm1``, ``self_attn``, ``layer_norm2``,
    ``mlp.fc1 -> activation_fn -> mlp.fc2``), declared for the runner."""
    return Block(attn=HFSelfAttentionOps(layer.self_attn), norm1=chain(layer.layer_norm1),
                 norm2=chain(layer.layer_norm2), mlp_in=mlp_in(layer.mlp), mlp_out=chain(layer.mlp.fc2))


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


class HFAdapter(BlockTower):
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
    def from_model(cls, model: nn.Module) -> HFAdapter | None:
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

    def _embed(self, image: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings (+ CLS) ``[B, N, C]`` for a ``[B, C, H, W]`` batch, any size."""
        return self.visual.embeddings(image, interpolate_pos_encoding=True)

    def _run(self, tokens: torch.Tensor, prefix: int, key_mask: torch.Tensor | None = None) -> Run:
        return Run(tokens, [hf_block(layer) for layer in self.visual.encoder.layers], prefix=prefix,
                   key_mask=key_mask)

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

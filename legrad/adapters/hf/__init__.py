"""Hugging Face ``transformers`` vision-language models behind :class:`~legrad.LeWrapper`.

Supported classes (``transformers`` is an optional dependency: ``pip install legrad_torch[hf]``):
``CLIPModel``, ``MetaClip2Model``, ``AltCLIPModel``, ``ChineseCLIPModel`` (:mod:`.clip`),
``SiglipModel`` and ``Siglip2Model`` (NaFlex; :mod:`.siglip`). Nothing here imports ``transformers``:
it is only imported once a model that comes from it is wrapped. As for the open_clip towers, the image
tower is recomputed from its modules' own weights (the embedding layer is called as is; it is a pure
function of the pixels): the model's attention implementation, configs, mode and hooks are never touched.
"""

from .clip import HFClipAdapter
from .common import SUPPORTED_HF_CLASSES, encode_text, pooled_text_features
from .siglip import HFSiglip2Adapter, HFSiglipAdapter

__all__ = ["HFClipAdapter", "HFSiglipAdapter", "HFSiglip2Adapter", "SUPPORTED_HF_CLASSES", "encode_text",
           "pooled_text_features"]

"""Alias of :mod:`legrad.adapters.hf` (the Hugging Face adapters and text helpers), kept for compatibility."""

from .adapters.hf import (
    SUPPORTED_HF_CLASSES,
    HFClipAdapter,
    HFSiglip2Adapter,
    HFSiglipAdapter,
    encode_text,
    pooled_text_features,
)

__all__ = ["HFClipAdapter", "HFSiglipAdapter", "HFSiglip2Adapter", "SUPPORTED_HF_CLASSES", "encode_text",
           "pooled_text_features"]

"""LeGrad for vision-language models: which image patches made a VLM's candidate answer likely.

See :mod:`legrad.adapters.vlm.base` for the method and docs/vlm.md for the guide. Families: transformers
``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` and ``PaliGemmaForConditionalGeneration``.
"""

from .base import VLMAdapter
from .llava import LlavaAdapter
from .next import LlavaNextAdapter
from .paligemma import PaliGemmaAdapter

__all__ = ["VLMAdapter", "LlavaAdapter", "LlavaNextAdapter", "PaliGemmaAdapter", "SUPPORTED_VLM_CLASSES"]

#: The transformers VLM classes legrad explains.
SUPPORTED_VLM_CLASSES = (LlavaAdapter.model_class, LlavaNextAdapter.model_class, PaliGemmaAdapter.model_class)

"""LeGrad for vision-language models: which image patches made a VLM's candidate answer likely.

See :mod:`legrad.adapters.vlm.base` for the method and docs/vlm.md for the guide. Families: transformers
``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``, ``PaliGemmaForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3_5ForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` (DeepStack).
"""

from .base import VLMAdapter
from .llava import LlavaAdapter
from .next import LlavaNextAdapter
from .paligemma import PaliGemmaAdapter
from .qwen import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3_5Adapter, Qwen3VLAdapter

__all__ = ["VLMAdapter", "LlavaAdapter", "LlavaNextAdapter", "PaliGemmaAdapter", "Qwen2VLAdapter",
           "Qwen2_5_VLAdapter", "Qwen3_5Adapter", "Qwen3VLAdapter", "SUPPORTED_VLM_CLASSES"]

#: The transformers VLM classes legrad explains.
SUPPORTED_VLM_CLASSES = (LlavaAdapter.model_class, LlavaNextAdapter.model_class, PaliGemmaAdapter.model_class,
                         Qwen2VLAdapter.model_class, Qwen2_5_VLAdapter.model_class,
                         Qwen3_5Adapter.model_class, Qwen3VLAdapter.model_class)

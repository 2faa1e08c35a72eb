"""LeGrad for vision-language models: which image patches made a VLM's candidate answer likely.

See :mod:`legrad.adapters.vlm.base` for the method and docs/vlm.md for the guide. Families: transformers
``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``, ``PaliGemmaForConditionalGeneration`` and
``Qwen2VLForConditionalGeneration``.
"""

from .base import VLMAdapter
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .llava import LlavaAdapter
from .next import LlavaNextAdapter
from .paligemma import PaliGemmaAdapter
from .qwen import Qwen2VLAdapter

__all__ = ["VLMAdapter", "LlavaAdapter", "LlavaNextAdapter", "PaliGemmaAdapter", "Qwen2VLAdapter",
           "SUPPORTED_VLM_CLASSES"]

#: The transformers VLM classes legrad explains.
SUPPORTED_VLM_CLASSES = (LlavaAdapter.model_class, LlavaNextAdapter.model_class, PaliGemmaAdapter.model_class,
                         Qwen2VLAdapter.model_class)
SUPPORTED_VLM_CLASSES += (Gemma3Adapter.model_class,)
SUPPORTED_VLM_CLASSES += (Idefics3Adapter.model_class, SmolVLMAdapter.model_class)
__all__ += ["Gemma3Adapter", "Idefics3Adapter", "SmolVLMAdapter"]

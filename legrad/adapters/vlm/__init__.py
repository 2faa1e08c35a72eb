"""LeGrad for vision-language models: which image patches made a VLM's candidate answer likely.

See :mod:`legrad.adapters.vlm.base` for the method and docs/vlm.md for the guide. Families: transformers
``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``, ``PaliGemmaForConditionalGeneration`` and
``Qwen2VLForConditionalGeneration``, ``InternVLForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``, ``Mistral3ForConditionalGeneration``.
"""

from .base import VLMAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .mistral3 import Mistral3Adapter
from .next import LlavaNextAdapter
from .onevision import LlavaOnevisionAdapter
from .paligemma import PaliGemmaAdapter
from .qwen import Qwen2VLAdapter

__all__ = ["VLMAdapter", "LlavaAdapter", "LlavaNextAdapter", "PaliGemmaAdapter", "Qwen2VLAdapter",
           "SUPPORTED_VLM_CLASSES"]

#: The transformers VLM classes legrad explains.
SUPPORTED_VLM_CLASSES = (LlavaAdapter.model_class, LlavaNextAdapter.model_class, PaliGemmaAdapter.model_class,
                         Qwen2VLAdapter.model_class)

__all__ += ["InternVLAdapter"]
SUPPORTED_VLM_CLASSES += (InternVLAdapter.model_class,)
__all__ += ["LlavaOnevisionAdapter"]
SUPPORTED_VLM_CLASSES += (LlavaOnevisionAdapter.model_class,)
__all__ += ["Mistral3Adapter"]
SUPPORTED_VLM_CLASSES += (Mistral3Adapter.model_class,)

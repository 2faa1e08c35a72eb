"""LeGrad for vision-language models: which image patches made a VLM's candidate answer likely.

See :mod:`legrad.adapters.vlm.base` for the method and docs/vlm.md for the guide (the table of families).
"""

from .base import VLMAdapter
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .mistral3 import Mistral3Adapter
from .next import LlavaNextAdapter
from .onevision import LlavaOnevisionAdapter
from .paligemma import PaliGemmaAdapter
from .qwen import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3_5Adapter, Qwen3VLAdapter

#: The family adapters, one per transformers class (one line each).
FAMILIES = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    PaliGemmaAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3_5Adapter,
    Qwen3VLAdapter,
    InternVLAdapter,
    Gemma3Adapter,
    Idefics3Adapter,
    SmolVLMAdapter,
    Mistral3Adapter,
)

#: The transformers VLM classes legrad explains.
SUPPORTED_VLM_CLASSES = tuple(f.model_class for f in FAMILIES)

__all__ = ["VLMAdapter", "FAMILIES", "SUPPORTED_VLM_CLASSES", *(f.__name__ for f in FAMILIES)]

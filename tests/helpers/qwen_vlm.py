"""The Qwen line's real processors built offline (the word-level tokenizer of :mod:`helpers.vlm_models`, the
family's own image, video and processor classes, a ``save_pretrained`` / ``from_pretrained`` round trip) and the
processor's whole output for one image. Import after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import numpy as np
import transformers
from PIL import Image

from . import vlm_models as V

#: 8 px patches, 2 x 2 merges, 2 frames per temporal patch (what the tiny Qwen towers of the tests use).
PATCHING = dict(patch_size=8, merge_size=2, temporal_patch_size=2)


def qwen_processor(path, processor_class: str = "Qwen2VLProcessor", image_processor_class: str = "Qwen2VLImageProcessor",
                   video_processor_class: str = "Qwen2VLVideoProcessor"):
    """The processor ``processor_class`` with its image processor (16..64 px sides) and video processor, through a
    ``save_pretrained`` / ``from_pretrained`` round trip; ``<image>`` is the image token."""
    image_processor = getattr(transformers, image_processor_class)(
        **PATCHING, size={"shortest_edge": 16 * 16 * 4, "longest_edge": 64 * 64})
    processor = getattr(transformers, processor_class)(
        image_processor=image_processor, tokenizer=V.tokenizer(),
        video_processor=getattr(transformers, video_processor_class)(**PATCHING))
    processor.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


def processor_inputs(processor, size: tuple[int, int] = (40, 48)):
    """The processor's whole output for one ``size`` (H, W) noise image and a prompt with the vision start/end tokens
    (w60, w61) around the image."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))
    return processor(images=img, text="<s> w60 <image> w61 what is in the picture ?", return_tensors="pt")

"""The Qwen line's real processors built offline (the word-level tokenizer of :mod:`helpers.vlm_models`, the
family's own image, video and processor classes, a ``save_pretrained`` / ``from_pretrained`` round trip) and the
processor's whole output for one image, and the tiny Qwen-line models the tests share. Import after
``pytest.importorskip("transformers")``."""

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


START, END = 60, 61  # vision start / end tokens of the tiny models
FULL = [1, 3]  # Qwen2.5-VL's fullatt_block_indexes: blocks 0 and 2 attend within windows
TAPS = [0, 2]  # Qwen3-VL's deepstack_visual_indexes
QWEN3_VISION = dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=48, patch_size=8,
                    temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_position_embeddings=16)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}
_TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=V.VOCAB, max_position_embeddings=256, pad_token_id=0)
_TOKENS = dict(image_token_id=V.IMAGE_TOKEN, video_token_id=62, vision_start_token_id=START, vision_end_token_id=END)


def qwen2_vl(seed: int = 0):
    """Qwen2-VL-shaped: 3 ViT blocks (8 px patches, 2 x 2 merges), Qwen2 LM with M-RoPE."""
    vc = dict(depth=3, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=48, patch_size=8, temporal_patch_size=2,
              spatial_merge_size=2, in_channels=3)
    cfg = transformers.Qwen2VLConfig(vision_config=vc, text_config=dict(_TEXT, rope_parameters=_MROPE), **_TOKENS)
    return V._init(transformers.Qwen2VLForConditionalGeneration(cfg), seed)


def qwen2_5_vl(seed: int = 0):
    """Qwen2.5-VL-shaped: 4 ViT blocks, window attention outside :data:`FULL` (32 px windows)."""
    vc = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=48, patch_size=8,
              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=32, fullatt_block_indexes=FULL)
    cfg = transformers.Qwen2_5_VLConfig(vision_config=vc, text_config=dict(_TEXT, rope_parameters=_MROPE), **_TOKENS)
    return V._init(transformers.Qwen2_5_VLForConditionalGeneration(cfg), seed)


def qwen3_5(seed: int = 0):
    """Qwen3.5-shaped: Qwen3 ViT tower (:data:`QWEN3_VISION`), hybrid linear / full-attention LM."""
    tc = dict(_TEXT, head_dim=12, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
              linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    cfg = transformers.Qwen3_5Config(vision_config=QWEN3_VISION, text_config=tc, **_TOKENS)
    return V._init(transformers.Qwen3_5ForConditionalGeneration(cfg), seed)


def qwen3_vl(seed: int = 0):
    """Qwen3-VL-shaped: Qwen3 ViT tower of 4 blocks with DeepStack taps :data:`TAPS`, 3-layer LM."""
    vc = dict(QWEN3_VISION, depth=4, deepstack_visual_indexes=TAPS)
    tc = dict(_TEXT, num_hidden_layers=3, head_dim=12, rope_parameters=dict(_MROPE, mrope_interleaved=True))
    cfg = transformers.Qwen3VLConfig(vision_config=vc, text_config=tc, **_TOKENS)
    return V._init(transformers.Qwen3VLForConditionalGeneration(cfg), seed)

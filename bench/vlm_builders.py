"""Builders of the random-init VLMs :mod:`bench_vlm` times: one :class:`Family` per transformers class in
:data:`FAMILIES`, each ``(size, lm_layers, dtype) -> Built`` for ``size`` "tiny" (toy widths) or "real" (a named
checkpoint's widths, heads, MLP sizes, vocabulary and vision tower, with ``lm_layers`` language-model layers; a
family whose real shapes are not stated here, or are too costly for a CPU row, raises NotImplementedError with the
reason). Offline: configs only, no downloads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _pixels(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


@dataclass
class Built:
    """A random-init VLM and the pixel part of its processor output for one image.

    Attributes:
        model: the model, in eval mode.
        pixels: ``pixel_values`` and the family's other per-image keys (``image_grid_thw``, ``image_sizes``).
        before, after: token ids framing the image's placeholder tokens (``<vision_start>``...).
        token_types: the token-type key the family's processor returns (``"token_type_ids"``,
            ``"mm_token_type_ids"``) or None; ``types`` says what they mark.
        shape: what the row measures, for the table.
    """

    model: torch.nn.Module
    pixels: dict[str, torch.Tensor]
    before: list[int]
    after: list[int]
    token_types: str | None
    shape: str
    types: str = "image"  # the token types mark the image tokens, or "suffix": the answer (PaliGemma)


def _llava(size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size == "tiny":
        vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                image_size=32, patch_size=8)
        tc = T.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=lm_layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, max_position_embeddings=512)
        image_token, shape = 63, "CLIP 4 x 32, 32 px; Llama 48 wide"
    else:  # LLaVA-1.5-7B
        vc = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14, hidden_act="quick_gelu")
        tc = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                           max_position_embeddings=4096)
        image_token, shape = 32000, "LLaVA-1.5-7B: CLIP ViT-L/14 (24 blocks), 336 px, 577 tokens; Llama 4096 wide"
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token, vision_feature_layer=-2,
                        vision_feature_select_strategy="default")
    model = T.LlavaForConditionalGeneration(cfg).to(dtype).eval()
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=torch.Generator().manual_seed(1))
    return Built(model, {"pixel_values": pixels.to(dtype)}, [], [], None, shape)


def _llava_next(size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size != "tiny":
        raise NotImplementedError("real-width LLaVA-NeXT (5 tiles of 577 tokens) is not benchmarked here")
    vc = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8)
    tc = T.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=lm_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=512)
    cfg = T.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=63, vision_feature_layer=-2,
                            vision_feature_select_strategy="default",
                            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    model = T.LlavaNextForConditionalGeneration(cfg).to(dtype).eval()
    pixels = torch.randn(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    return Built(model, {"pixel_values": pixels, "image_sizes": torch.tensor([[64, 64]])}, [], [], None,
                 "CLIP 3 x 32 on 5 tiles of 32 px; Llama 48 wide")


def _paligemma(size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size == "tiny":
        vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=32, patch_size=8, projection_dim=48)
        tc = T.GemmaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=lm_layers, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=12, vocab_size=64)
        image_token, shape = 63, "SigLIP 3 x 32, 32 px; Gemma 48 wide"
    else:  # PaliGemma-3B-224
        vc = T.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                  num_attention_heads=16, image_size=224, patch_size=14, projection_dim=2048)
        tc = T.GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=lm_layers,
                           num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216)
        image_token, shape = 257152, "PaliGemma-3B: SigLIP So400m (27 blocks), 224 px, 256 tokens; Gemma 2048 wide"
    cfg = T.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_id=image_token,
                            projection_dim=tc.hidden_size)
    model = T.PaliGemmaForConditionalGeneration(cfg).to(dtype).eval()
    pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=torch.Generator().manual_seed(1))
    return Built(model, {"pixel_values": pixels.to(dtype)}, [], [], "token_type_ids", shape, "suffix")


def _qwen_vl(cls_name: str, config_name: str, size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    """Qwen2-VL / Qwen2.5-VL (same language model; Qwen2.5-VL's tower has SwiGLU MLPs and windowed attention)."""
    import transformers as T

    qwen25 = cls_name.startswith("Qwen2_5")
    if size == "tiny":
        vc = dict(depth=4, num_heads=4, hidden_size=32, out_hidden_size=48, intermediate_size=64, window_size=32,
                  fullatt_block_indexes=[1, 3]) if qwen25 else dict(depth=4, embed_dim=32, num_heads=4, mlp_ratio=2,
                                                                   hidden_size=48)
        vc |= dict(patch_size=8, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        tc = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=lm_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=512,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]})
        ids, grid = dict(image_token_id=63, video_token_id=62, vision_start_token_id=60, vision_end_token_id=61), 8
        shape = f"Qwen ViT 4 x 32, {grid * 8} px; Qwen2 48 wide"
    else:  # Qwen2-VL-7B / Qwen2.5-VL-7B
        vc = dict(depth=32, num_heads=16, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31]) if qwen25 else dict(
            depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584)
        vc |= dict(patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        tc = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=lm_layers, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
        ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
        grid = 24
        shape = (f"{'Qwen2.5' if qwen25 else 'Qwen2'}-VL-7B: Qwen ViT 32 x 1280, {grid * 14} px, {grid * grid} patches, "
                 f"{grid * grid // 4} tokens; Qwen2 3584 wide")
    cfg = getattr(T, config_name)(vision_config=vc, text_config=tc, **ids)
    model = getattr(T, cls_name)(cfg).to(dtype).eval()
    dim = 3 * 2 * vc["patch_size"] ** 2
    pixels = torch.randn(grid * grid, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    return Built(model, {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, grid, grid]])},
                 [ids["vision_start_token_id"]], [ids["vision_end_token_id"]], "mm_token_type_ids", shape)


_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
_TINY_TEXT = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                  max_position_embeddings=512)


def _onevision(size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size != "tiny":
        raise NotImplementedError("real-width LLaVA-OneVision (up to 10 tiles of 729 tokens) is not benchmarked here")
    vc = T.SiglipVisionConfig(**_TINY_VISION, image_size=32, patch_size=8)
    tc = T.Qwen2Config(**_TINY_TEXT, num_hidden_layers=lm_layers)
    cfg = T.LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=63, video_token_id=62,
                                 vision_feature_layer=-2, vision_feature_select_strategy="full",
                                 image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    model = T.LlavaOnevisionForConditionalGeneration(cfg).to(dtype).eval()
    return Built(model, {"pixel_values": _pixels(1, 5, 3, 32, 32, dtype=dtype), "image_sizes": torch.tensor([[64, 64]])},
                 [], [], None, "SigLIP 3 x 32 on 5 tiles of 32 px; Qwen2 48 wide")


def _gemma3(size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size != "tiny":  # Gemma-3-4B: SigLIP So400m at 896 px is 4096 patches x 27 blocks
        raise NotImplementedError("real-width Gemma 3 (896 px: 4096 patches through 27 SigLIP blocks, several TFLOP "
                                  "per tower pass) is too slow for a one-thread CPU row")
    vc = T.SiglipVisionConfig(**_TINY_VISION, image_size=32, patch_size=8)
    tc = T.Gemma3TextConfig(**(_TINY_TEXT | dict(num_key_value_heads=1)), head_dim=12, num_hidden_layers=lm_layers,
                            sliding_window=4, layer_types=["sliding_attention"] * (lm_layers - 1) + ["full_attention"])
    cfg = T.Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=4, boi_token_index=60,
                         eoi_token_index=61, image_token_index=63)
    model = T.Gemma3ForConditionalGeneration(cfg).to(dtype).eval()
    return Built(model, {"pixel_values": _pixels(1, 3, 32, 32, dtype=dtype)}, [60], [61], "token_type_ids",
                 "SigLIP 3 x 32, 32 px, 2 x 2 pooled to 4 tokens; Gemma 3 48 wide")


def _internvl(size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size == "tiny":
        vc = dict(_TINY_VISION, image_size=48, patch_size=8, use_qk_norm=True, norm_type="rms_norm",
                  use_mean_pooling=False)
        tc = dict(_TINY_TEXT, model_type="qwen2", num_hidden_layers=lm_layers)
        ids, side = (63, 59, 60), 48
        shape = "InternViT 3 x 32, 48 px, 9 tokens; Qwen2 48 wide"
    else:  # InternVL3-8B: InternViT-300M + Qwen2.5-7B
        vc = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=448, patch_size=14, use_qk_norm=False, norm_type="layer_norm", use_mean_pooling=True)
        tc = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=lm_layers,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768,
                  rope_theta=1000000.0)
        ids, side = (151667, 151665, 151666), 448
        shape = "InternVL3-8B: InternViT-300M (24 x 1024), 448 px, 256 tokens; Qwen2.5 3584 wide"
    cfg = T.InternVLConfig(vision_config=vc, text_config=tc, image_token_id=ids[0], vision_feature_layer=-1,
                           downsample_ratio=0.5)
    model = T.InternVLForConditionalGeneration(cfg).to(dtype).eval()
    return Built(model, {"pixel_values": _pixels(1, 3, side, side, dtype=dtype)}, [ids[1]], [ids[2]], None, shape)


def _idefics3(cls_name: str, size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size != "tiny":
        raise NotImplementedError("real-width Idefics3 / SmolVLM (image splitting into up to 17 tiles) is not "
                                  "benchmarked here")
    smol = cls_name.startswith("SmolVLM")
    vc = dict(_TINY_VISION, image_size=32, patch_size=8)
    tc = T.LlamaConfig(**(_TINY_TEXT | dict(vocab_size=100)), num_hidden_layers=lm_layers)
    cfg = (T.SmolVLMConfig if smol else T.Idefics3Config)(vision_config=vc, text_config=tc, scale_factor=2,
                                                          image_token_id=63)
    model = getattr(T, cls_name)(cfg).to(dtype).eval()
    pixels = {"pixel_values": _pixels(1, 1, 3, 32, 32, dtype=dtype),
              "pixel_attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.bool)}
    return Built(model, pixels, [58, 59], [58], None, "SigLIP 3 x 32, 32 px, one tile, 4 tokens; Llama 48 wide")


def _mistral3(size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    import transformers as T

    if size != "tiny":
        raise NotImplementedError("real-width Mistral 3 (Pixtral tower, 5120-wide LM) is not benchmarked here")
    vc = dict(_TINY_VISION, head_dim=8, image_size=32, patch_size=4)
    tc = dict(_TINY_TEXT, head_dim=12, num_hidden_layers=lm_layers)
    cfg = T.Mistral3Config(vision_config=vc, text_config=tc, image_token_id=63, spatial_merge_size=2,
                           vision_feature_layer=-1)
    model = T.Mistral3ForConditionalGeneration(cfg).to(dtype).eval()
    return Built(model, {"pixel_values": _pixels(1, 3, 32, 32, dtype=dtype), "image_sizes": torch.tensor([[32, 32]])},
                 [], [61], None, "Pixtral 3 x 32, 32 px (patch 4), 16 tokens; Mistral 48 wide")


def _qwen3(cls_name: str, size: str, lm_layers: int, dtype: torch.dtype) -> Built:
    """Qwen3-VL (DeepStack taps) and Qwen3.5 (hybrid linear / full-attention LM), both on the Qwen3 ViT."""
    import transformers as T

    qwen35 = cls_name.startswith("Qwen3_5")
    if size == "tiny":
        vc = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=48, patch_size=8,
                  num_position_embeddings=16)
        tc = dict(_TINY_TEXT, head_dim=12, num_hidden_layers=lm_layers)
        ids, grid, mrope, shape = (63, 62, 60, 61), 8, [2, 2, 2], "Qwen3 ViT 4 x 32, 64 px; {} 48 wide"
    elif qwen35:
        raise NotImplementedError("real-width Qwen3.5 is not benchmarked here")
    else:  # Qwen3-VL-8B
        vc = dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096,
                  patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
        tc = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=lm_layers, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=32768)
        ids, grid, mrope = (151655, 151656, 151652, 151653), 24, [24, 20, 20]
        shape = "Qwen3-VL-8B: Qwen3 ViT 27 x 1152, 384 px, 144 tokens; {} 4096 wide"
    vc |= dict(temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    if qwen35:
        tc |= dict(layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(lm_layers)],
                   linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    else:
        vc.setdefault("deepstack_visual_indexes", [0, 2])
        tc["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0 if size == "real" else 10000.0,
                                 "mrope_section": mrope, "mrope_interleaved": True}
    tokens = dict(image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3])
    cfg = getattr(T, "Qwen3_5Config" if qwen35 else "Qwen3VLConfig")(vision_config=vc, text_config=tc, **tokens)
    model = getattr(T, cls_name)(cfg).to(dtype).eval()
    pixels = _pixels(grid * grid, 3 * 2 * vc["patch_size"] ** 2, dtype=dtype)
    return Built(model, {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, grid, grid]])}, [ids[2]], [ids[3]],
                 "mm_token_type_ids", shape.format("Qwen3.5 hybrid" if qwen35 else "Qwen3"))


@dataclass(frozen=True)
class Family:
    """One benchmarked family: its short name and its builder ``(size, lm_layers, dtype) -> Built``."""

    name: str
    build: Callable[[str, int, torch.dtype], Built]


def _by_class(builder: Callable[..., Built], cls_name: str, *args: str) -> Callable[[str, int, torch.dtype], Built]:
    return lambda s, n, d: builder(cls_name, *args, s, n, d)


#: One entry per family, keyed by the transformers class name (a new family plugs in here; tests/test_bench_vlm.py
#: requires one for every class in legrad.adapters.vlm.SUPPORTED_VLM_CLASSES).
FAMILIES: dict[str, Family] = {
    "LlavaForConditionalGeneration": Family("llava", _llava),
    "LlavaNextForConditionalGeneration": Family("llava-next", _llava_next),
    "LlavaOnevisionForConditionalGeneration": Family("llava-onevision", _onevision),
    "PaliGemmaForConditionalGeneration": Family("paligemma", _paligemma),
    "Qwen2VLForConditionalGeneration": Family(
        "qwen2-vl", _by_class(_qwen_vl, "Qwen2VLForConditionalGeneration", "Qwen2VLConfig")),
    "Qwen2_5_VLForConditionalGeneration": Family(
        "qwen2.5-vl", _by_class(_qwen_vl, "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig")),
    "Qwen3_5ForConditionalGeneration": Family("qwen3.5", _by_class(_qwen3, "Qwen3_5ForConditionalGeneration")),
    "Qwen3VLForConditionalGeneration": Family("qwen3-vl", _by_class(_qwen3, "Qwen3VLForConditionalGeneration")),
    "InternVLForConditionalGeneration": Family("internvl", _internvl),
    "Gemma3ForConditionalGeneration": Family("gemma3", _gemma3),
    "Idefics3ForConditionalGeneration": Family("idefics3", _by_class(_idefics3, "Idefics3ForConditionalGeneration")),
    "SmolVLMForConditionalGeneration": Family("smolvlm", _by_class(_idefics3, "SmolVLMForConditionalGeneration")),
    "Mistral3ForConditionalGeneration": Family("mistral3", _mistral3),
}

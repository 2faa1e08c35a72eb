"""Tiny VLMs of the non-Qwen families and their REAL processors built offline (the word-level tokenizer of
:mod:`helpers.vlm_models` extended with each family's image tokens, the family's own image processor and processor
classes, a ``save_pretrained`` / ``from_pretrained`` round trip); the Qwen line's are in :mod:`helpers.qwen_vlm`.
Shared by the per-family tests and the contract test over every family (tests/test_vlm_families.py). Import after
``pytest.importorskip("transformers")``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from . import vlm_models as V

#: LLaVA-NeXT / LLaVA-OneVision any-resolution grids of the tiny models (32 px tiles).
PINS = [[32, 64], [64, 32], [64, 64]]


def image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """An ``(H, W)`` RGB noise image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def round_trip(processor, path: Path):
    """``processor`` saved to ``path`` and loaded back with ``AutoProcessor`` (what a user's folder gives)."""
    processor.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


def word_tokenizer(special: dict[str, int], extra: dict[str, str], vocab_size: int = V.VOCAB):
    """The word-level tokenizer of :mod:`helpers.vlm_models` with ``special`` tokens at fixed ids (replacing the
    fillers there) and ``extra`` named special tokens (``{"image_token": "<image>"}``)."""
    vocab = {w: i for i, w in enumerate(V.WORDS)}
    vocab.update({f"w{i}": i for i in range(len(V.WORDS), vocab_size) if i not in special.values()})
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([*special, "<s>", "</s>", "<pad>", "<unk>"])  # split out even when glued together
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>", extra_special_tokens=extra)


# ---------------------------------------------------------------- LLaVA, LLaVA-NeXT, PaliGemma (helpers.vlm_models)
def llava_processor(path: Path):
    """LLaVA-1.5's processor at the tiny model's size (32 px, patch 8: 16 image tokens)."""
    return round_trip(transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=V.tokenizer(), patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1), path)


def llava_next_processor(path: Path):
    """LLaVA-NeXT's processor at the tiny model's size: 32 px tiles on :data:`PINS`, patch 8, class token dropped."""
    size = {"shortest_edge": 32}
    return round_trip(transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor(size=size, crop_size={"height": 32, "width": 32},
                                                            image_grid_pinpoints=PINS),
        tokenizer=V.tokenizer(), patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1), path)


def paligemma_processor(path: Path):
    """PaliGemma's processor (SigLIP image processor at 32 px, 16 image tokens)."""
    image_processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = V.GRID ** 2
    return round_trip(transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=V.tokenizer()), path)


# ---------------------------------------------------------------- LLaVA-OneVision
def onevision(aspect: str = "anyres_max_9", seed: int = 0):
    """LLaVA-OneVision-shaped: SigLIP tower on 32 px tiles ("full" selection), :data:`PINS`, Qwen2 LM."""
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=32, patch_size=8)
    tc = transformers.Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=V.VOCAB, max_position_embeddings=512,
                                  pad_token_id=0)
    cfg = transformers.LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=V.IMAGE_TOKEN,
                                            video_token_id=62, vision_feature_layer=-2,
                                            vision_feature_select_strategy="full", image_grid_pinpoints=PINS,
                                            vision_aspect_ratio=aspect)
    return V._init(transformers.LlavaOnevisionForConditionalGeneration(cfg), seed)


def onevision_processor(path: Path, aspect: str = "anyres_max_9"):
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    size = {"height": 32, "width": 32}
    return round_trip(transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size=size, crop_size=size, image_grid_pinpoints=PINS),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=V.tokenizer(), num_image_tokens=V.GRID ** 2,
        vision_feature_select_strategy="full", video_token="w62", vision_aspect_ratio=aspect), path)


# ---------------------------------------------------------------- Gemma 3
GEMMA3_BOI, GEMMA3_EOI = 60, 61
GEMMA3_TOKENS = 4  # mm_tokens_per_image: the 4 x 4 patch grid pooled 2 x 2


def gemma3(seed: int = 0, softcap: float | None = 3.0):
    """Gemma-3-shaped: SigLIP tower (4 x 4 patches), 2 x 2 pooling projector, a sliding-window and a global layer,
    final logit soft-capping configured (the model's own head does not apply it)."""
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=32, patch_size=8)
    tc = transformers.Gemma3TextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, head_dim=12, vocab_size=V.VOCAB, pad_token_id=0,
                                       sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                       final_logit_softcapping=softcap)
    cfg = transformers.Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=GEMMA3_TOKENS,
                                    boi_token_index=GEMMA3_BOI, eoi_token_index=GEMMA3_EOI,
                                    image_token_index=V.IMAGE_TOKEN)
    return V._init(transformers.Gemma3ForConditionalGeneration(cfg), seed)


def gemma3_tokenizer():
    """Word-level tokenizer with Gemma 3's image tokens (ids 60, 61, 63)."""
    special = {"<start_of_image>": GEMMA3_BOI, "<end_of_image>": GEMMA3_EOI, "<image_soft_token>": V.IMAGE_TOKEN}
    return word_tokenizer(special, {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                    "eoi_token": "<end_of_image>"})


def gemma3_processor(path: Path):
    return round_trip(transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=gemma3_tokenizer(), image_seq_length=GEMMA3_TOKENS), path)


# ---------------------------------------------------------------- InternVL
INTERNVL_SIZE, INTERNVL_PATCH = 48, 8  # a 6 x 6 patch grid, pixel-shuffled to 3 x 3 = 9 image tokens
INTERNVL_SEQ = (INTERNVL_SIZE // INTERNVL_PATCH // 2) ** 2
INTERNVL_SPECIAL = {"start_image_token": ("<img>", 59), "end_image_token": ("</img>", 60),
                    "video_token": ("<video>", 61), "context_image_token": ("<IMG_CONTEXT>", V.IMAGE_TOKEN)}
INTERNVL_CONFIGS = {
    # InternVL 2.5/3-like: q/k RMSNorm, RMSNorm blocks, features of the last block through the final layernorm.
    "qk_rms_last": dict(vision=dict(use_qk_norm=True, norm_type="rms_norm", use_mean_pooling=False), layer=-1,
                        blocks=[1, 2], every=[0, 1, 2]),
    # LayerNorm blocks, no q/k norm, features from hidden_states[-2] (blocks 0 and 1 feed).
    "layer_norm_minus2": dict(vision=dict(use_qk_norm=False, norm_type="layer_norm"), layer=-2, blocks=[0, 1],
                              every=[0, 1]),
}


def internvl(case: str = "qk_rms_last", seed: int = 0):
    """InternVL-shaped (:data:`INTERNVL_CONFIGS`): InternViT tower, pixel shuffle + MLP projector, Qwen2 LM."""
    spec = INTERNVL_CONFIGS[case]
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=INTERNVL_SIZE, patch_size=INTERNVL_PATCH, **spec["vision"])
    tc = dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=V.VOCAB, max_position_embeddings=256, pad_token_id=0)
    cfg = transformers.InternVLConfig(vision_config=vc, text_config=tc, image_token_id=V.IMAGE_TOKEN,
                                      vision_feature_layer=spec["layer"], attn_implementation="eager")
    return V._init(transformers.InternVLForConditionalGeneration(cfg), seed)


def internvl_tokenizer():
    """Word-level tokenizer with InternVL's image tokens (ids 59-61, 63)."""
    return word_tokenizer({t: i for t, i in INTERNVL_SPECIAL.values()},
                          {k: t for k, (t, _) in INTERNVL_SPECIAL.items()})


def internvl_processor(path: Path):
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    size = {"height": INTERNVL_SIZE, "width": INTERNVL_SIZE}
    return round_trip(transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessor(size=size, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size), tokenizer=internvl_tokenizer(),
        image_seq_length=INTERNVL_SEQ), path)


# ---------------------------------------------------------------- Idefics3 and SmolVLM
IDEFICS3_SPECIAL = {"<fake_token_around_image>": 58, "<global-img>": 59, "<end_of_utterance>": 60, "<video>": 61,
                    "<image>": V.IMAGE_TOKEN}
IDEFICS3_SPECIAL.update({f"<row_{i}_col_{j}>": 64 + 6 * (i - 1) + (j - 1) for i in range(1, 7) for j in range(1, 7)})
IDEFICS3_VOCAB = 100


def has_family(module: str) -> bool:
    """Whether the installed transformers has ``transformers.models.<module>``."""
    return importlib.util.find_spec(f"transformers.models.{module}") is not None


def idefics3_tokenizer():
    """Word-level tokenizer with the Idefics3 / SmolVLM image tokens."""
    return word_tokenizer(IDEFICS3_SPECIAL, {
        "image_token": "<image>", "fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>", "video_token": "<video>"}, IDEFICS3_VOCAB)


def idefics3(family: str = "idefics3", seed: int = 0):
    """Idefics3- / SmolVLM-shaped: 4 x 4 patches shuffled 2 x 2 into 4 image tokens, Llama LM."""
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
    tc = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=IDEFICS3_VOCAB, pad_token_id=0)
    if family == "idefics3":
        cfg, cls = transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration
    else:
        cfg, cls = transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration
    return V._init(cls(cfg(vision_config=vc, text_config=tc, scale_factor=2, image_token_id=V.IMAGE_TOKEN)), seed)


def idefics3_processor(family: str, path: Path):
    """The family's processor with ``do_image_splitting=False`` (32 px, 4 image tokens); SmolVLM's needs the
    num2words package (the caller skips without it)."""
    kwargs = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    if family == "idefics3":
        proc = transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessor(**kwargs),
                                              tokenizer=idefics3_tokenizer(), image_seq_len=4)
    else:
        proc = transformers.SmolVLMProcessor(image_processor=transformers.SmolVLMImageProcessor(**kwargs),
                                             video_processor=transformers.SmolVLMVideoProcessor(),
                                             tokenizer=idefics3_tokenizer(), image_seq_len=4)
    return round_trip(proc, path)

# Mistral 3: images resized to a longest edge of 32 px, multiples of 8 px (grids up to 8 x 8).
MISTRAL3_PATCH, MISTRAL3_MERGE, MISTRAL3_EDGE = 4, 2, 32
MISTRAL3_SPECIAL = {"[IMG]": V.IMAGE_TOKEN, "[IMG_BREAK]": 60, "[IMG_END]": 61}
MISTRAL3_CONFIGS = {
    "last": dict(layer=-1, blocks=[1, 2], every=[0, 1, 2]),  # every block feeds (Mistral Small 3.1's setting)
    "minus2": dict(layer=-2, blocks=[0, 1], every=[0, 1]),  # hidden_states[-2]: blocks 0 and 1 feed
}


def mistral3(case: str = "last", seed: int = 0):
    """Mistral-3-shaped: a 3-block Pixtral tower (patch 4), 2 x 2 patch merger, Mistral LM (:data:`MISTRAL3_CONFIGS`)."""
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=8,
              image_size=MISTRAL3_EDGE, patch_size=MISTRAL3_PATCH)
    tc = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=12, vocab_size=V.VOCAB, max_position_embeddings=256, pad_token_id=0)
    cfg = transformers.Mistral3Config(vision_config=vc, text_config=tc, image_token_id=V.IMAGE_TOKEN,
                                      spatial_merge_size=MISTRAL3_MERGE, vision_feature_layer=MISTRAL3_CONFIGS[case]["layer"],
                                      attn_implementation="eager")
    return V._init(transformers.Mistral3ForConditionalGeneration(cfg), seed)


def mistral3_tokenizer():
    """The word-level tokenizer of ``helpers.vlm_models`` with Pixtral's image tokens (ids 60, 61, 63)."""
    vocab = {w: i for i, w in enumerate(V.WORDS)}
    vocab.update({f"w{i}": i for i in range(len(V.WORDS), V.IMAGE_TOKEN)})
    for token, i in MISTRAL3_SPECIAL.items():
        vocab.pop(f"w{i}", None)
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([*MISTRAL3_SPECIAL, "<s>", "</s>", "<pad>", "<unk>"])  # split out even when glued together
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def mistral3_processor(path: Path):
    """Pixtral's processor (longest edge 32 px, patch 4, merge 2), round-tripped."""
    processor = transformers.PixtralProcessor(
        image_processor=transformers.PixtralImageProcessor(size={"longest_edge": MISTRAL3_EDGE},
                                                           patch_size={"height": MISTRAL3_PATCH, "width": MISTRAL3_PATCH}),
        tokenizer=mistral3_tokenizer(), patch_size=MISTRAL3_PATCH, spatial_merge_size=MISTRAL3_MERGE)
    processor.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)

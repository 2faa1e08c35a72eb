"""A tiny random LLaVA saved with a real processor (offline), whose tokenizer names every id of the model's
vocabulary (the model's own answers decode to words), and the independent checks of the model's own answer:
generate's new tokens and raw logits, and the teacher-forced log-probabilities of the model's own forward.
Import after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers as T
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from helpers import vlm_models as V

#: Every id below the image token has a name: the answers of the random model decode to words.
WORDS = V.WORDS + [f"w{i}" for i in range(len(V.WORDS), V.IMAGE_TOKEN)]
EOS = 2


def tokenizer() -> T.PreTrainedTokenizerFast:
    """A word-level fast tokenizer over :data:`WORDS` plus ``<image>`` (id 63), left padding (generation)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<image>"] = V.IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image>", "<s>", "</s>", "<pad>", "<unk>"])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>", padding_side="left")


def llava_processor() -> T.LlavaProcessor:
    """LLaVA-1.5's processor, at the tiny model's size (32 px, patch 8: 16 image tokens)."""
    return T.LlavaProcessor(
        image_processor=T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer(), patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)


def image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def save_llava(root: Path) -> tuple[torch.nn.Module, T.LlavaProcessor, Path]:
    """The tiny LLaVA and its processor saved in ``root / "llava"`` (``--model hf:DIR``), and an image."""
    model, processor = V.llava(), llava_processor()
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    image().save(root / "img.png")
    return model, processor, root / "img.png"


def generated(model, inputs: dict, max_new_tokens: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """generate's own greedy new tokens ``[B, n]`` (padding included) and its raw logits ``[B, n, V]``."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


def teacher_forced(model, inputs: dict, row: int, answer: torch.Tensor) -> torch.Tensor:
    """``[T]`` log-probs of ``answer`` after row ``row``'s real prompt tokens, from the model's own forward on
    the unpadded sequence (``input_ids`` = prompt + answer)."""
    real = inputs["attention_mask"][row].bool()
    prompt = inputs["input_ids"][row][real]
    seq = torch.cat([prompt, answer])[None]
    extra = {k: inputs[k][row:row + 1] for k in ("pixel_values", "image_sizes") if k in inputs}
    if "token_type_ids" in inputs:  # PaliGemma: the prompt is the prefix, the answer the causal suffix
        extra["token_type_ids"] = torch.cat([torch.zeros(len(prompt), dtype=torch.long),
                                             torch.ones(len(answer), dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **extra).logits.float()
    k = len(prompt)
    return logits[0, k - 1:k - 1 + len(answer)].log_softmax(-1).gather(-1, answer[:, None])[:, 0]

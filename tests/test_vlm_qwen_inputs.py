"""Qwen2-VL explains one image per sequence: with its real processor (built offline, saved and loaded back), two
images in one sequence, a video, or an image with a video are refused with a ValueError before any work, by
``compute_legrad`` and by ``explain_answer`` (before generating)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.qwen2_vl")

from helpers import vlm_models as V  # noqa: E402
from PIL import Image  # noqa: E402
from test_vlm_qwen import END, START, qwen2_vl  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.vlm.base import VLMAdapter  # noqa: E402

VIDEO_TOKEN = 62
IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"
VIDEO = "<|vision_start|> <|video_pad|> <|vision_end|>"
ANSWER = [torch.tensor([12, 13])]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """Qwen2-VL's processor classes with a word-level tokenizer (ids as the tiny model's config), 32 x 32 px."""
    vocab = {w: i for i, w in enumerate(V.WORDS)}
    vocab.update({f"w{i}": i for i in range(len(V.WORDS), START)})
    specials = {"<|vision_start|>": START, "<|vision_end|>": END, "<|video_pad|>": VIDEO_TOKEN,
                "<|image_pad|>": V.IMAGE_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab | specials, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([*specials, "<s>", "</s>", "<pad>", "<unk>"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    pixels = dict(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 1024, "longest_edge": 1024})
    folder = tmp_path_factory.mktemp("qwen2_vl")
    transformers.Qwen2VLProcessor(image_processor=transformers.Qwen2VLImageProcessor(**pixels),
                                  video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
                                  tokenizer=tokenizer).save_pretrained(folder)
    loaded = transformers.AutoProcessor.from_pretrained(folder)
    assert type(loaded).__name__ == "Qwen2VLProcessor"
    return loaded


@pytest.fixture(scope="module")
def wrapper(processor):
    return LeWrapper(qwen2_vl(), tokenizer=processor)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _video() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)


def test_one_image_per_sequence_from_the_real_processor_is_explained(processor, wrapper):
    inputs = processor(images=_image(0), text=f"<s> {IMAGE} what is in the picture ?", return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert wrapper.compute_legrad(image=inputs, answers=ANSWER, output_size="grid").shape == (1, 1, 4, 4)
    two = processor(images=[_image(0), _image(1)], text=[f"<s> {IMAGE} what", f"<s> {IMAGE} what is"],
                    padding=True, return_tensors="pt")
    assert wrapper.compute_legrad(image=two, answers=ANSWER, output_size="grid").shape == (2, 1, 4, 4)


CASES = {
    "two images in one sequence": (dict(images=[_image(0), _image(1)], text=f"<s> {IMAGE} {IMAGE} what"),
                                   "one image per sequence"),
    "two images in the first of two sequences": (
        dict(images=[_image(0), _image(1)], text=[f"<s> {IMAGE} {IMAGE} what", "<s> what is"]),
        "prompt 0 holds 8 image tokens; this model expects 4"),
    "a video": (dict(videos=[_video()], text=f"<s> {VIDEO} what"), "video inputs .* are not supported"),
    "an image and a video": (dict(images=_image(0), videos=[_video()], text=f"<s> {IMAGE} {VIDEO} what"),
                             "video inputs .* are not supported"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_several_images_or_video_in_one_sequence_are_refused_before_any_work(case, processor, wrapper, monkeypatch):
    kwargs, message = CASES[case]
    inputs = processor(**kwargs, padding=True, return_tensors="pt")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the inputs were refused")

    for name in ("_relevance", "_plain_features"):
        monkeypatch.setattr(VLMAdapter, name, no_work)
    monkeypatch.setattr(wrapper.model, "generate", no_work)
    with pytest.raises(ValueError, match=message):
        wrapper.compute_legrad(image=inputs, answers=ANSWER)
    if "video" in case:
        with pytest.raises(ValueError, match=message):
            wrapper.explain_answer(inputs, max_new_tokens=2)


def test_video_tokens_without_the_video_are_refused(processor, wrapper):
    inputs = dict(processor(images=_image(0), text=f"<s> {IMAGE} what is", return_tensors="pt"))
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][0, -1] = VIDEO_TOKEN  # the processor itself refuses a video token without a video
    with pytest.raises(ValueError, match="prompt 0 holds video tokens: videos are not supported"):
        wrapper.compute_legrad(image=inputs, answers=ANSWER)

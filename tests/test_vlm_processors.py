"""VLMs fed their REAL processors' whole output (built offline: the word-level tokenizer of
``helpers.vlm_models``, the family's own image processor and processor classes, a ``save_pretrained`` /
``from_pretrained`` round trip): PaliGemma's processor returns ``labels``, which must be accepted; the scores
equal the model's own log-probabilities and the maps equal the oracle's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from PIL import Image  # noqa: E402

from legrad import LeWrapper  # noqa: E402

ANSWERS = ["a cat", "two cats red"]


def _llava_processor():
    return transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=V.tokenizer(), patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)


def _paligemma_processor():
    image_processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = V.GRID ** 2
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=V.tokenizer())


CASES = {
    "llava": (V.llava, _llava_processor, "<image>\nwhat is in the picture ?", [1, 2]),
    "paligemma": (V.paligemma, _paligemma_processor, "answer en what is in the picture ?", [1, 2]),
}


def _round_trip(processor, path):
    processor.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


def _own_log_probs(model, inputs, answer_ids):
    """The model's own teacher-forced log-probability of one answer after the (unpadded) prompt."""
    ids = torch.cat([inputs["input_ids"][0], answer_ids])[None]
    kwargs = {"pixel_values": inputs["pixel_values"], "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in inputs:
        kwargs["token_type_ids"] = torch.cat([inputs["token_type_ids"][0], torch.ones_like(answer_ids)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits.float()
    k = inputs["input_ids"].shape[1]
    return float(logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer_ids[:, None]).sum())


@pytest.mark.parametrize("family", sorted(CASES))
def test_the_processors_whole_output_is_explained(family, tmp_path):
    make_model, make_processor, text, blocks = CASES[family]
    model = make_model()
    processor = _round_trip(make_processor(), tmp_path / family)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    inputs = processor(images=img, text=text, return_tensors="pt")
    if family == "paligemma":
        assert "labels" in inputs  # what transformers 5.x's PaliGemmaProcessor returns, unfiltered
    before = V.snapshot(model)
    w = LeWrapper(model, tokenizer=processor)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    tok = processor.tokenizer
    for j, ans in enumerate(ANSWERS):
        ids = torch.tensor(tok(ans, add_special_tokens=False)["input_ids"])
        assert abs(float(scores[0, j]) - _own_log_probs(model, inputs, ids)) < 1e-4
        ref = min_max(V.oracle_map(model, inputs["pixel_values"], inputs["input_ids"][0], ids, blocks))
        torch.testing.assert_close(maps[0, j], ref, atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())

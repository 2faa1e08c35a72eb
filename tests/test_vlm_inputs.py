"""VLM calls refused with a clear error before any work (and the model left intact), unsupported classes
and configurations named, and the pre-flight memory check."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.engine.budget import MemoryBudgetError  # noqa: E402

ANS = [torch.tensor([12, 13])]


@pytest.fixture(scope="module")
def llava():
    return V.llava()


def _inputs(n_image: int = V.GRID ** 2, **kw):
    return V.batch([V.prompt([4, 6, 5], n_image)], torch.randn(1, 3, 32, 32), **kw)


def test_list_valued_feature_layer_is_refused_naming_what_is_supported():
    with pytest.raises(ValueError, match="vision_feature_layer.*one int"):
        LeWrapper(V.llava(feature_layer=[-2, -1]))


def test_unsupported_vlm_classes_name_the_supported_ones():
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8)
    tc = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=64)
    model = transformers.VipLlavaForConditionalGeneration(transformers.VipLlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=63, vision_feature_layers=[-2, -1]))
    with pytest.raises(TypeError, match="VipLlavaForConditionalGeneration") as info:
        LeWrapper(model)
    from legrad.adapters.vlm import SUPPORTED_VLM_CLASSES

    assert len(SUPPORTED_VLM_CLASSES) >= 9
    for name in SUPPORTED_VLM_CLASSES:  # every supported class is named
        assert f" {name}," in str(info.value) or f" {name})" in str(info.value), name


@pytest.mark.parametrize("make, match, exc", [
    (lambda: dict(image=_inputs(), answers=[]), "non-empty", ValueError),
    (lambda: dict(image=_inputs(), answers=["a cat"]), "tokenizer", ValueError),
    (lambda: dict(image=_inputs(), answers=[torch.tensor([1.0])]), "integer", TypeError),
    (lambda: dict(image=_inputs(), answers=[torch.tensor([64])]), "vocabulary", ValueError),
    (lambda: dict(image=_inputs(), answers=[torch.tensor([V.IMAGE_TOKEN])]), "image token", ValueError),
    (lambda: dict(image=_inputs(), answers=[torch.tensor([], dtype=torch.long)]), "no token", ValueError),
    (lambda: dict(image=_inputs(n_image=3), answers=ANS), "image tokens", ValueError),
    (lambda: dict(image=_inputs()["pixel_values"], answers=ANS), "processor output", TypeError),
    (lambda: dict(image={**_inputs(), "pixel_values": torch.randn(1, 3, 64, 64)}, answers=ANS), "32", ValueError),
    (lambda: dict(image={**_inputs(), "pixel_values": torch.full((1, 3, 32, 32), float("nan"))}, answers=ANS),
     "NaN", ValueError),
    (lambda: dict(image={**_inputs(), "attention_mask": torch.tensor([[1] * 10 + [0] + [1] * 9])}, answers=ANS),
     "holes", ValueError),
    (lambda: dict(image=_inputs(), answers=ANS, output_size="big"), "output_size", ValueError),
    (lambda: dict(image=_inputs(), answers=ANS, layer_index=3), "out of range", ValueError),
    (lambda: dict(image=_inputs(), answers=ANS * 2, per_token=True), "one answer", ValueError),
    (lambda: dict(image=_inputs(), text_embedding=torch.randn(1, 48)), "candidate answers", TypeError),
    (lambda: dict(image=_inputs(), target=3, answers=ANS), "candidate answers", TypeError),
])
def test_bad_calls_raise_before_any_work(llava, make, match, exc):
    before = V.snapshot(llava)
    with pytest.raises(exc, match=match):
        LeWrapper(llava).compute_legrad(**make())
    assert all(same_bits(before[k], v) for k, v in V.snapshot(llava).items())


def test_training_mode_is_refused_not_silently_random(llava):
    llava.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            LeWrapper(llava).compute_legrad(image=_inputs(), answers=ANS)
    finally:
        llava.eval()


def test_memory_budget_is_checked_before_work_and_chunks_the_sequences(llava):
    with pytest.raises(MemoryBudgetError, match="max_memory"):
        LeWrapper(llava, max_memory=1000).compute_legrad(image=_inputs(), answers=ANS)
    inputs = V.batch([V.prompt([4, 6, 5], V.GRID ** 2)] * 2, torch.randn(2, 3, 32, 32))
    answers = [torch.tensor([12, 13]), torch.tensor([14]), torch.tensor([15, 16])]
    whole = LeWrapper(llava).compute_legrad(image=inputs, answers=answers)
    one_by_one = LeWrapper(llava).compute_legrad(image=inputs, answers=answers, prompt_chunk=1)
    torch.testing.assert_close(whole, one_by_one, atol=1e-5, rtol=0)


def test_a_clip_model_refuses_answers():
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64))
    with pytest.raises(TypeError, match="vision-language models"):
        LeWrapper(transformers.CLIPModel(cfg).eval()).compute_legrad(image=torch.randn(1, 3, 32, 32), answers=ANS)


def test_keys_the_score_does_not_use_are_ignored_with_a_debug_log(llava, caplog):
    inputs = _inputs()
    ref = LeWrapper(llava).compute_legrad(image=inputs, answers=ANS, output_size="grid")
    extra = {**inputs, "labels": torch.full_like(inputs["input_ids"], -100), "foo": 1}
    with caplog.at_level("DEBUG", logger="legrad.adapters.vlm.inputs"):
        maps = LeWrapper(llava).compute_legrad(image=extra, answers=ANS, output_size="grid")
    assert torch.equal(maps, ref)
    assert "['foo', 'labels']" in caplog.text and "ignored" in caplog.text


def test_mistral3_is_supported_now_that_its_pixtral_tower_is_declared():
    vc = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=32, patch_size=8, head_dim=8)
    tc = transformers.MistralConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64, head_dim=12)
    model = transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        vision_config=vc, text_config=tc, image_token_id=63, spatial_merge_size=2)).eval()
    from legrad.adapters.vlm import SUPPORTED_VLM_CLASSES, Mistral3Adapter

    assert "Mistral3ForConditionalGeneration" in SUPPORTED_VLM_CLASSES
    assert isinstance(LeWrapper(model).adapter, Mistral3Adapter)  # drift-guarded at wrap (tests/test_vlm_mistral3.py)

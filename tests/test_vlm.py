"""LeGrad for VLM answers against the independent oracle of ``helpers.vlm_models`` (one block, one image,
one answer per backward, through the model's own forward), on tiny random LLaVA and PaliGemma models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402

from legrad import LeWrapper  # noqa: E402

ANSWERS = [torch.tensor([12, 13]), torch.tensor([15, 16, 17])]  # "a cat", "two cats red"


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _check_against_oracle(model, inputs, prompts, answers, blocks, maps, atol=1e-4, token=None):
    for b, p in enumerate(prompts):
        for j, ans in enumerate(answers):
            ref = min_max(V.oracle_map(model, inputs["pixel_values"][b:b + 1], p, ans, blocks,
                                       token=None if token is None else j))
            torch.testing.assert_close(maps[b, j], ref, atol=atol, rtol=0)


def test_bar_llava15_two_answers_as_ids_match_the_oracle_and_leave_the_model_intact():
    model = V.llava()
    pixels = _pixels(1)
    assert V.tower_matches_model(model, pixels)
    p = V.prompt([4, 6, 7, 8, 9, 10, 11, 5], V.GRID ** 2)
    inputs = V.batch([p], pixels)
    before = V.snapshot(model)
    attn_impl = model.config._attn_implementation
    hooks = V.hooks(model)
    maps = LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS, output_size="grid")
    assert maps.shape == (1, 2, V.GRID, V.GRID) and maps.dtype == torch.float32
    # LLaVA reads hidden_states[-2] of 4 blocks: blocks 0..2 feed the features; the default explains 1 and 2.
    _check_against_oracle(model, inputs, [p], ANSWERS, [1, 2], maps)
    after = V.snapshot(model)
    assert before.keys() == after.keys() and all(same_bits(before[k], after[k]) for k in before)
    assert model.config._attn_implementation == attn_impl
    assert V.hooks(model) == hooks  # transformers registers its own hooks; legrad adds none
    assert not torch.allclose(maps[0, 0], maps[0, 1])  # the maps depend on the answer


def test_llava_full_selection_and_layer_index_match_the_oracle():
    model = V.llava(strategy="full", feature_layer=2)
    pixels = _pixels(1, seed=3)
    p = V.prompt([4, 6, 7, 8, 9, 10, 11, 5], V.GRID ** 2 + 1)  # "full" keeps the CLS feature: 17 image tokens
    inputs = V.batch([p], pixels)
    w = LeWrapper(model)
    assert w.adapter.depth == 2  # hidden_states[2]: blocks 0 and 1 feed the features
    maps = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=0)
    _check_against_oracle(model, inputs, [p], ANSWERS[:1], [0, 1], maps)
    maps = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=-1)
    _check_against_oracle(model, inputs, [p], ANSWERS[:1], [1], maps)


@pytest.mark.parametrize("side", ["left", "right"])
def test_two_images_with_different_prompts_and_padding_on_either_side(side):
    model = V.llava(seed=1)
    pixels = _pixels(2, seed=1)
    prompts = [V.prompt([4, 6, 7, 8, 9, 10, 11, 5], V.GRID ** 2),
               V.prompt([4, 19, 7, 13, 11, 5], V.GRID ** 2, image_first=False)]
    inputs = V.batch(prompts, pixels, side=side)
    maps = LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", prompt_chunk=3)
    _check_against_oracle(model, inputs, prompts, ANSWERS, [1, 2], maps)


def test_paligemma_matches_the_oracle_with_prefix_attention():
    model = V.paligemma()
    pixels = _pixels(2, seed=2)
    assert V.tower_matches_model(model, pixels)
    prompts = [V.prompt([20, 6, 7, 9, 10, 11], V.GRID ** 2), V.prompt([20, 19, 13], V.GRID ** 2)]
    inputs = V.batch(prompts, pixels, side="right", types=True)
    before = V.snapshot(model)
    maps = LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS, output_size="grid")
    assert maps.shape == (2, 2, V.GRID, V.GRID)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 and torch.isfinite(maps).all()
    assert not torch.allclose(maps[:, 0], maps[:, 1])  # answer-dependent
    _check_against_oracle(model, inputs, prompts, ANSWERS, [1, 2], maps)
    after = V.snapshot(model)
    assert all(same_bits(before[k], after[k]) for k in before)


def test_paligemma2_soft_capping_and_sliding_window_match_the_model_and_the_oracle():
    model = V.paligemma(seed=1, gemma2=True)
    pixels = _pixels(1, seed=7)
    p = V.prompt([20, 6, 7, 9, 10, 11], V.GRID ** 2)
    inputs = V.batch([p], pixels, types=True)
    w = LeWrapper(model)
    scores = w.adapter.score(inputs, ANSWERS)
    for j, ans in enumerate(ANSWERS):
        seq = torch.cat([p, ans])[None]
        types = torch.cat([torch.zeros(len(p), dtype=torch.long), torch.ones(len(ans), dtype=torch.long)])[None]
        with torch.no_grad():
            out = model(input_ids=seq, pixel_values=pixels, attention_mask=torch.ones_like(seq), token_type_ids=types)
        logp = out.logits.log_softmax(-1)[0, len(p) - 1: seq.shape[1] - 1].gather(-1, ans[:, None]).sum()
        assert abs(float(scores[0, j]) - float(logp)) < 1e-4
    maps = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid")
    _check_against_oracle(model, inputs, [p], ANSWERS, [1, 2], maps)


def test_per_token_maps_explain_each_answer_token_alone():
    model = V.llava(seed=2)
    pixels = _pixels(1, seed=4)
    p = V.prompt([4, 6, 7, 8, 9, 10, 11, 5], V.GRID ** 2)
    inputs = V.batch([p], pixels)
    ans = ANSWERS[1]
    maps = LeWrapper(model).compute_legrad(image=inputs, answers=[ans], output_size="grid", per_token=True)
    assert maps.shape == (1, len(ans), V.GRID, V.GRID)
    _check_against_oracle(model, inputs, [p], [ans] * len(ans), [1, 2], maps, token=True)
    # Token log-probs: their sum is the answer's score.
    _, tok = LeWrapper(model).compute_legrad(image=inputs, answers=[ans], per_token=True, return_scores=True)
    whole = LeWrapper(model).adapter.score(inputs, [ans])
    assert tok.shape == (1, len(ans)) and abs(float(tok.sum()) - float(whole[0, 0])) < 1e-4


def test_string_answers_equal_their_token_ids_and_scores_equal_the_model_forward():
    model = V.llava()
    tok = V.tokenizer()
    pixels = _pixels(1, seed=5)
    p = V.prompt([4, 6, 7, 8, 9, 10, 11, 5], V.GRID ** 2)
    inputs = V.batch([p], pixels)
    w = LeWrapper(model, tokenizer=tok)
    by_text = w.compute_legrad(image=inputs, answers=["a cat", "two cats red"], output_size=(8, 8))
    by_ids = w.compute_legrad(image=inputs, answers=ANSWERS, output_size=(8, 8))
    assert by_text.shape == (1, 2, 8, 8)
    assert torch.equal(by_text, by_ids)
    # The score that is differentiated is the model's own: its forward on prompt + answer.
    scores = w.adapter.score(inputs, ANSWERS)
    # The scores a LeGrad call returns are the unchanged model's (its last explained block is the feature layer's).
    for layer_index in (-1, -2, 0):
        _, free = w.compute_legrad(image=inputs, answers=ANSWERS, return_scores=True, layer_index=layer_index)
        torch.testing.assert_close(free, scores, atol=1e-5, rtol=0)
    for j, ans in enumerate(ANSWERS):
        seq = torch.cat([p, ans])[None]
        with torch.no_grad():
            out = model(input_ids=seq, pixel_values=pixels, attention_mask=torch.ones_like(seq))
        logp = out.logits.log_softmax(-1)[0, len(p) - 1: len(seq[0]) - 1].gather(-1, ans[:, None]).sum()
        assert abs(float(scores[0, j]) - float(logp)) < 1e-4


def test_bfloat16_language_model_runs_in_its_own_dtype_and_default_size():
    model = V.llava().to(torch.bfloat16)
    pixels = _pixels(1).to(torch.bfloat16)
    inputs = V.batch([V.prompt([4, 6, 5], V.GRID ** 2)], pixels)
    before = V.snapshot(model)
    maps = LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS)
    assert maps.shape == (1, 2, 32, 32) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert float(maps.amax()) == pytest.approx(1.0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())


def test_concurrent_calls_and_inference_mode_give_the_same_maps():
    import threading

    model = V.llava(seed=3)
    inputs = V.batch([V.prompt([4, 6, 5], V.GRID ** 2)], _pixels(1, seed=6))
    w = LeWrapper(model)
    ref = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid")
    with torch.inference_mode():
        torch.testing.assert_close(w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid"), ref,
                                   atol=1e-6, rtol=0)
    out: list = [None] * 4

    def work(i: int) -> None:
        out[i] = w.compute_legrad(image=inputs, answers=ANSWERS[i % 2:] + ANSWERS[: i % 2], output_size="grid")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, maps in enumerate(out):
        expected = ref if i % 2 == 0 else ref.flip(1)
        torch.testing.assert_close(maps, expected, atol=1e-6, rtol=0)

"""``LeWrapper.explain_answer``: the VLM's own greedy answer, explained token by token, on a tiny random LLaVA with
its real processor (and PaliGemma). Checked against generate's own tokens and raw logits, the model's own
teacher-forced forward, the independent LeGrad oracle of ``helpers.vlm_models`` and ``compute_legrad``."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from helpers import vlm_answer as A  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.answers import MAX_NEW_TOKENS, AnswerExplanation  # noqa: E402
from legrad.engine import deadline as D  # noqa: E402

QUESTION = "<image>\nwhat is in the picture ?"


@pytest.fixture(scope="module")
def llava():
    model, processor = V.llava(), A.llava_processor()
    return model, processor, LeWrapper(model, tokenizer=processor)


def test_the_answer_is_generates_own_with_its_log_probs_and_maps(llava):
    model, processor, w = llava
    inputs = processor(images=A.image(0), text=QUESTION, return_tensors="pt")
    with torch.no_grad():  # transformers installs its output-capturing hooks at a model's first forward
        model(**inputs)
    before, hooks = V.snapshot(model), V.hooks(model)
    config = model.generation_config.to_dict()
    r = w.explain_answer(inputs, max_new_tokens=5, repetition_penalty=5.0)
    assert isinstance(r, AnswerExplanation) and len(r) == 1
    # The model is left bitwise intact (weights, buffers, hooks, generation config).
    after = V.snapshot(model)
    assert before.keys() == after.keys() and all(same_bits(before[k], after[k]) for k in before)
    assert V.hooks(model) == hooks and model.generation_config.to_dict() == config

    new, logits = A.generated(model, inputs, 5, repetition_penalty=5.0)
    assert torch.equal(r.token_ids, new) and r.token_ids.shape == (1, 5)  # no end-of-sequence: all 5 tokens
    assert len(set(r.token_ids[0].tolist())) > 1  # a varied answer (the penalty)
    ids = r.token_ids[0]
    assert r.tokens == [[A.WORDS[i] for i in ids.tolist()]] and r.text == [" ".join(r.tokens[0])]
    # Log-probs: the model's own log-softmax, from generate's raw logits and from a teacher-forced forward.
    own = logits[0].log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(r.logprobs[0], own, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.logprobs[0], A.teacher_forced(model, inputs, 0, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(r.answer_logprob, r.logprobs.sum(-1), atol=1e-4, rtol=0)
    # Maps: compute_legrad's per-token maps of those ids, and the whole answer's map.
    assert r.maps.shape == (1, 5, 32, 32) and r.answer_map.shape == (1, 32, 32)
    torch.testing.assert_close(r.maps, w.compute_legrad(image=inputs, answers=[ids], per_token=True), atol=0, rtol=0)
    torch.testing.assert_close(r.answer_map, w.compute_legrad(image=inputs, answers=[ids])[:, 0], atol=0, rtol=0)
    # ... and the independent oracle (model's own forward, explicit attention probabilities): blocks 1 and 2.
    prompt = inputs["input_ids"][0]
    for t in (0, 4):
        ref = min_max(V.oracle_map(model, inputs["pixel_values"], prompt, ids, [1, 2], token=t))
        torch.testing.assert_close(w.explain_answer(inputs, 5, output_size="grid", repetition_penalty=5.0).maps[0, t],
                                   ref, atol=1e-4, rtol=0)
    ref = min_max(V.oracle_map(model, inputs["pixel_values"], prompt, ids, [1, 2]))
    grid = w.explain_answer(inputs, 5, output_size="grid", layer_index=-2, repetition_penalty=5.0)
    torch.testing.assert_close(grid.answer_map[0], ref, atol=1e-4, rtol=0)


def test_the_answer_stops_at_the_end_of_sequence_token_which_it_keeps(llava):
    model, processor, w = llava
    inputs = processor(images=A.image(0), text=QUESTION, return_tensors="pt")
    free, _ = A.generated(model, inputs, 6, repetition_penalty=5.0)
    eos = int(free[0, 2])  # the third token of the free answer ends it
    r = w.explain_answer(inputs, 6, repetition_penalty=5.0, eos_token_id=eos)
    assert r.token_ids[0].tolist() == free[0, :3].tolist()
    new, logits = A.generated(model, inputs, 6, repetition_penalty=5.0, eos_token_id=eos)
    assert torch.equal(r.token_ids, new)  # generate stopped there too: exactly its new tokens
    torch.testing.assert_close(r.logprobs[0], logits[0].log_softmax(-1).gather(-1, new[0][:, None])[:, 0],
                               atol=1e-4, rtol=0)
    # The model's own end of sequence (its generation config) is used without eos_token_id.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        assert w.explain_answer(inputs, 6, repetition_penalty=5.0).token_ids[0].tolist() == free[0, :3].tolist()
    finally:
        model.generation_config.eos_token_id = saved


def test_a_batch_is_explained_row_by_row_lists_where_lengths_differ(llava):
    model, processor, w = llava
    texts = [QUESTION, "<image>\nwhere is the red ball in the picture ?"]
    images = [A.image(0), A.image(1)]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert not bool(inputs["attention_mask"].all())  # left padding in row 0
    free, _ = A.generated(model, inputs, 6, repetition_penalty=5.0)
    rows = [free[b].tolist() for b in range(2)]
    # An end-of-sequence token that ends the two rows at different lengths.
    eos, lengths = next((tok, [r.index(tok) + 1 if tok in r else 6 for r in rows])
                        for tok in itertools.chain(*rows)
                        if len({r.index(tok) + 1 if tok in r else 6 for r in rows}) == 2)
    r = w.explain_answer(inputs, 6, repetition_penalty=5.0, eos_token_id=eos)
    assert isinstance(r.token_ids, list) and [len(t) for t in r.token_ids] == lengths
    new, logits = A.generated(model, inputs, 6, repetition_penalty=5.0, eos_token_id=eos)
    for b in range(2):
        ids = r.token_ids[b]
        assert ids.tolist() == new[b, :lengths[b]].tolist()  # generate's tokens, its padding after eos dropped
        assert r.maps[b].shape == (lengths[b], 32, 32) and r.logprobs[b].shape == (lengths[b],)
        own = logits[b, :lengths[b]].log_softmax(-1).gather(-1, ids[:, None])[:, 0]
        torch.testing.assert_close(r.logprobs[b], own, atol=1e-4, rtol=0)
        torch.testing.assert_close(r.logprobs[b], A.teacher_forced(model, inputs, b, ids), atol=1e-4, rtol=0)
        alone = processor(images=images[b], text=texts[b], return_tensors="pt")  # the row on its own, unpadded
        torch.testing.assert_close(r.maps[b], w.compute_legrad(image=alone, answers=[ids], per_token=True)[0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(r.answer_map[b], w.compute_legrad(image=alone, answers=[ids])[0, 0],
                                   atol=1e-5, rtol=0)
    # Rows of the same length: tensors over the batch.
    same = w.explain_answer(inputs, 3, repetition_penalty=5.0)
    assert same.token_ids.shape == (2, 3) and same.maps.shape == (2, 3, 32, 32) and same.logprobs.shape == (2, 3)
    assert same.answer_map.shape == (2, 32, 32) and same.answer_logprob.shape == (2,)
    assert torch.equal(same.token_ids, free[:, :3])


def test_paligemma_answer_is_explained_too():
    import transformers

    model = V.paligemma()
    ip = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    processor = transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=A.tokenizer())
    inputs = dict(processor(images=A.image(0), text="what is in the picture ?", return_tensors="pt"))
    # transformers 5's processor returns all-ignored `labels`, which today's adapter refuses: dropped here.
    inputs.pop("labels", None)
    w = LeWrapper(model, tokenizer=processor)
    r = w.explain_answer(inputs, 4)
    new, logits = A.generated(model, inputs, 4)
    assert torch.equal(r.token_ids, new)
    ids = r.token_ids[0]
    torch.testing.assert_close(r.logprobs[0], logits[0].log_softmax(-1).gather(-1, ids[:, None])[:, 0],
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(r.logprobs[0], A.teacher_forced(model, inputs, 0, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(r.maps, w.compute_legrad(image=inputs, answers=[ids], per_token=True), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, error, msg", [
    (dict(max_new_tokens=0), ValueError, "between 1 and 512"),
    (dict(max_new_tokens=MAX_NEW_TOKENS + 1), ValueError, "between 1 and 512"),
    (dict(max_new_tokens=True), TypeError, "must be an int"),
    (dict(max_new_tokens=2.0), TypeError, "must be an int"),
    (dict(do_sample=True), ValueError, "greedy"),
    (dict(temperature=0.7), ValueError, "greedy"),
    (dict(top_k=5), ValueError, "greedy"),
    (dict(num_beams=2), ValueError, "greedy"),
    (dict(num_return_sequences=2), ValueError, "greedy"),
    (dict(output_attentions=True), TypeError, "unexpected generate option"),
    (dict(layer_index=9), ValueError, "out of range"),
    (dict(output_size="big"), ValueError, "output_size"),
    (dict(prompt_chunk=0), ValueError, "prompt_chunk"),
])
def test_bad_options_are_refused_before_generating(llava, monkeypatch, kwargs, error, msg):
    model, processor, w = llava
    inputs = processor(images=A.image(0), text=QUESTION, return_tensors="pt")
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(error, match=msg):
        w.explain_answer(inputs, **{"max_new_tokens": 2, **kwargs})


def test_bad_models_and_inputs_are_refused_before_generating(llava, monkeypatch):
    model, processor, w = llava
    inputs = processor(images=A.image(0), text=QUESTION, return_tensors="pt")
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(ValueError, match="tokenizer"):
        LeWrapper(model).explain_answer(inputs, 2)
    with pytest.raises(TypeError, match="processor output"):
        w.explain_answer(inputs["pixel_values"], 2)
    with pytest.raises(ValueError, match="input_ids"):
        w.explain_answer({"pixel_values": inputs["pixel_values"]}, 2)
    with pytest.raises(ValueError, match="row by row"):
        w.explain_answer({**inputs, "input_ids": inputs["input_ids"].repeat(2, 1),
                          "attention_mask": inputs["attention_mask"].repeat(2, 1)}, 2)
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            w.explain_answer(inputs, 2)
    finally:
        model.eval()
    from helpers.models import make_tiny_vit

    with pytest.raises(TypeError, match="vision-language models"):
        LeWrapper(make_tiny_vit()).explain_answer(inputs, 2)


def test_the_callers_deadline_stops_generation_between_tokens(llava, monkeypatch):
    model, processor, w = llava
    inputs = processor(images=A.image(0), text=QUESTION, return_tensors="pt")
    ticks = itertools.count()
    monkeypatch.setattr(D, "_clock", lambda: float(next(ticks)))  # one second per look at the clock
    steps = []
    handle = model.lm_head.register_forward_hook(lambda *a: steps.append(1))  # counts generate's steps
    try:
        with D.deadline(3.5), pytest.raises(D.RequestTimeoutError):  # set at 0; checked at 1 (before), 2, 3, 4 s
            w.explain_answer(inputs, 8)
    finally:
        handle.remove()
    assert len(steps) == 3  # stopped inside generate, after its third token
    with D.deadline(1e-9), pytest.raises(D.RequestTimeoutError):
        w.explain_answer(inputs, 8)

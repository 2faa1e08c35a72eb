"""Gemma 3 (SigLIP tower, projector = average pooling of the patch grid + soft-embedding RMS norm + projection,
Gemma 3 language model: the image tokens one bidirectional block via ``token_type_ids``, sliding-window layers)
fed its REAL processor's whole output (``Gemma3Processor`` + ``Gemma3ImageProcessor`` + a word-level tokenizer with
Gemma 3's ``<start_of_image>`` / ``<end_of_image>`` / soft image tokens, built offline, saved and reloaded), against
an oracle written here from the definition: the model's own tower modules run eagerly with the explained block's
attention probabilities as a grad leaf, the model's own ``post_layernorm`` and ``multi_modal_projector``, the
model's own forward with ``mm_encoder_outputs``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.gemma3", reason="this transformers has no Gemma 3")

from helpers import vlm_families  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

BOI, EOI = 60, 61
TOKENS = 4  # mm_tokens_per_image: the 4 x 4 patch grid pooled 2 x 2
ANSWERS = ["a cat", "two cats red"]
TEXT = "<s> <start_of_image> what is in the picture ?"


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer over helpers.vlm_models' words, with Gemma 3's image tokens (ids 60, 61, 63)."""
    vocab = {w: i for i, w in enumerate(V.WORDS)}
    vocab.update({f"w{i}": i for i in range(len(V.WORDS), V.VOCAB)})
    vocab.update({"<start_of_image>": BOI, "<end_of_image>": EOI, "<image_soft_token>": V.IMAGE_TOKEN})
    for i in (BOI, EOI, V.IMAGE_TOKEN):
        vocab.pop(f"w{i}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image_soft_token>", "<start_of_image>", "<end_of_image>", "<s>", "</s>", "<pad>",
                            "<unk>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})


def _processor(path):
    proc = transformers.Gemma3Processor(image_processor=transformers.Gemma3ImageProcessor(size={"height": 32,
                                                                                                 "width": 32}),
                                        tokenizer=_tokenizer(), image_seq_length=TOKENS)
    proc.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


gemma3 = vlm_families.gemma3  # the shared builder (tests/helpers/vlm_families.py)


def _image(seed: int, size=(40, 48)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def _features(model, pixels, block: int | None):
    """Image features from block ``block``'s output (the last block when None) and that block's probabilities."""
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)  # transformers 4.x nests the SigLIP transformer
    last = len(vt.encoder.layers) - 1 if block is None else block
    x, a = vt.embeddings(pixels), None
    for i, layer in enumerate(vt.encoder.layers[: last + 1]):
        out, probs = V._attention(layer.self_attn, layer.layer_norm1(x), leaf=i == block)
        a = probs if i == block else a
        x = x + out
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.model.multi_modal_projector(vt.post_layernorm(x)), a


def _log_prob(model, prompt, answer, *, feats=None, pixels=None):
    """The model's own teacher-forced log-probability of ``answer`` after the unpadded ``prompt``."""
    ids = torch.cat([prompt, answer])[None]
    kwargs = {"pixel_values": pixels} if feats is None else {
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=(ids == V.IMAGE_TOKEN).long(),
                   **kwargs).logits.float()
    k = len(prompt)
    return logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum()


def _oracle(model, pixels, prompt, answer, blocks):
    total = torch.zeros(16)
    for b in blocks:
        with torch.enable_grad():
            feats, a = _features(model, pixels, b)
            score = _log_prob(model, prompt, answer, feats=feats)
        (g,) = torch.autograd.grad(score, a)
        total += g.clamp_min(0).mean(dim=(1, 2))[0]  # heads, query rows
    return total.reshape(4, 4)


def test_gemma3_real_processor_matches_the_oracle_and_the_models_own_scores(tmp_path):
    model = gemma3()
    processor = _processor(tmp_path / "gemma3")
    inputs = processor(images=_image(0), text=TEXT, return_tensors="pt")
    assert int((inputs["input_ids"] == V.IMAGE_TOKEN).sum()) == TOKENS and "token_type_ids" in inputs
    pixels, prompt = inputs["pixel_values"], inputs["input_ids"][0]
    with torch.no_grad():  # the oracle's tower and projector are the model's own (grounds the oracle)
        torch.testing.assert_close(_features(model, pixels, None)[0], model.get_image_features(pixels).pooler_output)
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model, tokenizer=processor)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, 4, 4)
    for j, ans in enumerate(ANSWERS):
        ids = torch.tensor(processor.tokenizer(ans, add_special_tokens=False)["input_ids"])
        with torch.no_grad():  # the model's own log-prob, from pixel values (no soft-capping in its head)
            assert abs(float(scores[0, j]) - float(_log_prob(model, prompt, ids, pixels=pixels))) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, pixels, prompt, ids, [1, 2])), atol=1e-4, rtol=0)
    ids = torch.tensor(processor.tokenizer(ANSWERS[1], add_special_tokens=False)["input_ids"])
    every = w.compute_legrad(image=inputs, answers=ANSWERS[1:], output_size="grid", layer_index=0)
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, pixels, prompt, ids, [0, 1, 2])), atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks
    assert w.compute_legrad(image=inputs, answers=ANSWERS).shape == (1, 2, 32, 32)  # the image the processor saw


def test_gemma3_batch_with_padding_matches_one_by_one(tmp_path):
    model = gemma3(seed=1)
    processor = _processor(tmp_path / "gemma3")
    texts = [TEXT, "<s> what <start_of_image> is in the picture ? a red ball"]
    images = [_image(1), _image(2, (30, 20))]
    w = LeWrapper(model, tokenizer=processor)
    singles = [w.compute_legrad(image=processor(images=i, text=t, return_tensors="pt"), answers=ANSWERS,
                                output_size="grid", return_scores=True) for i, t in zip(images, texts)]
    both = processor(images=[[i] for i in images], text=texts, padding=True, return_tensors="pt")
    maps, scores = w.compute_legrad(image=both, answers=ANSWERS, output_size="grid", return_scores=True)
    torch.testing.assert_close(maps, torch.cat([m for m, _ in singles]), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, torch.cat([s for _, s in singles]), atol=1e-5, rtol=0)


def test_gemma3_changed_block_is_refused_and_pan_and_scan_is_named(tmp_path, monkeypatch):
    model = gemma3()
    vt = model.model.vision_tower
    blk = getattr(vt, "vision_model", vt).encoder.layers[0]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *a, **k: original(*a, **k) * 1.01)
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    processor = _processor(tmp_path / "gemma3")
    w = LeWrapper(model, tokenizer=processor)
    crops = processor(images=_image(0, (16, 64)), text=TEXT, return_tensors="pt", do_pan_and_scan=True,
                      pan_and_scan_min_crop_size=8)
    assert crops["pixel_values"].shape[0] > 1
    with pytest.raises(ValueError, match="pan-and-scan"):
        w.compute_legrad(image=crops, answers=ANSWERS)


def test_gemma3_explain_answer_log_probs_equal_generates_own(tmp_path):
    """The model's own greedy answer (its generate: bidirectional image block at prefill, causal decoding) is
    teacher-forced to the same log-probabilities."""
    model = gemma3(seed=2)
    processor = _processor(tmp_path / "gemma3")
    inputs = processor(images=_image(0), text=TEXT, return_tensors="pt")
    r = LeWrapper(model, tokenizer=processor).explain_answer(inputs, max_new_tokens=3)
    with torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    new = g.sequences[0, inputs["input_ids"].shape[1]:]
    own = torch.stack([lg.float().log_softmax(-1)[0] for lg in g.logits])[: len(new)].gather(-1, new[:, None])[:, 0]
    assert r.token_ids[0].tolist() == new.tolist() and r.maps.shape == (1, len(new), 32, 32)
    torch.testing.assert_close(r.logprobs[0], own, atol=1e-4, rtol=0)


def test_gemma3_folder_is_explained_by_the_front_ends(tmp_path):
    from legrad.frontend.vlm import VLMExplainer, is_vlm_dir

    gemma3().save_pretrained(tmp_path)
    _processor(tmp_path)
    assert is_vlm_dir(f"hf:{tmp_path}")
    e = VLMExplainer.load(f"hf:{tmp_path}", device="cpu")
    maps, scores = e.explain(_image(0), "what is in the picture ?", ANSWERS)  # <start_of_image> put in front
    assert maps.shape == (2, 40, 48) and bool((scores < 0).all())

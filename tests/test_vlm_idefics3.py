"""Idefics3 and SmolVLM (SigLIP-style tower with NaViT position embeddings, connector = pixel shuffle + linear
projection, Llama language model) fed their REAL processors' whole output (``Idefics3Processor`` /
``SmolVLMProcessor`` with the family's image processor, ``do_image_splitting=False``, and a word-level tokenizer
with the families' ``<fake_token_around_image>`` / ``<global-img>`` / ``<image>`` tokens, built offline, saved and
reloaded), against an oracle written here from the definition: the model's own tower modules run eagerly with the
explained block's attention probabilities as a grad leaf, the model's own ``post_layernorm`` and ``connector``,
the model's own forward with ``mm_encoder_outputs``; with image splitting, each tile's relevance placed by the
image processor's own (rows, cols) and the global tile's resized onto them."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

SPECIAL = {"<fake_token_around_image>": 58, "<global-img>": 59, "<end_of_utterance>": 60, "<video>": 61,
           "<image>": V.IMAGE_TOKEN}
SPECIAL.update({f"<row_{i}_col_{j}>": 64 + 6 * (i - 1) + (j - 1) for i in range(1, 7) for j in range(1, 7)})
VOCAB = 100
ANSWERS = ["a cat", "two cats red"]
TEXT = "<s> <image> what is in the picture ?"
FAMILIES = ("idefics3", "smolvlm")


def _has(family: str) -> bool:
    return importlib.util.find_spec(f"transformers.models.{family}") is not None


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer over helpers.vlm_models' words with the Idefics3 / SmolVLM image tokens."""
    vocab = {w: i for i, w in enumerate(V.WORDS)}
    vocab.update({f"w{i}": i for i in range(len(V.WORDS), VOCAB) if i not in SPECIAL.values()})
    vocab.update(SPECIAL)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([*SPECIAL, "<s>", "</s>", "<pad>", "<unk>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
                              "video_token": "<video>"})


def _processor(family: str, path):
    if not _has(family):
        pytest.skip(f"this transformers has no {family}")
    kwargs = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    if family == "idefics3":
        proc = transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessor(**kwargs),
                                              tokenizer=_tokenizer(), image_seq_len=4)
    else:
        if importlib.util.find_spec("num2words") is None:
            pytest.skip("SmolVLMProcessor needs the num2words package, not installed")
        proc = transformers.SmolVLMProcessor(image_processor=transformers.SmolVLMImageProcessor(**kwargs),
                                             video_processor=transformers.SmolVLMVideoProcessor(),
                                             tokenizer=_tokenizer(), image_seq_len=4)
    proc.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


def make(family: str, seed: int = 0):
    """Idefics3- / SmolVLM-shaped: 4 x 4 patches shuffled 2 x 2 into 4 image tokens, Llama LM."""
    if not _has(family):
        pytest.skip(f"this transformers has no {family}")
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
    tc = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0)
    if family == "idefics3":
        cfg, cls = transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration
    else:
        cfg, cls = transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration
    return V._init(cls(cfg(vision_config=vc, text_config=tc, scale_factor=2, image_token_id=V.IMAGE_TOKEN)), seed)


def _image(seed: int, size=(40, 48)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def _features(model, pixels, block: int | None):
    """Image features ``[4, D]`` from block ``block``'s output (the last block when None) and its probabilities."""
    vm = model.model.vision_model
    last = len(vm.encoder.layers) - 1 if block is None else block
    tiles = pixels[0][pixels[0].flatten(1).ne(0).any(-1)]  # the model drops all-zero (padding) tiles
    x = vm.embeddings(tiles, patch_attention_mask=torch.ones(len(tiles), 4, 4, dtype=torch.bool))
    a = None
    for i, layer in enumerate(vm.encoder.layers[: last + 1]):
        out, probs = V._attention(layer.self_attn, layer.layer_norm1(x), leaf=i == block)
        a = probs if i == block else a
        x = x + out
        x = x + layer.mlp(layer.layer_norm2(x))
    feats = model.model.connector(vm.post_layernorm(x))
    return feats.reshape(-1, feats.shape[-1]), a


def _log_prob(model, prompt, answer, *, feats=None, pixels=None):
    """The model's own teacher-forced log-probability of ``answer`` after the unpadded ``prompt``."""
    ids = torch.cat([prompt, answer])[None]
    kwargs = {"pixel_values": pixels} if feats is None else {
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[feats])}}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits.float()
    k = len(prompt)
    return logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum()


def _oracle(model, pixels, prompt, answer, blocks, rows: int = 0, cols: int = 0):
    """Un-normalised map: one tile's ``[4, 4]``, or the ``rows x cols`` sub-images' maps placed in their grid plus
    the global tile's (the last) resized bilinearly onto it."""
    total = 0.0
    for b in blocks:
        with torch.enable_grad():
            feats, a = _features(model, pixels, b)
            score = _log_prob(model, prompt, answer, feats=feats)
        (g,) = torch.autograd.grad(score, a)
        total = total + g.clamp_min(0).mean(dim=(1, 2)).reshape(-1, 4, 4)  # heads, query rows; per tile
    if rows == 0:
        return total[0]
    canvas = torch.zeros(4 * rows, 4 * cols)
    for k in range(rows * cols):
        r, c = divmod(k, cols)  # the image processor cuts the sub-images in raster order
        canvas[4 * r: 4 * r + 4, 4 * c: 4 * c + 4] = total[k]
    return canvas + torch.nn.functional.interpolate(total[-1][None, None], size=canvas.shape, mode="bilinear",
                                                    align_corners=False)[0, 0]


def _check_against_the_oracle(model, inputs, answers, tokenizer=None):
    pixels, prompt = inputs["pixel_values"], inputs["input_ids"][0]
    with torch.no_grad():  # the oracle's tower and connector are the model's own (grounds the oracle)
        own = model.get_image_features(pixels).pooler_output[0]
        torch.testing.assert_close(_features(model, pixels, None)[0], own)
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model, tokenizer=tokenizer)
    maps, scores = w.compute_legrad(image=inputs, answers=answers, output_size="grid", return_scores=True)
    assert maps.shape == (1, len(answers), 4, 4)
    ids = [torch.tensor(tokenizer.tokenizer(a, add_special_tokens=False)["input_ids"]) if isinstance(a, str) else a
           for a in answers]
    for j, ans in enumerate(ids):
        with torch.no_grad():  # the model's own log-prob, from pixel values
            assert abs(float(scores[0, j]) - float(_log_prob(model, prompt, ans, pixels=pixels))) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, pixels, prompt, ans, [1, 2])), atol=1e-4, rtol=0)
    every = w.compute_legrad(image=inputs, answers=answers[:1], output_size="grid", layer_index=0)
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, pixels, prompt, ids[0], [0, 1, 2])), atol=1e-4,
                               rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks
    assert w.compute_legrad(image=inputs, answers=answers).shape == (1, len(answers), 32, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_processor_matches_the_oracle_and_the_models_own_scores(family, tmp_path):
    model = make(family)
    processor = _processor(family, tmp_path / family)
    inputs = processor(images=_image(0), text=TEXT, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 1, 3, 32, 32) and "pixel_attention_mask" in inputs
    assert int((inputs["input_ids"] == V.IMAGE_TOKEN).sum()) == 4
    _check_against_the_oracle(model, inputs, ANSWERS, processor)


def test_smolvlm_matches_the_oracle_without_its_processor():
    """SmolVLM's processor needs num2words; the model path is checked on its processor's layout regardless."""
    model = make("smolvlm")
    pixels = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 58, 59] + [V.IMAGE_TOKEN] * 4 + [58, 6, 7, 8, 9, 10, 11]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
              "pixel_attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.long)}
    _check_against_the_oracle(model, inputs, [torch.tensor([12, 13]), torch.tensor([15, 16, 17])])


@pytest.mark.parametrize("family", FAMILIES)
def test_changed_block_is_refused_and_image_splitting_is_named(family, monkeypatch):
    model = make(family)
    blk = model.model.vision_model.encoder.layers[0]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *a, **k: original(*a, **k) * 1.01)
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    w = LeWrapper(model)
    ids = torch.tensor([[1] + [58, 59] + [V.IMAGE_TOKEN] * 4 + [58] + [6, 7]])
    tiles = {"input_ids": ids, "pixel_values": torch.randn(1, 5, 3, 32, 32)}
    with pytest.raises(ValueError, match="do_image_splitting=False"):  # tiles, and no <row_i_col_j> token
        w.compute_legrad(image=tiles, answers=[torch.tensor([12])])
    padded = {**tiles, "pixel_values": tiles["pixel_values"][:, :1],
              "pixel_attention_mask": torch.ones(1, 1, 32, 32).index_fill(3, torch.tensor([31]), 0)}
    with pytest.raises(ValueError, match="padded pixels"):
        w.compute_legrad(image=padded, answers=[torch.tensor([12])])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(20, 72), (72, 40)])
def test_split_images_match_the_oracle_stitched_by_the_processors_own_grid(family, size, tmp_path):
    model = make(family, seed=1)
    processor = _processor(family, tmp_path / family)
    img = _image(0, size)
    inputs = processor(images=img, text=TEXT, return_tensors="pt", do_image_splitting=True)
    info = processor.image_processor(images=img, do_image_splitting=True, return_row_col_info=True,
                                     return_tensors="pt")
    rows, cols = info["rows"][0][0], info["cols"][0][0]
    assert rows * cols > 1 and inputs["pixel_values"].shape[1] == rows * cols + 1
    before = V.snapshot(model)
    w = LeWrapper(model, tokenizer=processor)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, 4 * rows, 4 * cols)
    pixels, prompt = inputs["pixel_values"], inputs["input_ids"][0]
    for j, ans in enumerate(ANSWERS):
        ids = torch.tensor(processor.tokenizer(ans, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            assert abs(float(scores[0, j]) - float(_log_prob(model, prompt, ids, pixels=pixels))) < 1e-4
        ref = min_max(_oracle(model, pixels, prompt, ids, [1, 2], rows, cols))
        torch.testing.assert_close(maps[0, j], ref, atol=1e-4, rtol=0)
    assert w.compute_legrad(image=inputs, answers=ANSWERS).shape == (1, 2, 32 * rows, 32 * cols)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())
    with pytest.raises(ValueError, match="tokenizer=processor"):  # the grid is read from the prompt's tokens
        LeWrapper(model).compute_legrad(image=inputs, answers=[torch.tensor([12])])


def test_a_batch_of_split_and_whole_images_matches_one_by_one(tmp_path):
    model = make("idefics3", seed=2)
    processor = _processor("idefics3", tmp_path / "idefics3")
    images, texts = [_image(1, (20, 72)), _image(2, (72, 72))], [TEXT, "<s> what is <image> in the picture ? a"]
    w = LeWrapper(model, tokenizer=processor)
    singles = [w.compute_legrad(image=processor(images=i, text=t, return_tensors="pt", do_image_splitting=True),
                                answers=ANSWERS, output_size="grid", return_scores=True) for i, t in zip(images, texts)]
    both = processor(images=[[i] for i in images], text=texts, padding=True, return_tensors="pt",
                     do_image_splitting=True)
    assert bool((both["pixel_values"][0, 3:] == 0).all())  # 1 x 2 + 1 tiles, then the batch's padding tiles
    maps, scores = w.compute_legrad(image=both, answers=ANSWERS, output_size="grid", return_scores=True)
    assert isinstance(maps, list) and [tuple(m.shape) for m in maps] == [tuple(m.shape[1:]) for m, _ in singles]
    for m, (single, _) in zip(maps, singles):
        torch.testing.assert_close(m, single[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, torch.cat([s for _, s in singles]), atol=1e-5, rtol=0)


def test_idefics3_explain_answer_log_probs_equal_generates_own(tmp_path):
    model = make("idefics3", seed=2)
    processor = _processor("idefics3", tmp_path / "idefics3")
    inputs = processor(images=_image(0), text=TEXT, return_tensors="pt")
    r = LeWrapper(model, tokenizer=processor).explain_answer(inputs, max_new_tokens=3)
    with torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    new = g.sequences[0, inputs["input_ids"].shape[1]:]
    own = torch.stack([lg.float().log_softmax(-1)[0] for lg in g.logits])[: len(new)].gather(-1, new[:, None])[:, 0]
    assert r.token_ids[0].tolist() == new.tolist() and r.maps.shape == (1, len(new), 32, 32)
    torch.testing.assert_close(r.logprobs[0], own, atol=1e-4, rtol=0)


def test_idefics3_folder_with_a_splitting_processor_is_explained_by_the_front_ends(tmp_path):
    from legrad.frontend.vlm import VLMExplainer, is_vlm_dir

    make("idefics3").save_pretrained(tmp_path)
    processor = _processor("idefics3", tmp_path)
    processor.image_processor.do_image_splitting = True  # the processors' default
    processor.save_pretrained(tmp_path)
    assert is_vlm_dir(f"hf:{tmp_path}")
    e = VLMExplainer.load(f"hf:{tmp_path}", device="cpu")
    assert e.inputs(_image(0, (20, 72)), "what is in the picture ?")["pixel_values"].shape[1] == 3  # 1 x 2 + global
    maps, scores = e.explain(_image(0, (20, 72)), "what is in the picture ?", ANSWERS)
    assert maps.shape == (2, 20, 72) and bool((scores < 0).all())
